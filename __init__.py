"""lipforcing: a real-time streaming lip-synchronization engine for the Lip Forcing student.

Subpackages:
    lipforcing.engine    configs, the causal student network, its sink+window cache, the streaming
                         sampler, checkpoint loading and the command line
    lipforcing.kernels   Triton kernels (fused attention with dynamic RoPE, norms, flow update)
    lipforcing.compile   ONNX / TensorRT / torch.compile stages
    lipforcing.training  DMD distillation
    lipforcing.bench     benchmarks
"""

__version__ = "0.1.0"
