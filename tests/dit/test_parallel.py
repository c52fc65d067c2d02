"""One stream on several ranks (sequence parallel, engine/dit/parallel.py) gives one process's frames: gloo ranks
on the CPU, spawned by engine/runtime/ranks.py; a rank that vanishes stops the others with a clear error."""

from __future__ import annotations

import time

import pytest

from lipforcing.bench.parallel_check import Spec, check, stream_x0
from lipforcing.engine.runtime.ranks import RankFailed, launch_ranks


def test_two_and_four_ranks_give_one_process_x0_on_the_tiny_model():
    document = check(Spec(model="tiny", chunks=3), [2, 4])  # chunk 0, chunk 1, the steady state
    assert document["failures"] == []
    for n, heads in (("2", 2), ("4", 1)):
        assert document["ranks"][n]["rel_err"] < 1e-6  # fp32 rounding: the sums run in another order
        assert document["ranks"][n]["cache_heads_per_rank"] == heads  # the tiny model's 4 heads, split


def test_two_and_four_ranks_give_one_process_x0_on_a_14b_wide_block():
    # dim 5120, 40 heads, every weight at its 14B shape; 16 text tokens instead of 512 (a length, not a shape)
    document = check(Spec(model="14b", layers=1, latent=4, text_len=16, chunks=2), [2, 4])
    assert document["failures"] == []
    for n, heads in (("2", 20), ("4", 10)):
        assert document["ranks"][n]["rel_err"] < 1e-6
        assert document["ranks"][n]["cache_heads_per_rank"] == heads


def test_sessions_batched_on_two_ranks_give_one_process_x0():
    """Three sessions through the engine's batcher and the static scheduler (serve --gpus 2 --max-sessions 3):
    they join at different chunks, run batched where their window shapes agree, and the first leaves early (the
    others' rows move); each session's x0 on 2 ranks equals the same sessions in one process, and the other rank
    served every batcher call. (One session on the static scheduler: test_run's run --gpus 2.)"""
    document = check(Spec(model="tiny", chunks=4, scheduler="static", sessions=3), [2])
    assert document["failures"] == []
    for n in ("2",):
        ranks = document["ranks"][n]
        assert ranks["rel_err"] < 1e-6
        assert 2 in ranks["batches"]  # sessions did run as one batch on the ranks
        assert len(ranks["served"]) == int(n) - 1
        for served in ranks["served"]:
            assert served["open_slot"] == served["close_slot"] == served["start_clip"] == 3
            assert served["run_group"] == len(ranks["batches"])


def test_a_rank_that_vanishes_stops_the_others_with_a_clear_error():
    began = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 1 of 2 (exited with status 3|failed)"):
        launch_ranks(stream_x0, 2, (Spec(model="tiny", chunks=3, fail_rank=1, fail_chunk=1),), timeout_s=30)
    assert time.monotonic() - began < 120  # no collective waits for the dead rank forever


def test_ranks_that_do_not_divide_the_heads_are_refused():
    from lipforcing.engine.dit.parallel import SequenceParallel
    from lipforcing.engine.errors import ConfigError

    sp = object.__new__(SequenceParallel)
    sp.size = 3
    with pytest.raises(ConfigError, match="3 ranks must divide the model's 4 heads"):
        sp.check(4, 16)
    sp.size = 2
    sp.check(4, 16)  # 2 divides both: accepted


def test_info_gpus_prints_the_schemes_arithmetic(capsys):
    """14B at 512x512 on 4 GPUs: per call and block, sequence parallelism sends 4 x (N-1)/N^2 of the call's bf16
    activations (3072 tokens x 5120 x 2 bytes) per rank, tensor parallelism 3 all-reduces of 2 (N-1)/N each."""
    import json

    from lipforcing.cli import main

    assert main(["info", "--model", "14b", "--gpus", "4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    calls_blocks, s = 3 * 40, 3072 * 5120 * 2
    assert plan["scheme"] == "sequence parallel" and plan["possible"]
    assert plan["per_rank"]["comm_mb"] == round(calls_blocks * 4 * 3 / 16 * s / 1e6, 1)
    tp = next(r for r in plan["schemes"] if r["scheme"] == "tensor parallel")
    assert tp["comm_mb"] == round(calls_blocks * 3 * 2 * 3 / 4 * s / 1e6, 1)
    assert plan["per_rank"]["kv_cache_gb"] == round(plan["one_gpu"]["kv_cache_gb"] / 4, 3)
    assert plan["per_rank"]["compute_ms"] == round(plan["one_gpu"]["compute_ms"] / 4, 2)
    assert main(["info", "--model", "1.3b", "--gpus", "8"]) == 0  # 12 heads: 8 GPUs cannot split them
    assert "do not divide" in capsys.readouterr().out


def test_bench_gpus_reports_the_scheme_and_each_ranks_calls(tmp_path):
    import json

    from lipforcing.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny", "--device", "cpu", "--frame-size", "240x320", "--chunks", "1",
                 "--variants", "+streams", "--gpus", "2", "--quiet", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["parallel"] == {"ranks": 2, "scheme": "sequence parallel (all-to-all over heads)"}
    result = report["results"]["+streams"]
    assert result["path"]["gpus"] == 2 and result["fps"] > 0
    (rank1,) = report["ranks"]
    assert rank1["rank"] == 1 and rank1["calls"]["run_chunk"] == result["chunks"] == 3  # chunks 0, 1 and one timed
    assert rank1["calls"]["start_clip"] == 1 and rank1["seconds"]["run_chunk"] > 0
