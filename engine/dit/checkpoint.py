"""Checkpoint loading and conversion.

Accepted formats:
    .pth / .pt          one flat ``torch.save`` dict (the released ``lipforcing_14b.pth``), read with
                        ``torch.load(weights_only=True, mmap=True)``: a pickle that needs arbitrary code
                        is refused
    .safetensors        a single file
    *.safetensors.index.json  (or a directory holding one) a sharded safetensors checkpoint

    state = read_state_dict(path)                       # name -> tensor (memory-mapped where possible)
    model = load_student(path, device="cuda", dtype=torch.bfloat16)
    convert_checkpoint("lipforcing_14b.pth", "lipforcing_14b.safetensors")
    text = load_text_embeds("text_emb.pt", text_dim=4096)   # [1, 512, 4096]

Loading is strict: missing keys, unexpected keys and shape mismatches are reported together in one
readable message.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError
from .config import ModelConfig

INDEX_SUFFIX = ".safetensors.index.json"


def _resolve(path: Path) -> Path:
    if path.is_dir():
        index = sorted(path.glob(f"*{INDEX_SUFFIX}"))
        singles = sorted(path.glob("*.safetensors"))
        if len(index) == 1:
            return index[0]
        if len(singles) == 1:
            return singles[0]
        raise WeightsError(f"{path}: directory holds no single checkpoint (want one *{INDEX_SUFFIX} or .safetensors)")
    if not path.exists():
        raise WeightsError(f"{path}: no such checkpoint file")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint (no model needed). Tensors stay on the CPU, mapped where possible."""
    path = _resolve(Path(path))
    name = path.name
    if name.endswith(INDEX_SUFFIX):
        return _read_sharded(path)
    if name.endswith(".safetensors"):
        return _read_safetensors(path)
    return _read_torch(path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a valid safetensors file, perhaps truncated ({exc})") from None


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsError(f"{index_path}: not a valid safetensors index ({exc})") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise WeightsError(f"{index_path}: shard {shard} is missing")
        state.update(_read_safetensors(shard_path))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise WeightsError(f"{index_path}: the index lists tensors no shard holds: {_short(absent)}")
    return state


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    mmap = zipfile.is_zipfile(path)  # only the zip format can be memory-mapped
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{path}: refused to load: the file needs arbitrary code to unpickle, which could run anything. "
            f"Only plain tensor dicts are accepted ({str(exc).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint, perhaps truncated ({exc})") from None
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "generator", "module"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a flat name -> tensor dict")
    return dict(obj)


def _short(names: list[str], limit: int = 8) -> str:
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one WeightsError listing every missing key, unexpected key and shape mismatch."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source}: checkpoint does not match the model"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched[:8]))
        raise WeightsError("\n".join(lines))


def load_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    source: str = "checkpoint",
) -> nn.Module:
    """Strictly load ``state`` into ``model`` (which may live on the meta device), casting to ``dtype``
    (e4m3 weights and their float32 scales, see fp8.py, keep their dtypes)."""
    from .fp8 import E4M3

    check_state_dict(model, state, source)

    def target(key: str, value: torch.Tensor) -> torch.dtype:
        keep = value.dtype == E4M3 or key.endswith(".weight_scale") or not value.is_floating_point()
        return value.dtype if keep or dtype is None else dtype

    cast = {k: v.to(device=device, dtype=target(k, v)) for k, v in state.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    return model


def load_student(
    path: str | Path,
    *,
    cfg: ModelConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
):
    """Build the student from a checkpoint (config inferred from tensor shapes unless given) and load it.
    ``fp8``: e4m3 block weights computing in ``dtype`` (fp8.py); a bf16 / fp32 checkpoint is quantised tensor
    by tensor on the host, one written by ``convert --dtype fp8`` is loaded as it is."""
    from .fp8 import is_quantized_state, quantize_state, to_fp8
    from .model import CausalWanStudent

    state = read_state_dict(path)
    if is_quantized_state(state) and not fp8:
        raise WeightsError(f"{path}: this checkpoint holds fp8 weights (lipforcing convert --dtype fp8): "
                           "run it with --dtype fp8")
    if fp8:
        state = quantize_state(state, dtype)
    if cfg is None:
        try:
            cfg = ModelConfig.from_state_dict_shapes({k: v.shape for k, v in state.items()})
        except ValueError as exc:
            raise WeightsError(f"{path}: {exc}") from None
    with torch.device("meta"):
        model = CausalWanStudent(cfg)
    if fp8:
        to_fp8(model.to(dtype), dtype)
    load_into(model, state, device=device, dtype=dtype, source=str(path))
    return model.eval()


def load_text_embeds(path: str | Path, text_dim: int) -> torch.Tensor:
    """Text embeddings (``text_emb.pt`` / .safetensors): a [1, text_len, text_dim] tensor (or [text_len, text_dim], or a
    dict holding one) -> [1, L, D] float32."""
    path = str(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True) if not path.endswith(".safetensors") \
            else read_state_dict(path)
    except Exception as exc:  # a text-embedding file is small; any failure to read it is the user's file
        raise WeightsError(f"{path}: cannot read the text embeddings ({exc})") from None
    if isinstance(obj, dict):
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise WeightsError(f"{path}: expected one tensor in the dict, found {len(tensors)}")
        obj = tensors[0]
    if not isinstance(obj, torch.Tensor):
        raise WeightsError(f"{path}: expected a tensor of text embeddings")
    x = obj[None] if obj.dim() == 2 else obj
    if x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != text_dim:
        raise WeightsError(f"{path}: text embeddings must be [1, text_len, {text_dim}], got {tuple(obj.shape)}")
    return x.float()


def convert_checkpoint(src: str | Path, dst: str | Path, *, dtype: torch.dtype | None = None,
                       fp8: bool = False) -> int:
    """Write any accepted checkpoint as one .safetensors file; returns the number of tensors written.
    ``fp8``: the block linear weights quantised to e4m3 with their per-channel scales, the rest in ``dtype``
    (default bf16): the file ``--dtype fp8`` loads without quantising.

    The output is written to a temporary name and renamed, so a failed conversion leaves no partial file.
    """
    from safetensors.torch import save_file

    from .fp8 import quantize_state

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise WeightsError(f"{dst}: the output must end in .safetensors")
    state = read_state_dict(src)
    if fp8:
        out = {k: v.contiguous() for k, v in quantize_state(state, dtype or torch.bfloat16).items()}
    else:
        out = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in state.items()}
    tmp = dst.with_name(dst.name + ".partial")
    try:
        save_file(out, str(tmp), metadata={"format": "pt", "source": Path(src).name})
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return len(out)
