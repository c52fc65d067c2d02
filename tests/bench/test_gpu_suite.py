"""``bench/gpu_suite.sh --dry-run``: every step of the GPU suite runs on this CPU (tiny model, a few chunks) with
the packages the device image lacks blocked, so a suite that would fail on the device fails here. The reports it
writes are also the CPU checks of ``lipforcing bench`` (the ablation, the quality gate, sessions on an avatar)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from lipforcing.bench.report import validate
from lipforcing.bench.session import ABLATION
from lipforcing.cli import main

BENCH = ["bench", "--device", "cpu", "--frame-size", "240x320", "--chunks", "1", "--quiet"]
STEPS = ("kernels", "device-check", "bench-1.3b", "bench-14b", "sessions-1.3b", "quality-1.3b", "parallel")


@pytest.fixture(scope="session")
def dry_run(tmp_path_factory):
    """(exit status, output folder, stdout) of one dry run, shared by the tests below."""
    out = tmp_path_factory.mktemp("gpu-suite")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the suite decides for itself
    env.update(PYTHON=sys.executable, OUT=str(out))
    proc = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_suite.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=1200)
    return proc.returncode, out, proc.stdout + proc.stderr


def _report(out, step: str) -> dict:
    return json.loads((out / f"cpu-dryrun-{step}.json").read_text())


def test_dry_run_passes_every_step_on_the_device_image_packages(dry_run):
    rc, out, stdout = dry_run
    assert rc == 0, stdout[-3000:]
    summary = stdout[stdout.index("== summary"):]
    for step in ("1 kernels", "2+3 triton, graphs, streams", "4 session bench", "5 session bench", "6 sessions",
                 "7 quality gate", "8 one stream on 2 GPUs"):
        assert step in summary
    assert "exit   0" in summary and "exit 1" not in summary.replace("exit   0", "")
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["env.txt", "suite.log", *(f"cpu-dryrun-{s}.json" for s in STEPS)])  # <= 10, no caches
    log = (out / "suite.log").read_text()
    assert "ModuleNotFoundError" not in log and "Traceback" not in log
    for step in STEPS[1:-1]:
        assert _report(out, step)["complete"] is True, step
    parallel = _report(out, "parallel")  # gloo ranks here; NCCL, one GPU each, on a device with two
    assert parallel["failures"] == [] and parallel["ranks"]["2"]["rel_err"] < 1e-6
    check = _report(out, "device-check")
    assert check["failures"] == [] and check["models"][0]["static_vs_reference_rel_err"] == [0.0, 0.0, 0.0]


def test_the_device_image_blocks_what_it_lacks():
    """Under bench/device_image, importing a package the device image lacks fails as if it were not installed,
    and find_spec answers None (libraries that probe for optional packages carry on)."""
    code = ("import importlib.util as u\n"
            "assert u.find_spec('mediapipe') is None and u.find_spec('av') is None\n"
            "try:\n    import av\nexcept ModuleNotFoundError as e:\n    print('blocked', e.name)\n"
            "import numpy, torch\n")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "bench" / "device_image"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "blocked av", proc.stderr


def test_bench_measures_the_session_with_the_ablation(dry_run):
    _, out, _ = dry_run
    report = _report(out, "bench-1.3b")
    assert validate(report) == []
    assert report["device"]["type"] == "cpu" and "CPU figures" in report["device"]["note"]
    assert list(ABLATION) == ["reference", "+kernels", "+graphs", "+streams", "+decoder", "+sdpa", "+fp8"]
    results = report["results"]
    # the dry run measures each variant once across the steps: up to +decoder in step 4, +sdpa in step 5 (the same
    # tiny model and frames), +fp8 in the quality gate (step 7)
    assert list(results) == ["reference", "+kernels", "+graphs", "+streams", "+decoder"]
    sdpa = _report(out, "bench-14b")
    assert validate(sdpa) == [] and list(sdpa["results"]) == ["+sdpa"]
    assert sdpa["results"]["+sdpa"]["path"]["attention"] == "sdpa" and sdpa["results"]["+sdpa"]["fps"] > 0
    fp8 = _report(out, "quality-1.3b")["results"]["+fp8"]
    assert fp8["path"]["dtype"] == "fp8" and fp8["path"]["kv_cache"] == "float8_e4m3fn"
    assert fp8["fps"] > 0 and results["+streams"]["path"]["kv_cache"] == "float32"
    # no CUDA here: the Triton kernels cannot run, so +kernels is the reference path; the others run
    assert results["+kernels"]["same_path_as"] == "reference"
    assert any("Triton" in why for why in results["+kernels"]["skipped"])
    assert results["reference"]["path"]["scheduler"] == "reference"
    assert results["+graphs"]["path"]["scheduler"] == "static" and not results["+graphs"]["path"]["cuda_graphs"]
    assert results["+streams"]["path"]["pipeline"] == "streams"
    for name in ("reference", "+graphs", "+streams"):
        res = results[name]
        assert res["frames"] == 33 and res["chunks"] == 3  # chunks 0 and 1, then the timed one
        assert res["fps"] > 0 and res["ttff_ms"] > 0
        assert {"face alignment", "encode", "student", "decode", "paste-back"} <= set(res["stage_ms"])
        assert res["path"]["face"] == "box"  # the drawn face's known box: no detector on the device
    assert results["reference"]["speedup_vs_reference"] == 1.0
    for key in ("fps", "ttff_ms", "stage_ms", "achieved_tflops", "path", "skipped", "complete"):
        assert key in report["fields"]


def test_quality_gate_compares_every_fast_path_with_the_reference(dry_run):
    _, out, _ = dry_run
    report = _report(out, "quality-1.3b")
    results = report["results"]
    # the reference against a second run of itself is exact; the fast path on fp8 reproduces it (the fast path
    # itself equals the reference frame for frame: tests/app/test_session.py)
    assert results["reference"]["quality"]["drop_pct"] == 0 and results["reference"]["quality"]["psnr"] == "inf"
    assert list(results) == ["reference", "+fp8"]  # the dry run's gate: the device runs every variant
    for name in ("+fp8",):
        assert results[name]["quality"]["drop_pct"] <= 1, results[name]["quality"]
        assert "syncnet_v2.model" in results[name]["quality"]["note"]  # Sync-C needs weights: said, not faked
    assert results["+fp8"]["quality"]["psnr"] != "inf"  # the fp8 student ran: its frames are not bit-exact
    assert report["quality_gate"] == {"max_drop_pct": 1.0, "failures": []}


def test_avatar_bench_reports_each_number_of_sessions(dry_run):
    _, out, _ = dry_run
    report = _report(out, "sessions-1.3b")
    assert validate(report) == []
    assert set(report["results"]) == {"avatar-1", "avatar-2"}
    two = report["results"]["avatar-2"]
    assert two["sessions"] == 2 and len(two["fps_per_session"]) == 2 and two["fps"] > 0
    assert two["frames"] == 2 * 33 and two["path"]["avatar"] and two["path"]["max_sessions"] == 2
    assert "encode" not in two["stage_ms"] and "face alignment" not in two["stage_ms"]
    # every chunk call of the two sessions is counted once, alone or batched (whether the two met in one batch
    # depends on thread timing here; tests/runtime/test_batcher.py batches them deterministically)
    assert sum(int(size) * calls for size, calls in two["batch_sizes"].items()) == two["chunks"] == 2 * 3


def test_bench_writes_each_variant_as_it_is_done(tmp_path, monkeypatch):
    """A run that dies in its second variant leaves a valid report with the first variant's figures."""
    from lipforcing.bench import session

    measure, calls = session._measure, []

    def dies_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    monkeypatch.setattr(session, "_measure", dies_second)
    out = tmp_path / "partial.json"
    cfg = session.BenchConfig(model="tiny", device="cpu", dtype="fp32", encoder="taehv", frame_hw=(240, 320),
                              chunks=1, variants=("reference", "+graphs"), progress=False)
    with pytest.raises(KeyboardInterrupt):
        session.run_bench(cfg, out=out)
    report = json.loads(out.read_text())
    assert report["complete"] is False and list(report["results"]) == ["reference"]
    assert report["results"]["reference"]["frames"] == 33


def test_bench_compare_exit_status(dry_run, tmp_path, monkeypatch, capsys):
    _, out, _ = dry_run
    report = _report(out, "bench-1.3b")
    faster = copy.deepcopy(report)
    for res in faster["results"].values():
        if "fps" in res:
            res["fps"] *= 100  # a baseline 100x faster than anything this run can reach: a regression
    base = tmp_path / "fast.json"
    base.write_text(json.dumps(faster))
    args = [*BENCH, "--variants", "reference"]
    # The measurement is the dry run's (step 4 ran this command line with more variants): the command gets that
    # report's reference for its own configuration, and gates it against the baseline.
    from lipforcing.bench import commands

    measured = []

    def recorded(cfg, out=None):
        measured.append(cfg)
        return {**copy.deepcopy(report), "results": {k: report["results"][k] for k in cfg.variants}}

    monkeypatch.setattr(commands, "run_bench", recorded)
    assert main([*args, "--compare", str(base), "--max-regression", "5"]) == 1
    assert [c.variants for c in measured] == [("reference",)] and measured[0].frame_hw == (240, 320)
    printed = capsys.readouterr().out
    assert "compare: FAIL reference: " in printed and "a regression beyond 5%" in printed, printed
    assert main([*args, "--compare", str(tmp_path / "absent.json")]) == 2
    elsewhere = copy.deepcopy(report)
    elsewhere["device"]["name"] = "another machine"
    base.write_text(json.dumps(elsewhere))
    assert main([*args, "--compare", str(base)]) == 2  # refused before measuring
