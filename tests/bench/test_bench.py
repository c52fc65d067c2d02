"""``lipforcing bench``: the JSON schema, the regression gate, option errors; ``lipforcing compile`` on CPU. (A CPU
run of the session ablation, the quality gate and the avatar sessions: tests/bench/test_gpu_suite.py.)"""

from __future__ import annotations

import copy

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
