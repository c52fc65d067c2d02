"""Benchmark report: the JSON schema ``lipforcing bench`` writes and the regression gate users run in CI.

    report = {"schema": "lipforcing-bench/1", "device": {...}, "config": {...}, "results": {backend: {...}}}
    problems = compare(report, baseline, max_regression_pct=5.0)   # [] when within bounds

Every figure is defined in ``FIELDS`` (what is timed, from where to where); the report carries those
definitions so a reader of the JSON alone knows what each number means.
"""

from __future__ import annotations

from collections.abc import Mapping

SCHEMA = "lipforcing-bench/1"

FIELDS: dict[str, str] = {
    "fps": "steady-state output frames per second: frames handed to the host over the wall time of the timed "
           "chunks (warm-up chunks excluded), pipeline running end to end (encode, student calls, decode); the "
           "timed region starts and ends with an idle device, so the pipeline fills and drains once inside it",
    "ttff_ms": "time to first frame: from submitting the first chunk's input frames to the first decoded frame "
               "being on the host, measured on a fresh clip after warm-up (graphs already captured)",
    "stage_ms": "median per-chunk time of each stage run alone, one after another (CUDA events on a GPU, wall "
                "clock on a CPU): encode (both streams), student (two denoising calls and the commit call), "
                "decode, paste-back (512x512 faces into 1280x720 frames; only at 512x512)",
    "chunk_ms": "wall time of the timed pipelined run divided by the timed chunks",
    "peak_memory_bytes": "peak device memory allocated by the process during the run (CUDA only)",
    "achieved_tflops": "student matrix FLOPs per steady-state chunk (lipforcing info) over the sum of the "
                       "student stage times, in TFLOP/s",
    "speedup_vs_reference": "fps of this backend over fps of the reference backend in the same run",
}

REQUIRED_RESULT_KEYS = ("fps", "ttff_ms", "stage_ms", "chunk_ms", "frames", "chunks")


def validate(report: Mapping) -> list[str]:
    """Schema problems of a report (empty when valid)."""
    problems = []
    if report.get("schema") != SCHEMA:
        problems.append(f"schema is {report.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("device", "config", "results", "fields"):
        if key not in report:
            problems.append(f"missing top-level field {key!r}")
    for backend, res in (report.get("results") or {}).items():
        for key in REQUIRED_RESULT_KEYS:
            if key not in res:
                problems.append(f"results.{backend}: missing {key!r}")
        if "fps" in res and not (isinstance(res["fps"], (int, float)) and res["fps"] > 0):
            problems.append(f"results.{backend}.fps must be a positive number, got {res['fps']!r}")
    return problems


def compare(report: Mapping, baseline: Mapping, max_regression_pct: float) -> tuple[list[str], list[str]]:
    """Compare throughput per backend with a baseline report.

    Returns (failures, notes): a failure is a backend whose fps fell by more than ``max_regression_pct``
    percent, a backend or field the baseline has that this report lacks, or an invalid report; notes
    describe improvements and backends only this report has.
    """
    failures, notes = [], []
    for name, rep in (("report", report), ("baseline", baseline)):
        failures += [f"{name}: {p}" for p in validate(rep)]
    if failures:
        return failures, notes
    if report["config"].get("model") != baseline["config"].get("model"):
        notes.append(f"model differs: {report['config'].get('model')} vs baseline {baseline['config'].get('model')}")
    for backend, base in baseline["results"].items():
        res = report["results"].get(backend)
        if res is None:
            failures.append(f"{backend}: in the baseline but not measured now")
            continue
        change = (res["fps"] - base["fps"]) / base["fps"] * 100.0
        line = f"{backend}: {res['fps']:.2f} fps vs baseline {base['fps']:.2f} ({change:+.1f}%)"
        if change < -max_regression_pct:
            failures.append(line + f", a regression beyond {max_regression_pct:g}%")
        else:
            notes.append(line + (", improved" if change > 0 else ", within bounds"))
    for backend in report["results"]:
        if backend not in baseline["results"]:
            notes.append(f"{backend}: new, no baseline")
    return failures, notes
