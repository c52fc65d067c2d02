"""Benchmark report: the JSON schema ``lipforcing bench`` writes and the regression gate users run in CI.

    report = {"schema": "lipforcing-bench/2", "device": {...}, "config": {...}, "results": {variant: {...}}}
    problems = compare(report, baseline, max_regression_pct=5.0)   # [] when within bounds

Every figure is defined in ``FIELDS`` (what is timed, from where to where); the report carries those
definitions so a reader of the JSON alone knows what each number means.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..engine.errors import ConfigError

SCHEMA = "lipforcing-bench/2"

FIELDS: dict[str, str] = {
    "quality": "with --quality: the variant's frames against the reference path's on the same inputs: PSNR and SSIM "
               "(whole frame, per frame, averaged), Sync-C of both with SyncNet weights, and drop_pct = the larger "
               "of 100 (1 - SSIM) and the relative fall of Sync-C; the reference's own entry compares a second "
               "run of it with the first (0 when the path is deterministic). --max-quality-drop gates drop_pct",
    "complete": "false while the run is still going (the report is rewritten after every variant) or when it "
                "was stopped part-way: the results present are final, the missing ones were not measured",
    "results": "one entry per ablation variant (reference, +kernels, +graphs, +streams, +decoder), each the "
               "LipSync session of 'lipforcing run' on synthetic frames, alignment and paste-back included; with "
               "--avatar one entry per number of concurrent sessions on a prepared avatar (avatar-1, avatar-2, ...)",
    "sessions": "avatar entries: sessions running at once on one engine (one set of weights), each in its own thread",
    "fps_per_session": "avatar entries: each session's steady-state FPS (its chunks 2.. over its own time)",
    "batch_sizes": "avatar entries: how many student calls ran with how many sessions in one batch",
    "fps": "steady-state output frames per second: the frames of chunks 2.. over the wall time from chunk 1's "
           "frames being handed out to the last chunk's (frames pushed as fast as the session takes them, "
           "warm-up excluded); avatar entries: all sessions' frames of chunks 2.. over the time from the first "
           "session's chunk 1 to the last session's last chunk (the engine's total)",
    "fps_end_to_end": "all output frames over the wall time from the first pushed frame to the last frame out",
    "ttff_ms": "time to first frame: from pushing the clip's first frame to its first chunk's frames being handed "
               "out, on a warm engine (audio features computed before, at session start)",
    "chunk_ms": "wall time per steady-state chunk (12 frames) in the timed region",
    "stage_ms": "median per-chunk time of each stage over the steady-state chunks: face alignment (host, per "
                "chunk), encode (both streams), student (two denoising calls and the commit call), decode, "
                "paste-back; device time between CUDA events on a GPU, wall clock on a CPU; stages overlap on the "
                "streams path",
    "warm_up_s": "the engine's explicit warm-up before the clip (kernel tuning, graph capture), not timed above",
    "peak_memory_bytes": "peak device memory allocated during the clip (CUDA only)",
    "achieved_tflops": "student matrix FLOPs per steady-state chunk (lipforcing info) over the median student "
                       "stage time, in TFLOP/s",
    "speedup_vs_reference": "fps of this variant over fps of the reference variant in the same run",
    "path": "exactly which path the variant ran (scheduler, pipeline, device streams, CUDA graphs, attention, "
            "compile, encoder, decoder, decoder backend, face backend: the benchmark's drawn face has a known box)",
    "skipped": "pieces of the variant that cannot run here, and why",
    "same_path_as": "a variant whose pieces cannot run here ran the same path as this one: not measured twice",
    "parallel": "with --gpus N: the ranks each variant's student runs on and the scheme (one stream); null otherwise",
    "ranks": "with --gpus N: ranks 1..N-1's student calls (warm_up, start_clip, run_chunk) and the seconds each kind "
             "took there, over the whole run (rank 0's are the variants' stage_ms)",
}

REQUIRED_RESULT_KEYS = ("fps", "ttff_ms", "stage_ms", "chunk_ms", "frames", "chunks", "path")


def validate(report: Mapping) -> list[str]:
    """Schema problems of a report (empty when valid)."""
    problems = []
    if report.get("schema") != SCHEMA:
        problems.append(f"schema is {report.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("device", "config", "results", "fields"):
        if key not in report:
            problems.append(f"missing top-level field {key!r}")
    for backend, res in (report.get("results") or {}).items():
        if "same_path_as" in res:
            continue
        for key in REQUIRED_RESULT_KEYS:
            if key not in res:
                problems.append(f"results.{backend}: missing {key!r}")
        if "fps" in res and not (isinstance(res["fps"], (int, float)) and res["fps"] > 0):
            problems.append(f"results.{backend}.fps must be a positive number, got {res['fps']!r}")
    return problems


def comparable(report: Mapping, baseline: Mapping) -> None:
    """Raise ConfigError when two reports come from different devices or models (their FPS mean nothing
    against each other)."""
    def what(rep: Mapping) -> tuple:
        device = rep.get("device") or {}
        return (device.get("type"), device.get("name")), (rep.get("config") or {}).get("model")

    (dev_now, model_now), (dev_base, model_base) = what(report), what(baseline)
    if dev_now != dev_base:
        raise ConfigError(f"cannot compare runs from different devices: this run {dev_now[1]} ({dev_now[0]}), "
                          f"the baseline {dev_base[1]} ({dev_base[0]}); make the baseline on this device")
    if model_now != model_base:
        raise ConfigError(f"cannot compare runs of different models: this run {model_now}, the baseline "
                          f"{model_base}; bench the same --model")


def compare(report: Mapping, baseline: Mapping, max_regression_pct: float) -> tuple[list[str], list[str]]:
    """Compare throughput per variant with a baseline report of the same device and model.

    Returns (failures, notes): a failure is a variant whose fps fell by more than ``max_regression_pct``
    percent, a variant the baseline measured that this report lacks, or an invalid report; notes describe
    improvements and variants only this report has. Raises ConfigError for reports of different devices
    or models.
    """
    failures, notes = [], []
    for name, rep in (("report", report), ("baseline", baseline)):
        failures += [f"{name}: {p}" for p in validate(rep)]
    if failures:
        return failures, notes
    comparable(report, baseline)
    measured = {k: v for k, v in report["results"].items() if "fps" in v}
    for variant, base in baseline["results"].items():
        if "fps" not in base:
            continue
        res = measured.get(variant)
        if res is None:
            failures.append(f"{variant}: in the baseline but not measured now")
            continue
        change = (res["fps"] - base["fps"]) / base["fps"] * 100.0
        line = f"{variant}: {res['fps']:.2f} fps vs baseline {base['fps']:.2f} ({change:+.1f}%)"
        if change < -max_regression_pct:
            failures.append(line + f", a regression beyond {max_regression_pct:g}%")
        else:
            notes.append(line + (", improved" if change > 0 else ", within bounds"))
    for variant in measured:
        if "fps" not in baseline["results"].get(variant, {}):
            notes.append(f"{variant}: new, no baseline")
    return failures, notes
