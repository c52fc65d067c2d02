"""Training: the recipe that produces the student's weights (SPEC §9): not written yet.

It builds on the DiT core (the same ``CausalWanStudent``, called through ``engine.dit.full_sequence``
for block-causal and bidirectional full-sequence forwards) and the codecs, never on the application layer.
"""
