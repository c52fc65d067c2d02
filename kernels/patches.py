"""Token <-> latent layout of the DiT's patches (SPEC §4.7), shared by the kernels and the engine.

    latent = unpatchify(tokens, grid=(rows, cols), channels=16, patch=(2, 2))   # [B, F, T, P] -> [B, C, F, H, W]
    ph, pw = infer_patch_hw(v_tok, x_t)                                        # patch size from two shapes

Each token's P = ph * pw * C values are laid out (p_h, p_w, channel) with channel fastest:
out[c, f, ph*r + a, pw*q + b] = token(f, r, q)[(pw*a + b) * C + c]. Pure PyTorch: importing this module
needs neither Triton nor a GPU.
"""

from __future__ import annotations

import torch


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], channels: int, patch: tuple[int, int]) -> torch.Tensor:
    """tokens [B, F, rows*cols, ph*pw*C] -> latent [B, C, F, rows*ph, cols*pw] (same dtype)."""
    b, f, _, _ = tokens.shape
    (rows, cols), (ph, pw) = grid, patch
    x = tokens.reshape(b, f, rows, cols, ph, pw, channels)
    return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, channels, f, rows * ph, cols * pw)


def infer_patch_hw(v_tok: torch.Tensor, x_t: torch.Tensor) -> tuple[int, int]:
    """(ph, pw) such that v_tok [B, L, ph*pw*C] tiles x_t [B, C, F, H, W]; raises if none or ambiguous."""
    if x_t.dim() != 5 or v_tok.dim() != 3:
        raise ValueError(
            f"expected v_tok [B, L, P] and x_t [B, C, F, H, W], got {tuple(v_tok.shape)}, {tuple(x_t.shape)}"
        )
    _, c, f, h, w = x_t.shape
    _, l, p = v_tok.shape
    if p % c:
        raise ValueError(f"v_tok has {p} values per token, not a multiple of the {c} latent channels")
    area = p // c
    fits = [
        (ph, area // ph)
        for ph in range(1, area + 1)
        if area % ph == 0 and h % ph == 0 and w % (area // ph) == 0 and f * (h // ph) * (w // (area // ph)) == l
    ]
    if not fits:
        raise ValueError(
            f"v_tok {tuple(v_tok.shape)} cannot be unpatchified onto x_t {tuple(x_t.shape)}: no patch (ph, pw) "
            f"with ph*pw = {area} gives {l} tokens"
        )
    if len(fits) > 1:
        square = [fit for fit in fits if fit[0] == fit[1]]
        if len(square) != 1:
            raise ValueError(f"patch size is ambiguous for v_tok {tuple(v_tok.shape)}: {fits}; pass patch_hw")
        return square[0]
    return fits[0]
