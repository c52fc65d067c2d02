"""``lipforcing bench``: the JSON schema, the regression gate, a CPU run of the session ablation;
``lipforcing compile`` on CPU."""

from __future__ import annotations

import copy
import json

import pytest

from lipforcing.bench.report import SCHEMA, compare, validate
from lipforcing.cli import main
from lipforcing.engine.errors import ConfigError

PATH = {"scheduler": "static", "pipeline": "streams"}


def _report(fps_ref: float = 10.0, fps_opt: float = 30.0) -> dict:
    def res(fps):
        return {"fps": fps, "ttff_ms": 50.0, "stage_ms": {"student": 20.0}, "chunk_ms": 12 / fps * 1e3,
                "frames": 240, "chunks": 20, "path": PATH}

    return {"schema": SCHEMA, "fields": {}, "device": {"type": "cuda", "name": "H100"}, "config": {"model": "1.3b"},
            "results": {"reference": res(fps_ref), "optimized": res(fps_opt)}}


def test_compare_flags_a_regression_beyond_the_bound():
    base = _report()
    failures, _ = compare(_report(fps_opt=27.0), base, max_regression_pct=5.0)  # -10%
    assert len(failures) == 1 and "optimized" in failures[0] and "-10.0%" in failures[0]
    failures, notes = compare(_report(fps_opt=29.0), base, max_regression_pct=5.0)  # -3.3%: within
    assert failures == [] and any("within bounds" in n for n in notes)


def test_compare_reports_improvements_and_new_backends():
    base = _report()
    del base["results"]["optimized"]
    failures, notes = compare(_report(fps_ref=12.0), base, max_regression_pct=5.0)
    assert failures == []
    assert any("reference" in n and "improved" in n for n in notes)
    assert any("optimized: new" in n for n in notes)


def test_compare_fails_on_missing_backends_and_fields():
    base, now = _report(), _report()
    del now["results"]["optimized"]
    failures, _ = compare(now, base, 5.0)
    assert any("not measured now" in f for f in failures)
    broken = copy.deepcopy(base)
    del broken["results"]["reference"]["fps"]
    failures, _ = compare(_report(), broken, 5.0)
    assert any("missing 'fps'" in f for f in failures)
    failures, _ = compare({"schema": "other"}, base, 5.0)
    assert any("schema" in f for f in failures)


def test_validate_rejects_bad_fps():
    r = _report()
    r["results"]["optimized"]["fps"] = 0
    assert any("positive" in p for p in validate(r))
    assert validate(_report()) == []


def test_compare_refuses_other_devices_and_models():
    other_device, other_model = _report(), _report()
    other_device["device"]["name"] = "H200"
    other_model["config"]["model"] = "14b"
    with pytest.raises(ConfigError, match="different devices"):
        compare(_report(), other_device, 5.0)
    with pytest.raises(ConfigError, match="different models"):
        compare(_report(), other_model, 5.0)


BENCH = ["bench", "--device", "cpu", "--frame-size", "480x640", "--chunks", "1", "--quiet"]


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cpu.json"
    assert main([*BENCH, "--quality", "--max-quality-drop", "1", "--out", str(out)]) == 0
    return out, json.loads(out.read_text())


def test_cpu_bench_measures_the_session_with_the_ablation(cpu_report):
    _, report = cpu_report
    assert validate(report) == []
    assert report["device"]["type"] == "cpu" and "CPU figures" in report["device"]["note"]
    results = report["results"]
    assert list(results) == ["reference", "+kernels", "+graphs", "+streams", "+decoder"]
    # no CUDA here: the Triton kernels cannot run, so +kernels is the reference path; the others run
    assert results["+kernels"]["same_path_as"] == "reference"
    assert any("Triton" in why for why in results["+kernels"]["skipped"])
    assert results["reference"]["path"]["scheduler"] == "reference"
    assert results["+graphs"]["path"]["scheduler"] == "static" and not results["+graphs"]["path"]["cuda_graphs"]
    assert results["+streams"]["path"]["pipeline"] == "streams"
    assert results["+decoder"]["path"]["decoder_backend"] in ("onnxruntime", "torch")
    for name in ("reference", "+graphs", "+streams"):
        res = results[name]
        assert res["frames"] == 33 and res["chunks"] == 3  # chunks 0 and 1, then the timed one
        assert res["fps"] > 0 and res["ttff_ms"] > 0
        assert {"face alignment", "encode", "student", "decode", "paste-back"} <= set(res["stage_ms"])
    assert results["reference"]["speedup_vs_reference"] == 1.0
    # --quality: the reference against a second run of itself is exact; the fast paths reproduce it
    assert results["reference"]["quality"]["drop_pct"] == 0 and results["reference"]["quality"]["psnr"] == "inf"
    for name in ("+graphs", "+streams", "+decoder"):
        assert results[name]["quality"]["drop_pct"] <= 1, results[name]["quality"]
        assert "syncnet_v2.model" in results[name]["quality"]["note"]  # Sync-C needs weights: said, not faked
    assert report["quality_gate"] == {"max_drop_pct": 1.0, "failures": []}
    for key in ("fps", "ttff_ms", "stage_ms", "achieved_tflops", "path", "skipped"):
        assert key in report["fields"]


def test_bench_compare_exit_status(cpu_report, tmp_path):
    path, report = cpu_report
    faster = copy.deepcopy(report)
    for res in faster["results"].values():
        if "fps" in res:
            res["fps"] *= 100  # a baseline 100x faster than anything this run can reach: a regression
    base = tmp_path / "fast.json"
    base.write_text(json.dumps(faster))
    args = [*BENCH, "--variants", "reference"]
    assert main([*args, "--compare", str(base), "--max-regression", "5"]) == 1
    assert main([*args, "--compare", str(tmp_path / "absent.json")]) == 2
    elsewhere = copy.deepcopy(report)
    elsewhere["device"]["name"] = "another machine"
    base.write_text(json.dumps(elsewhere))
    assert main([*args, "--compare", str(base)]) == 2  # refused before measuring


def test_bench_rejects_bad_options(capsys):
    assert main(["bench", "--device", "cpu", "--chunks", "0"]) == 2
    assert main(["bench", "--device", "cpu", "--variants", "fast"]) == 2
    assert main(["bench", "--device", "cpu", "--frame-size", "big"]) == 2
    assert main(["bench", "--device", "cpu", "--max-quality-drop", "1"]) == 2  # applies with --quality
    assert "error:" in capsys.readouterr().err


def test_compile_exports_and_checks_onnx(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    assert main(["compile", "--height", "32", "--width", "48", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "taehv_decoder.onnx").is_file() and (tmp_path / "taehv_encoder.onnx").is_file()
    assert "relative error" in out and "TensorRT:" in out
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.slow  # sessions sharing an engine are tested in tests/app/test_avatar.py; this is the benchmark's report
def test_avatar_bench_reports_each_number_of_sessions(tmp_path):
    out = tmp_path / "avatar.json"
    assert main([*BENCH, "--avatar", "--sessions", "1,2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert validate(report) == []
    assert set(report["results"]) == {"avatar-1", "avatar-2"}
    two = report["results"]["avatar-2"]
    assert two["sessions"] == 2 and len(two["fps_per_session"]) == 2 and two["fps"] > 0
    assert two["frames"] == 2 * 33 and two["path"]["avatar"] and two["path"]["max_sessions"] == 2
    assert "encode" not in two["stage_ms"] and "face alignment" not in two["stage_ms"]
    assert main([*BENCH, "--avatar", "--sessions", "0"]) == 2
