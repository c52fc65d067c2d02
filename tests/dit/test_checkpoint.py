"""Checkpoint loading: formats, strict checking in one message, unsafe pickles, truncation, convert."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from lipforcing.cli import main
from lipforcing.engine.dit.checkpoint import convert_checkpoint, load_student, read_state_dict
from lipforcing.engine.dit.config import ModelConfig
from lipforcing.engine.dit.model import CausalWanStudent
from lipforcing.engine.errors import WeightsError

CFG = ModelConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=4, text_len=4, audio_dim=8, text_dim=32)


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = CausalWanStudent(CFG)
    return {k: torch.randn_like(v).to(torch.bfloat16) for k, v in model.state_dict().items()}


def _same(model, state):
    got = model.state_dict()
    return all(torch.equal(got[k].to(torch.bfloat16), v) for k, v in state.items())


def test_pth_loads_memory_mapped_with_dtype_cast(tmp_path, state):
    path = tmp_path / "student.pth"
    torch.save(state, path)
    model = load_student(path, cfg=CFG, dtype=torch.float32)
    assert model.patch_embedding.weight.dtype == torch.float32 and _same(model, state)
    inferred = load_student(path, dtype=torch.bfloat16)  # config from the tensor shapes
    assert inferred.cfg.num_layers == 4 and inferred.cfg.dim == 64 and _same(inferred, state)


def test_safetensors_single_and_sharded(tmp_path, state):
    single = tmp_path / "one.safetensors"
    save_file(state, str(single))
    assert _same(load_student(single, cfg=CFG), state)

    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    weight_map = {}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(shard_dir / name))
        weight_map.update({k: name for k in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert _same(load_student(shard_dir / "model.safetensors.index.json", cfg=CFG), state)
    assert _same(load_student(shard_dir, cfg=CFG), state)  # the directory works too
    os.remove(shard_dir / "model-00002-of-00002.safetensors")
    with pytest.raises(WeightsError, match="shard model-00002-of-00002.safetensors is missing"):
        read_state_dict(shard_dir)


def test_strict_check_reports_everything_in_one_message(tmp_path, state):
    bad = dict(state)
    del bad["blocks.1.ffn.0.weight"]
    del bad["head.modulation"]
    bad["blocks.0.extra.weight"] = torch.zeros(3)
    bad["blocks.2.self_attn.q.weight"] = torch.zeros(64, 63)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(WeightsError) as info:
        load_student(path, cfg=CFG)
    msg = str(info.value)
    assert "missing keys (2): blocks.1.ffn.0.weight, head.modulation" in msg
    assert "unexpected keys (1): blocks.0.extra.weight" in msg
    assert "blocks.2.self_attn.q.weight: checkpoint (64, 63) vs model (64, 64)" in msg


def test_truncated_files_are_clear_errors(tmp_path, state):
    pth, st = tmp_path / "s.pth", tmp_path / "s.safetensors"
    torch.save(state, pth)
    save_file(state, str(st))
    for path in (pth, st):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(WeightsError, match="truncated"):
            read_state_dict(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_code_carrying_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "payload": _Evil()}, path)
    with pytest.raises(WeightsError, match="arbitrary code"):
        read_state_dict(path)
    legacy = tmp_path / "evil_legacy.pt"
    with open(legacy, "wb") as f:
        pickle.dump({"payload": _Evil()}, f)
    with pytest.raises(WeightsError, match="arbitrary code|not a readable"):
        read_state_dict(legacy)


def test_missing_file_and_nested_state_dict(tmp_path, state):
    with pytest.raises(WeightsError, match="no such checkpoint"):
        read_state_dict(tmp_path / "absent.pth")
    nested = tmp_path / "nested.pth"
    torch.save({"generator": state}, nested)
    assert set(read_state_dict(nested)) == set(state)


def test_convert_cli_round_trip(tmp_path, state, capsys):
    src, dst = tmp_path / "in.pth", tmp_path / "out.safetensors"
    torch.save(state, src)
    assert main(["convert", str(src), str(dst), "--dtype", "fp32"]) == 0
    out = read_state_dict(dst)
    assert set(out) == set(state) and out["head.head.weight"].dtype == torch.float32
    assert torch.equal(out["head.head.weight"].to(torch.bfloat16), state["head.head.weight"])
    assert main(["convert", str(src), str(tmp_path / "out.bin")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out.bin").exists() and not list(tmp_path.glob("*.partial"))
    assert convert_checkpoint(src, dst) == len(state)
