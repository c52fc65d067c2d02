"""The engine: its configuration, the weights check, text embeddings, and the path it reports."""

from __future__ import annotations

import pytest
import torch

from lipforcing.engine.app.engine import RunConfig, Weights, missing_weights
from lipforcing.engine.dit.checkpoint import load_text_embeds
from lipforcing.engine.dit.config import ModelConfig
from lipforcing.engine.errors import ConfigError, WeightsError

CFG = ModelConfig.from_name("tiny")


def test_text_embeds_accept_tensor_2d_and_dict(tmp_path):
    emb = torch.randn(1, 16, 4096)
    for name, obj in (("a.pt", emb), ("b.pt", emb[0]), ("c.pt", {"context": emb})):
        torch.save(obj, tmp_path / name)
        assert torch.equal(load_text_embeds(str(tmp_path / name), CFG.text_dim), emb)
    torch.save(torch.randn(1, 16, 512), tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=r"\[1, text_len, 4096\]"):
        load_text_embeds(str(tmp_path / "bad.pt"), CFG.text_dim)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="cannot read"):
        load_text_embeds(str(tmp_path / "junk.pt"), CFG.text_dim)


def test_missing_weights_depend_on_the_codecs(tmp_path):
    assert missing_weights(RunConfig(model="tiny"), Weights()) == []
    lines = missing_weights(RunConfig(model="14b", encoder="taehv", decoder="taehv"), Weights())
    flags = {line.split()[0] for line in lines}
    assert flags == {"--ckpt", "--taehv", "--wav2vec", "--text-embeds"}  # no Wan VAE needed
    present = tmp_path / "x.pth"
    present.write_bytes(b"")
    lines = missing_weights(RunConfig(model="1.3b"), Weights(ckpt=str(present), vae=str(tmp_path / "nope")))
    assert not any(line.startswith("--ckpt") for line in lines)
    assert any(line.startswith("--vae") and "does not exist" in line for line in lines)


def test_run_config_defaults_and_checks():
    cfg = RunConfig(model="tiny", device="cpu")
    assert (cfg.scheduler, cfg.pipeline, cfg.encoder_group_frames, cfg.decoder_group_latents) == \
        ("static", "sequential", 4, 1)  # on a CPU the stages run in turn; on CUDA on device streams
    assert RunConfig(model="tiny", device="cuda").pipeline == "streams"
    ref = RunConfig.reference(model="tiny", device="cpu")
    assert (ref.scheduler, ref.pipeline, ref.backend, ref.decoder_backend) == \
        ("reference", "sequential", "reference", "torch")
    for bad, match in ((dict(scheduler="fast"), "unknown scheduler"), (dict(pipeline="x"), "unknown pipeline"),
                       (dict(compile=True, scheduler="reference"), "static scheduler"),
                       (dict(cuda_graphs=True), "CUDA graphs"), (dict(dtype="int8"), "unknown dtype")):
        with pytest.raises(ConfigError, match=match):
            RunConfig(model="tiny", device="cpu", **bad)


def test_the_audio_encoder_is_loaded_once_by_sessions_starting_together():
    """Live sessions in several threads reach wav2vec2 at once: one load (imports are not thread-safe). The load
    lasts until every thread has found the encoder unloaded and is waiting for it, so they all meet it."""
    import threading

    from lipforcing.engine.app.engine import AudioEncoder

    threads_at_once = 4
    loads, arrived, everyone_waits = [], [], threading.Event()

    class CountingLock:
        """The encoder's lock, counting the threads that reach it."""

        def __init__(self) -> None:
            self.lock = threading.Lock()

        def __enter__(self):
            arrived.append(threading.get_ident())
            if len(arrived) == threads_at_once:
                everyone_waits.set()
            self.lock.acquire()

        def __exit__(self, *exc) -> None:
            self.lock.release()

    def load():
        loads.append(threading.get_ident())
        everyone_waits.wait(timeout=30)  # a slow load: every other thread arrives meanwhile
        return torch.nn.Identity()

    class Features(torch.nn.Module):
        def forward(self, speech, n_frames):
            return torch.zeros(n_frames, 4)

    encoder = AudioEncoder(lambda: (load(), Features())[1], torch.device("cpu"))
    encoder._lock = CountingLock()
    results = []
    threads = [threading.Thread(target=lambda: results.append(encoder(None, 3).shape))
               for _ in range(threads_at_once)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert everyone_waits.is_set() and len(arrived) == threads_at_once  # they met the load in progress
    assert len(loads) == 1 and results == [torch.Size([3, 4])] * threads_at_once


def test_each_model_runs_on_its_face_crops():
    """The released models see 512x512 crops (SPEC §8); the tiny one 256x256, in every part of its engine: the
    aligner, the masks and the stream's latents."""
    from lipforcing.engine.app.engine import build_engine

    assert [ModelConfig.from_name(m).face_stream().latent_h for m in ("1.3b", "14b", "tiny")] == [64, 64, 32]
    engine = build_engine(RunConfig(model="tiny", device="cpu", dtype="fp32", encoder="taehv"))
    assert engine.face_size == 256 and engine.aligner.size == 256
    assert engine.keep_pixels.shape == engine.soft_mask.shape == (256, 256)
    assert (engine.stream.latent_h, engine.stream.latent_w) == (32, 32)
    assert engine.mask_latent.shape[-2:] == (32, 32)
