"""Fixtures of the application tests: a short shared clip and the tiny avatar prepared from it (once per run)."""

from __future__ import annotations

import pytest

TINY = dict(model="tiny", device="cpu", dtype="fp32", encoder="taehv")


@pytest.fixture(scope="session")
def short_video(shared_dir, tmp_path_factory):
    """The first 25 frames (1 s) of a shared clip."""
    pytest.importorskip("av")
    from lipforcing.engine.media.io import VideoWriter, probe, read_frames

    path = tmp_path_factory.mktemp("clip") / "short.mp4"
    src = shared_dir / "assets/clips/face3.mp4"
    info = probe(src)
    with VideoWriter(path, info.width, info.height) as writer:
        for frame in read_frames(src, 25):
            writer.write(frame)
    return path


@pytest.fixture(scope="session")
def tiny_avatar_file(short_video, tmp_path_factory):
    """``short_video`` prepared as an avatar of the tiny engine (seeded weights: every tiny engine accepts it)."""
    pytest.importorskip("mediapipe")
    pytest.importorskip("transformers")
    from lipforcing.engine.app.avatar import prepare_avatar
    from lipforcing.engine.app.engine import RunConfig, build_engine

    prepared = prepare_avatar(short_video, build_engine(RunConfig(**TINY)), progress=False)
    return prepared.save(tmp_path_factory.mktemp("lfa") / "face3.lfa")
