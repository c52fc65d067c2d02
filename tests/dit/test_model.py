"""The student network: audio packing, unpatchify, full-sequence vs streaming, dtypes, released key set."""

from __future__ import annotations

import torch

from conftest import TOLERANCE
from lipforcing.engine.dit.attention import RopeTable, StreamingAttention
from lipforcing.engine.dit.cache import SinkWindowCache
from lipforcing.engine.dit.config import ModelConfig, StreamConfig
from lipforcing.engine.dit.full_sequence import FullSequenceAttention
from lipforcing.engine.dit.model import AudioPack, CausalWanStudent
from lipforcing.engine.numerics import rel_error
from lipforcing.engine.runtime.sampler import StreamingSampler

MICRO = ModelConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=4, text_len=5, audio_dim=8)
STREAM = StreamConfig(latent_h=4, latent_w=6)


def test_audio_packing_groups_video_frames_per_latent_frame():
    """Latent frame 0 sees video frames {0,0,0,0}; latent frame k >= 1 sees {4k-3 .. 4k}."""
    cfg = MICRO
    pack = AudioPack(cfg)
    num_latent = 5
    v = 1 + 4 * (num_latent - 1)
    audio = torch.arange(v, dtype=torch.float32)[None, :, None].expand(1, v, cfg.audio_dim).contiguous()
    seen = {}

    def capture(module, inputs):
        seen["packed"] = inputs[0]

    pack.proj.register_forward_pre_hook(capture)
    codes = pack(audio)
    assert codes.shape == (1, num_latent, cfg.audio_hidden)
    packed = seen["packed"].reshape(1, num_latent, 4, cfg.audio_dim)  # frame-in-group major, channel minor
    assert packed[0, 0, :, 0].tolist() == [0, 0, 0, 0]
    for k in range(1, num_latent):
        assert packed[0, k, :, 0].tolist() == list(range(4 * k - 3, 4 * k + 1))
    assert (packed == packed[..., :1]).all()  # channels stay inside their frame's slot


def _clip(model: CausalWanStudent, num_latent: int):
    v = 1 + 4 * (num_latent - 1)
    return model.prepare_clip(torch.randn(1, MICRO.text_len, 4096), torch.randn(1, v, MICRO.audio_dim))


def test_full_sequence_block_causal_equals_streaming_before_eviction():
    """Two chunks: the full-sequence path with per-frame t (chunk 0 clean at t = 0, chunk 1 noisy) equals the
    streaming commit call of chunk 0 followed by chunk 1's denoising call."""
    torch.manual_seed(0)
    model = CausalWanStudent(MICRO).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    clip = _clip(model, 6)
    x_in = torch.randn(1, 65, 6, 4, 6)
    t = torch.tensor([[0.0] * 3 + [0.769] * 3], dtype=torch.float64)
    with torch.no_grad():
        full = model(x_in, t, clip, FullSequenceAttention(MICRO, STREAM, 6, block_causal=True, device="cpu"))
        cache, rope = SinkWindowCache(MICRO, STREAM), RopeTable(MICRO, STREAM, "cpu")
        plan = cache.begin_chunk(0)
        ctx = StreamingAttention(cache, plan, rope, write=True, backend="reference")
        commit = model(x_in[:, :, :3], 0.0, clip, ctx, start_frame=0)
        cache.commit()
        plan = cache.begin_chunk(3)
        ctx = StreamingAttention(cache, plan, rope, write=False, backend="reference")
        second = model(x_in[:, :, 3:], 0.769, clip, ctx, start_frame=3)
    assert rel_error(full[:, :, :3], commit) < TOLERANCE[torch.float32]
    assert rel_error(full[:, :, 3:], second) < TOLERANCE[torch.float32]
    bidir = model(x_in, t, clip, FullSequenceAttention(MICRO, STREAM, 6, block_causal=False, device="cpu"))
    assert rel_error(bidir[:, :, :3], commit) > 1e-3  # chunk 0 now sees chunk 1


def test_full_sequence_path_has_gradients():
    """Every parameter gets a finite, non-zero gradient, and the gradient is the loss's derivative: for three weights
    (self-attention, audio projection, text embedding) a central finite difference along the gradient's direction
    equals the gradient's norm (float32 throughout: a step of 1e-2 keeps rounding and curvature near 3e-3)."""
    model = CausalWanStudent(MICRO)
    g = torch.Generator().manual_seed(1)
    text = torch.randn(1, MICRO.text_len, 4096, generator=g)
    audio = torch.randn(1, 1 + 4 * 5, MICRO.audio_dim, generator=g)
    x, t = torch.randn(1, 65, 6, 4, 6, generator=g), torch.rand(1, 6, generator=g)

    def loss() -> torch.Tensor:
        clip = model.clip_conditioning(text, audio)
        ctx = FullSequenceAttention(MICRO, STREAM, 6, block_causal=False, device="cpu")
        return model(x, t, clip, ctx).square().mean()

    loss().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    weights = [model.blocks[0].self_attn.q.weight, model.audio_cond_projs[0].weight, model.text_embedding[0].weight]
    eps = 1e-2
    for w in weights:
        direction = w.grad / w.grad.norm()
        with torch.no_grad():
            w.add_(eps * direction)
            up = loss()
            w.sub_(2 * eps * direction)
            down = loss()
            w.add_(eps * direction)
        numeric = (up - down) / (2 * eps)
        assert abs(numeric - w.grad.norm()) < 1e-2 * w.grad.norm(), (tuple(w.shape), float(numeric))


def _run(model: CausalWanStudent, dtype: torch.dtype, seed: int = 5) -> torch.Tensor:
    """One clip through the reference sampler seeded with ``seed``; the inputs come from their own generator, so
    the global RNG plays no part."""
    g = torch.Generator().manual_seed(3)
    stream = StreamConfig(latent_h=6, latent_w=4)  # non-square
    sampler = StreamingSampler(model.to(dtype), stream, backend="reference", seed=seed)
    sampler.start_clip(torch.randn(1, MICRO.text_len, 4096, generator=g),
                       torch.randn(1, 1 + 4 * 8, MICRO.audio_dim, generator=g),
                       torch.randn(1, 16, 1, 6, 4, generator=g), (torch.rand(1, 1, 1, 6, 4, generator=g) > 0.5).float())
    lat = torch.randn(1, 16, 9, 6, 4, generator=g)
    return torch.cat([c.x0 for c in sampler.run_clip(lat, lat)], dim=2)


def test_bf16_execution_tracks_fp32():
    torch.manual_seed(0)
    model = CausalWanStudent(MICRO).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    ref = _run(model, torch.float32)
    out = _run(model, torch.bfloat16)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert rel_error(out, ref) < TOLERANCE[torch.bfloat16]


def test_seeded_noise_is_reproducible():
    """The sampler's seed alone decides the noise: the same seed gives the same clip whatever the global RNG's
    state, another seed gives another clip."""
    torch.manual_seed(0)
    model = CausalWanStudent(MICRO).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    torch.manual_seed(1)
    a = _run(model, torch.float32)
    torch.manual_seed(2)
    assert torch.equal(_run(model, torch.float32), a)
    assert rel_error(_run(model, torch.float32, seed=6), a) > 1e-2


def _spec_14b_shapes() -> dict[str, tuple[int, ...]]:
    """SPEC §10 key list for 14B, written out independently of the model code."""
    d, ffn, text, hidden, packed = 5120, 13824, 4096, 32, 43008
    s = {
        "patch_embedding.weight": (d, 65, 1, 2, 2), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, text), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, 256), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.head.weight": (64, d), "head.head.bias": (64,), "head.modulation": (1, 2, d),
        "audio_proj.proj.weight": (hidden, packed), "audio_proj.proj.bias": (hidden,),
        "audio_proj.norm_out.weight": (hidden,), "audio_proj.norm_out.bias": (hidden,),
    }
    for i in range(40):
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                s[f"blocks.{i}.{attn}.{p}.weight"] = (d, d)
                s[f"blocks.{i}.{attn}.{p}.bias"] = (d,)
            s[f"blocks.{i}.{attn}.norm_q.weight"] = (d,)
            s[f"blocks.{i}.{attn}.norm_k.weight"] = (d,)
        s[f"blocks.{i}.norm3.weight"] = (d,)
        s[f"blocks.{i}.norm3.bias"] = (d,)
        s[f"blocks.{i}.ffn.0.weight"] = (ffn, d)
        s[f"blocks.{i}.ffn.0.bias"] = (ffn,)
        s[f"blocks.{i}.ffn.2.weight"] = (d, ffn)
        s[f"blocks.{i}.ffn.2.bias"] = (d,)
        s[f"blocks.{i}.modulation"] = (1, 6, d)
    for j in range(19):
        s[f"audio_cond_projs.{j}.weight"] = (d, hidden)
        s[f"audio_cond_projs.{j}.bias"] = (d,)
    return s


def test_14b_key_set_and_shapes_match_the_release():
    with torch.device("meta"):
        model = CausalWanStudent(ModelConfig.from_name("14b"))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = _spec_14b_shapes()
    assert len(got) == len(expected) == 1137
    assert got == expected
    assert ModelConfig.from_state_dict_shapes(got) == ModelConfig.from_name("14b")


def test_1_3b_config_and_inference_from_shapes():
    cfg = ModelConfig.from_name("1.3b")
    assert cfg.num_audio_projections == 14 and cfg.audio_blocks == tuple(range(2, 16))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CausalWanStudent(cfg).state_dict().items()}
    assert ModelConfig.from_state_dict_shapes(shapes) == cfg
    # a width no preset has: head_dim 128 assumed unless told
    odd = ModelConfig(dim=384, ffn_dim=64, num_heads=6, num_layers=3)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CausalWanStudent(odd).state_dict().items()}
    assert ModelConfig.from_state_dict_shapes(shapes, num_heads=6) == odd
    assert ModelConfig.from_state_dict_shapes(shapes).head_dim == 128


def test_batched_sampler_equals_separate_clips():
    torch.manual_seed(0)
    model = CausalWanStudent(MICRO).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(4)
    text, audio = torch.randn(2, MICRO.text_len, 4096, generator=g), torch.randn(2, 1 + 4 * 5, 8, generator=g)
    ref, mask = torch.randn(2, 16, 1, 4, 6, generator=g), (torch.rand(2, 1, 1, 4, 6, generator=g) > 0.5).float()
    lat, noise, renoise = (torch.randn(2, 16, 6, 4, 6, generator=g) for _ in range(3))

    def run(sl, batch):
        sampler = StreamingSampler(model, STREAM, batch=batch, backend="reference")
        sampler.start_clip(text[sl], audio[sl], ref[sl], mask[sl])
        return torch.cat([c.x0 for c in sampler.run_clip(lat[sl], lat[sl], noise[sl], [renoise[sl]])], dim=2)

    both = run(slice(0, 2), 2)
    assert rel_error(both[:1], run(slice(0, 1), 1)) < TOLERANCE[torch.float32]
    assert rel_error(both[1:], run(slice(1, 2), 1)) < TOLERANCE[torch.float32]


def test_unknown_or_unavailable_backend_is_a_config_error(monkeypatch):
    import pytest

    from lipforcing.engine.dit.attention import resolve_backend
    from lipforcing.engine.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown backend"):
        resolve_backend("fast", "cpu")
    monkeypatch.setattr("lipforcing.kernels.triton_available", lambda device: (False, "no triton here"))
    with pytest.raises(ConfigError, match="no triton here"):
        resolve_backend("triton", "cpu")


def test_triton_is_checked_where_the_tensors_are_not_on_the_host(monkeypatch):
    """A CPU model on a host with a GPU cannot use the kernels outside the interpreter; CUDA tensors can."""
    import pytest

    from lipforcing.engine.dit.attention import resolve_backend
    from lipforcing.engine.errors import ConfigError
    from lipforcing.kernels import triton_available

    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a patched GPU")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("LIPFORCING_BACKEND", raising=False)
    ok, why = triton_available(torch.device("cpu"))
    assert not ok and "TRITON_INTERPRET=1" in why
    assert triton_available(torch.device("cuda"))[0]
    with pytest.raises(ConfigError, match="model on cpu .*TRITON_INTERPRET=1"):
        resolve_backend("triton", "cpu")
    assert resolve_backend(None, "cpu") == "reference"
    assert resolve_backend(None, "cuda") == resolve_backend("triton", "cuda") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs the kernels on CPU tensors
    assert triton_available("cpu")[0] and resolve_backend("triton", "cpu") == "triton"


def test_text_modules_are_exactly_the_weights_only_text_kv_uses():
    """What ``offload_text_weights`` moves to the host is used by the text K/V and by nothing a chunk's call
    runs once those K/V are cached."""
    torch.manual_seed(0)
    model = CausalWanStudent(MICRO)
    text_only = {id(p) for m in model.text_modules() for p in m.parameters()}
    kv = model.text_kv(torch.randn(1, MICRO.text_len, 4096))
    sum(k.sum() + v.sum() for k, v in kv).backward()
    used_by_text = {id(p) for p in model.parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    clip = model.clip_conditioning(torch.randn(1, MICRO.text_len, 4096), torch.randn(1, 1 + 4 * 5, MICRO.audio_dim))
    cached = [(k.detach(), v.detach()) for k, v in clip.text_kv]
    e, e0 = model.time_modulation(torch.tensor(0.5), 1)
    ctx = FullSequenceAttention(MICRO, STREAM, 3, block_causal=False, device="cpu")
    codes = clip.audio_codes[:, :3].detach()
    model.forward_static(torch.randn(1, 65, 3, 4, 6), e, e0, codes, cached, ctx).sum().backward()
    used_by_call = {id(p) for p in model.parameters() if p.grad is not None}
    assert used_by_text == text_only
    assert not used_by_text & used_by_call
    assert len(text_only) == 4 + 5 * MICRO.num_layers  # text embedding (2 x weight, bias) + k, v, norm_k per block
