"""The SyncNet reward of stage 2 (SPEC §9): r = Sync-C of the TAEHV-decoded rollout against the clip's speech.

    reward = SyncReward(taehv, syncnet)                 # engine.codecs.taehv.TAEHV, engine.quality.syncnet.SyncNet
    r = reward(latents, wav)                            # latents [B, 16, L, h, w], wav [B, S] 16 kHz -> r [B]

The decoded clip is the aligned face itself, so SyncNet sees the whole frame resized to 224 x 224, **BGR, 0..255**
(as ``syncnet_python`` feeds it), against 13 MFCCs of the **int16-scaled** speech; Sync-C is the median minus the
minimum of the mean embedding distance over offsets -15..15 (``engine.quality.syncnet``: one implementation of the
protocol). No gradient flows through the reward.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.quality.syncnet import CROP_SIZE, distance_table, embed, int16_scale, mfcc, sync_scores


def face_crops_bgr(frames: torch.Tensor) -> np.ndarray:
    """frames [N, 3, H, W] RGB in [0, 1] -> uint8 [N, 224, 224, 3] BGR 0..255 (the whole frame, resized)."""
    x = F.interpolate(frames.float(), size=(CROP_SIZE, CROP_SIZE), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.flip(1).permute(0, 2, 3, 1).cpu().numpy()


class SyncReward:
    """SyncNet confidence of decoded latents; ``scale`` is how the generator loss uses it (weight exp(scale r))."""

    def __init__(self, taehv, syncnet, *, device: torch.device | str = "cpu") -> None:
        self.taehv, self.syncnet, self.device = taehv, syncnet, device

    @torch.no_grad()
    def frames(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 16, L, h, w] -> decoded frames [B, 4L - 3, 3, 8h, 8w] in [0, 1]."""
        z = latents.to(self.device, next(self.taehv.parameters()).dtype).transpose(1, 2)
        return self.taehv.decode_video(z)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, wav: torch.Tensor) -> torch.Tensor:
        """latents [B, 16, L, h, w], wav [B, S] float 16 kHz -> Sync-C per sample [B] float32 (CPU)."""
        frames = self.frames(latents)
        out = []
        for clip, speech in zip(frames, wav):
            speech = speech.cpu().double().numpy()
            crops = face_crops_bgr(clip)
            video, audio = embed(self.syncnet, crops, mfcc(int16_scale(speech)), samples=speech.size,
                                 device=self.device)
            out.append(sync_scores(distance_table(video, audio)).sync_c)
        return torch.tensor(out, dtype=torch.float32)
