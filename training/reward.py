"""The SyncNet reward of stage 2 (SPEC §9): r = Sync-C of the TAEHV-decoded rollout against the clip's speech.

    reward = load_reward("14b", "taew2_1.pth", "syncnet_v2.model", "cuda")   # or SyncReward(taehv, syncnet)
    r = reward(latents, wav)                            # latents [B, 16, L, h, w], wav [B, S] 16 kHz -> r [B]

The decoded clip is the aligned face itself, so SyncNet sees the whole frame resized to 224 x 224, **BGR, 0..255**,
against 13 MFCCs of the speech; Sync-C is the median minus the minimum of the mean embedding distance over offsets
-15..15 (``engine.quality.syncnet``: one implementation of each formula). Two formulas (``reward_sync_c``):

    release          the released reward (``sync_c_scorer.SyncCScorer``), the default: frames truncated to uint8
                     (``(x * 255).to(uint8)``) and resized without rounding, speech x 32768, each shift's distances
                     averaged over the overlapping windows only (``release_sync_c``)
    syncnet_python   ``lipforcing eval``'s protocol: frames resized and rounded to uint8, speech x 32767 rounded,
                     the zero-padded distance table

No gradient flows through the reward.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.errors import ConfigError
from ..engine.quality.syncnet import CROP_SIZE, distance_table, embed, int16_scale, mfcc, release_sync_c, sync_scores


def face_crops_bgr(frames: torch.Tensor) -> np.ndarray:
    """frames [N, 3, H, W] RGB in [0, 1] -> uint8 [N, 224, 224, 3] BGR 0..255 (the whole frame, resized)."""
    x = F.interpolate(frames.float(), size=(CROP_SIZE, CROP_SIZE), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.flip(1).permute(0, 2, 3, 1).cpu().numpy()


def release_face_crops_bgr(frames: torch.Tensor) -> np.ndarray:
    """frames [N, 3, H, W] RGB in [0, 1] -> float32 [N, 224, 224, 3] BGR 0..255 as the released reward makes them:
    truncated to uint8 at the decoder's size, then resized bilinearly without rounding."""
    u8 = (frames.float().clamp(0, 1) * 255).to(torch.uint8)
    x = F.interpolate(u8.float(), size=(CROP_SIZE, CROP_SIZE), mode="bilinear", align_corners=False)
    return x.flip(1).permute(0, 2, 3, 1).cpu().numpy()


class SyncReward:
    """SyncNet confidence (Sync-C) of decoded latents against speech."""

    def __init__(self, taehv, syncnet, *, device: torch.device | str = "cpu", formula: str = "release") -> None:
        self.taehv, self.syncnet, self.device, self.formula = taehv, syncnet, device, formula

    @torch.no_grad()
    def frames(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 16, L, h, w] -> decoded frames [B, 4L - 3, 3, 8h, 8w] in [0, 1]."""
        z = latents.to(self.device, next(self.taehv.parameters()).dtype).transpose(1, 2)
        return self.taehv.decode_video(z)

    @torch.no_grad()
    def confidence(self, frames: torch.Tensor, wav: torch.Tensor) -> torch.Tensor:
        """Decoded frames [B, N, 3, H, W] in [0, 1], wav [B, S] float 16 kHz -> Sync-C per sample [B] float32 (CPU)."""
        out = []
        for clip, speech in zip(frames, wav):
            if self.formula == "release":
                speech = speech.cpu().float().numpy()
                crops = release_face_crops_bgr(clip)
                out.append(release_sync_c(self.syncnet, crops, speech, device=self.device).sync_c)
                continue
            speech = speech.cpu().double().numpy()
            video, audio = embed(self.syncnet, face_crops_bgr(clip), mfcc(int16_scale(speech)), samples=speech.size,
                                 device=self.device)
            out.append(sync_scores(distance_table(video, audio)).sync_c)
        return torch.tensor(out, dtype=torch.float32)

    def __call__(self, latents: torch.Tensor, wav: torch.Tensor) -> torch.Tensor:
        """latents [B, 16, L, h, w], wav [B, S] -> Sync-C per sample [B] (decode, then ``confidence``)."""
        return self.confidence(self.frames(latents), wav)


def load_reward(preset: str, taehv: str | None, syncnet: str | None, device: torch.device | str,
                seed: int = 0, formula: str = "release") -> SyncReward:
    """The reward's networks: ``taew2_1.pth`` and ``syncnet_v2.model``; the tiny preset, without them, uses the tiny
    model's random TAEHV (the one ``prepare-data --preset tiny`` encodes with, same ``seed``) and a random SyncNet.
    Both frozen."""
    from ..engine.codecs.taehv import load_taehv
    from ..engine.quality.syncnet import load_syncnet, random_syncnet

    if preset != "tiny":
        missing = [flag for flag, value in (("--taehv", taehv), ("--syncnet", syncnet)) if not value]
        if missing:
            raise ConfigError(f"the SyncNet reward needs {' and '.join(missing)} (taew2_1.pth, syncnet_v2.model)")
    if taehv:
        decoder = load_taehv(taehv, device=device)
    else:
        from ..engine.tools.tiny import tiny_networks

        decoder = tiny_networks(device, seed=seed)[2]
    net = load_syncnet(syncnet, device) if syncnet else random_syncnet(seed, device)
    return SyncReward(decoder.requires_grad_(False), net.requires_grad_(False), device=device, formula=formula)
