"""Token <-> latent layout of the DiT's patches (shared by the kernels and the engine)."""

from __future__ import annotations

import pytest
import torch

from lipforcing.kernels.patches import infer_patch_hw, unpatchify


def test_unpatchify_layout():
    """out[c, f, 2r + a, 2q + b] = token(f, r, q)[(2a + b) * 16 + c]."""
    tokens = torch.randn(1, 2, 3 * 5, 64)
    out = unpatchify(tokens, (3, 5), 16, (2, 2))
    assert out.shape == (1, 16, 2, 6, 10)
    for f, r, q, a, b, c in [(0, 0, 0, 0, 0, 0), (1, 2, 4, 1, 1, 15), (1, 1, 3, 0, 1, 7), (0, 2, 1, 1, 0, 3)]:
        assert out[0, c, f, 2 * r + a, 2 * q + b] == tokens[0, f, r * 5 + q, (2 * a + b) * 16 + c]


def test_infer_patch_hw_from_shapes():
    x = torch.randn(1, 16, 3, 6, 10)
    assert infer_patch_hw(torch.randn(1, 3 * 3 * 5, 64), x) == (2, 2)
    with pytest.raises(ValueError, match="cannot be unpatchified"):
        infer_patch_hw(torch.randn(1, 7, 64), x)
