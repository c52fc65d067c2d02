"""The plain engine: configs, the causal student, its sink+window cache, the streaming sampler,
checkpoint loading and the command line."""
