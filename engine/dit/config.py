"""Model and streaming configuration: frozen dataclasses with named presets.

    cfg = ModelConfig.from_name("1.3b")              # tiny | 1.3b | 14b
    cfg = ModelConfig.from_state_dict_shapes(shapes)  # infer from a checkpoint's tensor shapes
    stream = StreamConfig()                           # chunk 3, sink 1, window 7, t (0.999, 0.769)

Nothing here assumes a head_dim of 128, square latents or a layer count: every derived size is computed
from the fields.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Sizes of the Lip Forcing causal student (a Wan 2.1 DiT with additive audio conditioning)."""

    dim: int
    """Width of the residual stream."""
    ffn_dim: int
    """Hidden width of the feed-forward network."""
    num_heads: int
    """Attention heads; head_dim = dim // num_heads."""
    num_layers: int
    """Transformer blocks."""
    in_dim: int = 65
    """Input channels: noisy 16 + reference 16 + mask 1 + masked video 16 + reference sequence 16."""
    out_dim: int = 16
    """Latent channels predicted (flow)."""
    text_dim: int = 4096
    """Width of the text-encoder embeddings (UMT5-XXL)."""
    text_len: int = 512
    """Text positions attended by cross-attention."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep feature."""
    eps: float = 1e-6
    """Epsilon of every LayerNorm / RMSNorm in the DiT."""
    audio_dim: int = 10752
    """Per-video-frame audio feature width (14 x 768 wav2vec2 states)."""
    audio_hidden: int = 32
    """Width of the packed audio code after AudioPack."""
    audio_frames_per_latent: int = 4
    """Video frames grouped into one latent frame's audio vector."""
    audio_norm_eps: float = 1e-5
    """Epsilon of AudioPack's output LayerNorm."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(time, height, width) patch of the patch embedding."""
    rope_theta: float = 10000.0
    """RoPE base."""
    audio_blocks: tuple[int, ...] | None = None
    """0-based blocks that receive audio; default 2 .. num_layers // 2."""
    rope_pairs_thw: tuple[int, int, int] | None = None
    """Complex RoPE pairs per axis (temporal, row, column); default c - 2(c//3), c//3, c//3."""
    face_size: int = 512
    """Side of the aligned face crops the student runs on (SPEC §8: 512x512, latents 64x64). The random-weight
    tiny model runs on 256x256 crops: a quarter of the codecs' and the student's work, for demos and tests."""

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.audio_blocks is None:
            object.__setattr__(self, "audio_blocks", tuple(range(2, self.num_layers // 2 + 1)))
        if self.rope_pairs_thw is None:
            c = self.head_dim // 2
            object.__setattr__(self, "rope_pairs_thw", (c - 2 * (c // 3), c // 3, c // 3))
        if sum(self.rope_pairs_thw) != self.head_dim // 2:
            raise ValueError(f"rope_pairs_thw {self.rope_pairs_thw} must sum to head_dim/2 = {self.head_dim // 2}")
        if any(not 0 <= b < self.num_layers for b in self.audio_blocks):
            raise ValueError(f"audio_blocks {self.audio_blocks} outside 0..{self.num_layers - 1}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def face_stream(self, height: int | None = None, width: int | None = None, **kw) -> StreamConfig:
        """The stream at height x width pixels, by default this model's face crops (latents face_size / 8 on a
        side)."""
        return StreamConfig.for_resolution(self.face_size if height is None else height,
                                           self.face_size if width is None else width, **kw)

    @property
    def num_audio_projections(self) -> int:
        return len(self.audio_blocks)

    @property
    def patch_dim(self) -> int:
        """Values per output token: out_dim x patch volume (64 for the released model)."""
        pt, ph, pw = self.patch_size
        return self.out_dim * pt * ph * pw

    @staticmethod
    def from_name(name: str) -> ModelConfig:
        try:
            return PRESETS[name.lower()]
        except KeyError:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def from_state_dict_shapes(shapes: Mapping[str, Sequence[int]], *, num_heads: int | None = None) -> ModelConfig:
        """Infer the config from a checkpoint's tensor shapes (key -> shape).

        Head count is not visible in the weights; it is taken from ``num_heads``, else from the preset
        with the same width, else head_dim 128 is assumed (as in every released Wan model)."""
        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise ValueError(f"cannot infer the model config: checkpoint has no tensor {key!r}")
            return tuple(shapes[key])

        dim, in_dim, pt, ph, pw = shape("patch_embedding.weight")
        ffn_dim = shape("blocks.0.ffn.0.weight")[0]
        text_dim = shape("text_embedding.0.weight")[1]
        freq_dim = shape("time_embedding.0.weight")[1]
        patch_dim = shape("head.head.weight")[0]
        audio_hidden, packed = shape("audio_proj.proj.weight")
        block_ids = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
        num_layers = max(block_ids) + 1
        num_proj = len({int(m.group(1)) for k in shapes if (m := re.match(r"audio_cond_projs\.(\d+)\.", k))})
        if num_heads is None:
            same_width = [p for p in PRESETS.values() if p.dim == dim]
            num_heads = same_width[0].num_heads if same_width else max(1, dim // 128)
        audio_blocks = tuple(range(2, 2 + num_proj))
        return ModelConfig(
            dim=dim, ffn_dim=ffn_dim, num_heads=num_heads, num_layers=num_layers, in_dim=in_dim,
            out_dim=patch_dim // (pt * ph * pw), text_dim=text_dim, freq_dim=freq_dim,
            audio_hidden=audio_hidden, audio_dim=packed // 4, patch_size=(pt, ph, pw), audio_blocks=audio_blocks,
        )


PRESETS: dict[str, ModelConfig] = {
    # random-weight demos and tests: audio_dim matches the tiny wav2vec2 of demo_models (4 x 64)
    "tiny": ModelConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=4, text_len=16, audio_dim=256, face_size=256),
    "1.3b": ModelConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14b": ModelConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """How the student is run as a stream of chunks (SPEC §2, §5)."""

    chunk_frames: int = 3
    """Latent frames denoised together per chunk."""
    sink_frames: int = 1
    """First latent frames of the clip, never evicted from the cache."""
    window_frames: int = 7
    """Largest number of latent frames visible to a chunk (sink + rolling, the chunk included)."""
    t_list: tuple[float, ...] = (0.999, 0.769)
    """Denoising times of the calls made per chunk."""
    commit_t: float = 0.0
    """Time of the commit call that writes the chunk's keys/values into the cache."""
    dynamic_rope: bool = True
    """Re-rotate the whole window with window-relative temporal positions on every call."""
    latent_h: int = 64
    """Latent rows (pixel height / 8)."""
    latent_w: int = 64
    """Latent columns (pixel width / 8)."""

    def __post_init__(self) -> None:
        if self.window_frames < self.sink_frames + self.chunk_frames:
            raise ValueError(
                f"window_frames {self.window_frames} must hold sink {self.sink_frames} + chunk {self.chunk_frames}"
            )
        if not self.dynamic_rope:
            raise ValueError("only dynamic RoPE (window-relative positions) is implemented; it is what was released")

    def replace(self, **changes) -> StreamConfig:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def for_resolution(height: int, width: int, **kw) -> StreamConfig:
        if height <= 0 or width <= 0 or height % 16 or width % 16:
            raise ValueError(f"resolution {height}x{width} must be a positive multiple of 16 (VAE 8x and patch 2x)")
        return StreamConfig(latent_h=height // 8, latent_w=width // 8, **kw)


def tokens_per_frame(model: ModelConfig, stream: StreamConfig) -> int:
    _, ph, pw = model.patch_size
    return (stream.latent_h // ph) * (stream.latent_w // pw)
