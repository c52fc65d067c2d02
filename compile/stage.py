"""``lipforcing compile``: export the TAEHV decoder and encoder to ONNX for the fixed chunk shapes, check
them against PyTorch with onnxruntime, and build TensorRT engines when TensorRT can be used here.

    report = compile_codecs(taehv, out_dir, height=512, width=512)
    report["decoder"]["onnxruntime_rel_err"], report["decoder"]["tensorrt"]   # parity, engine or reason

Each artefact is written to a temporary name and renamed, so an interrupted run leaves no partial file.
``compiled.json`` records what the folder was built from (a hash of the TAEHV weights, the shapes), so
``lipforcing run --compiled DIR`` uses it only with the same weights and size.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from ..engine.codecs.taehv import TAEHV, TAEHVStreamDecoder, TAEHVStreamEncoder
from ..engine.numerics import rel_error
from .decoder import MANIFEST, MANIFEST_FORMAT, weights_digest
from .onnx_export import OnnxStepRunner, export_decoder, export_encoder
from .tensorrt_engine import build_or_load_engine, tensorrt_status

log = logging.getLogger("lipforcing")

PARITY_BOUND = 1e-3  # fp32 graph against eager fp32: only reassociation differs (~1e-6 seen)


def compile_codecs(
    taehv: TAEHV,
    out_dir: str | Path,
    *,
    height: int = 512,
    width: int = 512,
    tensorrt: bool = True,
    seed: int = 0,
) -> dict:
    """Export, verify and (optionally) build engines; returns a report dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if height % 8 or width % 8:
        raise ValueError(f"frame size {height}x{width} must be a multiple of 8")
    taehv = copy.deepcopy(taehv).float().cpu().eval()  # the caller's module stays where and what it is
    h, w = height // 8, width // 8
    g = torch.Generator().manual_seed(seed)
    report: dict = {"height": height, "width": width}

    dec_path = export_decoder(taehv, out / "taehv_decoder.onnx", latent_hw=(h, w))
    z = torch.randn(1, 6, taehv.config.latent_channels, h, w, generator=g)
    runner, stream = OnnxStepRunner(dec_path), TAEHVStreamDecoder(taehv)
    with torch.no_grad():
        errs = [rel_error(runner.step(z[:, :3])[:, 3:], stream.push(z[:, :3])),
                rel_error(runner.step(z[:, 3:]), stream.push(z[:, 3:]))]
    report["decoder"] = {"onnx": str(dec_path), "onnxruntime_rel_err": max(errs)}

    enc_path = export_encoder(taehv, out / "taehv_encoder.onnx", frame_hw=(height, width))
    frames = torch.rand(1, 21, taehv.config.image_channels, height, width, generator=g)
    runner, enc = OnnxStepRunner(enc_path), TAEHVStreamEncoder(taehv)
    first = torch.cat([frames[:, :1].expand(-1, 3, -1, -1, -1), frames[:, :9]], dim=1)
    with torch.no_grad():
        errs = [rel_error(runner.step(first), enc.push(frames[:, :9])),
                rel_error(runner.step(frames[:, 9:]), enc.push(frames[:, 9:]))]
    report["encoder"] = {"onnx": str(enc_path), "onnxruntime_rel_err": max(errs)}

    for part in ("decoder", "encoder"):
        if report[part]["onnxruntime_rel_err"] > PARITY_BOUND:
            raise RuntimeError(f"ONNX {part} disagrees with PyTorch: relative error "
                               f"{report[part]['onnxruntime_rel_err']:.2e} > {PARITY_BOUND:.0e}")

    ok, why = tensorrt_status()
    if tensorrt and not ok:
        log.warning("lipforcing: TensorRT engines not built: %s", why)
    for part in ("decoder", "encoder"):
        if not tensorrt:
            report[part]["tensorrt"] = "skipped (--no-tensorrt)"
        elif not ok:
            report[part]["tensorrt"] = f"not built: {why}"
        else:
            onnx_path = Path(report[part]["onnx"])
            session = OnnxStepRunner(onnx_path).session
            shapes = {i.name: tuple(i.shape) for i in session.get_inputs()}
            build_or_load_engine(onnx_path, shapes, cache_dir=out / "engines")
            report[part]["tensorrt"] = f"built into {out / 'engines'}"
    manifest = {
        "format": MANIFEST_FORMAT, "taehv_sha256": weights_digest(taehv), "latent_hw": [h, w],
        "frame_hw": [height, width], "decoder": "taehv_decoder.onnx", "encoder": "taehv_encoder.onnx",
        "torch": torch.__version__,
    }
    tmp = out / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / MANIFEST)
    report["manifest"] = str(out / MANIFEST)
    return report
