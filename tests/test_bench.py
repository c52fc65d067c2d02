"""``lipforcing bench``: the JSON schema, the regression gate and a CPU run; ``lipforcing compile`` on CPU."""

from __future__ import annotations

import copy
import json

import pytest

from lipforcing.bench.report import SCHEMA, compare, validate
from lipforcing.engine.cli import main


def _report(fps_ref: float = 10.0, fps_opt: float = 30.0) -> dict:
    def res(fps):
        return {"fps": fps, "ttff_ms": 50.0, "stage_ms": {"student": 20.0}, "chunk_ms": 12 / fps * 1e3,
                "frames": 240, "chunks": 20}

    return {"schema": SCHEMA, "fields": {}, "device": {"type": "cuda"}, "config": {"model": "1.3b"},
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


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cpu.json"
    assert main(["bench", "--device", "cpu", "--height", "64", "--width", "64", "--chunks", "1", "--quiet",
                 "--out", str(out)]) == 0
    return out, json.loads(out.read_text())


def test_cpu_bench_report_is_valid_and_says_so(cpu_report):
    _, report = cpu_report
    assert validate(report) == []
    assert report["device"]["type"] == "cpu" and "CPU figures" in report["device"]["note"]
    assert set(report["results"]) == {"reference", "optimized"}
    for res in report["results"].values():
        assert res["frames"] == 12 and res["fps"] > 0 and res["ttff_ms"] > 0
        assert {"encode", "student", "decode"} <= set(res["stage_ms"])
    assert report["results"]["reference"]["speedup_vs_reference"] == 1.0
    for key in ("fps", "ttff_ms", "stage_ms", "achieved_tflops"):
        assert key in report["fields"]


def test_bench_compare_exit_status(cpu_report, tmp_path):
    path, report = cpu_report
    faster = copy.deepcopy(report)
    for res in faster["results"].values():
        res["fps"] *= 100  # a baseline 100x faster than anything this run can reach: a regression
    base = tmp_path / "fast.json"
    base.write_text(json.dumps(faster))
    args = ["bench", "--device", "cpu", "--height", "64", "--width", "64", "--chunks", "1", "--quiet"]
    assert main([*args, "--compare", str(base), "--max-regression", "5"]) == 1
    assert main([*args, "--compare", str(tmp_path / "absent.json")]) == 2


def test_bench_rejects_bad_options(capsys):
    assert main(["bench", "--device", "cpu", "--warmup", "1"]) == 2
    assert main(["bench", "--device", "cpu", "--backends", "fast"]) == 2
    assert "error:" in capsys.readouterr().err


def test_compile_exports_and_checks_onnx(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    assert main(["compile", "--height", "32", "--width", "48", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "taehv_decoder.onnx").is_file() and (tmp_path / "taehv_encoder.onnx").is_file()
    assert "relative error" in out and "TensorRT:" in out
    assert not list(tmp_path.glob("*.partial"))
