"""3-axis rotary position embedding of the Wan DiT, with window-relative (dynamic) temporal positions.

head_dim d = 2c: pair j is the real pair (2j, 2j+1). The first ``pairs_thw[0]`` pairs rotate with the
temporal position, the next ``pairs_thw[1]`` with the token row, the last ``pairs_thw[2]`` with the token
column. An axis with n pairs uses frequencies theta^(-2i / 2n), i = 0..n-1 (SPEC §5).

    angles = rope_angles(frame_pos, rows, cols, pairs_thw)   # [F * rows * cols, c] float64
    q = apply_rope(q, angles)                                 # q: [B, L, H, D]

This is the reference (float64 like the released code) that ``sink_window_attention`` fuses into the
attention kernel; the engine's reference attention path uses it too. Pure PyTorch (no Triton needed).
"""

from __future__ import annotations

import torch


def axis_frequencies(pairs: int, theta: float = 10000.0) -> torch.Tensor:
    """Frequencies of one axis with ``pairs`` complex pairs: [pairs] float64."""
    return theta ** (-torch.arange(pairs, dtype=torch.float64) * 2.0 / (2 * pairs))


def rope_angles(
    frame_pos: torch.Tensor,
    rows: int,
    cols: int,
    pairs_thw: tuple[int, int, int],
    theta: float = 10000.0,
) -> torch.Tensor:
    """Rotation angle of every (token, pair).

    frame_pos: [F] temporal position of each frame (any integer or float dtype).
    Returns [F * rows * cols, c] float64, tokens ordered (frame, row, col), c = sum(pairs_thw).
    """
    device = frame_pos.device
    pt, ph, pw = pairs_thw
    ft, fh, fw = (axis_frequencies(n, theta).to(device) for n in (pt, ph, pw))
    frames = frame_pos.to(torch.float64)
    a_t = frames[:, None] * ft                                              # [F, pt]
    a_h = torch.arange(rows, device=device, dtype=torch.float64)[:, None] * fh  # [rows, ph]
    a_w = torch.arange(cols, device=device, dtype=torch.float64)[:, None] * fw  # [cols, pw]
    f = frames.shape[0]
    angles = torch.cat(
        [
            a_t[:, None, None, :].expand(f, rows, cols, pt),
            a_h[None, :, None, :].expand(f, rows, cols, ph),
            a_w[None, None, :, :].expand(f, rows, cols, pw),
        ],
        dim=-1,
    )
    return angles.reshape(f * rows * cols, pt + ph + pw)


def rope_angles_table(positions: int, pairs_thw: tuple[int, int, int], theta: float = 10000.0) -> torch.Tensor:
    """Angle of integer position p for pair j at j's own axis frequency: [positions, c] float64. Row p serves a
    temporal position, a row or a column alike (the fused attention kernel's cos / sin table)."""
    freqs = torch.cat([axis_frequencies(n, theta) for n in pairs_thw])
    return torch.arange(positions, dtype=torch.float64)[:, None] * freqs[None, :]


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (2j, 2j+1) of x by its angle, computed in float64, returned in x's dtype.

    x: [B, L, H, D]; angles: [L, D/2] (float64).
    """
    b, l, h, d = x.shape
    if angles.shape != (l, d // 2):
        raise ValueError(f"angles {tuple(angles.shape)} do not match x {tuple(x.shape)}")
    xc = torch.view_as_complex(x.to(torch.float64).reshape(b, l, h, d // 2, 2))
    rot = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]  # [1, L, 1, D/2]
    return torch.view_as_real(xc * rot).reshape(b, l, h, d).to(x.dtype)
