"""The memory plan: measured on the meta device, its arithmetic holds, and 14B at 512x512 in bf16 fits 36 GB."""

from __future__ import annotations

import pytest
import torch

from lipforcing.engine.dit.cache import SinkWindowCache
from lipforcing.engine.dit.config import ModelConfig, StreamConfig
from lipforcing.engine.dit.model import CausalWanStudent
from lipforcing.engine.tools.memory import LiveBytes, memory_plan, profile

STREAM = StreamConfig.for_resolution(512, 512)


def test_live_bytes_follows_allocations_views_and_frees():
    x = torch.empty(1000, device="meta")  # made before the block: not counted
    with LiveBytes() as live:
        a = x * 2  # 4000 bytes
        view = a[:10]  # a view adds nothing
        b = torch.empty(500, device="meta", dtype=torch.float16)  # 1000 bytes
        a.add_(1)  # in place adds nothing
        assert live.live == 5000
        del a  # the view keeps the storage
        assert live.live == 5000
        del view
        assert live.live == 1000
        del b
    assert live.live == 0 and live.peak == 5000
    _, tracked = profile(lambda: torch.empty(256, device="meta").sum())
    assert tracked.peak == 1024 + 4 and tracked.live == 4  # the returned sum is still alive


@pytest.fixture(scope="module")
def plan_14b():
    return memory_plan(ModelConfig.from_name("14b"), STREAM, dtype=torch.bfloat16)


def _item(plan, name):
    return next(i for i in plan["items"] if i["name"] == name)


def test_plan_items_equal_tensors_built_on_meta(plan_14b):
    cfg = ModelConfig.from_name("14b")
    with torch.device("meta"):
        model = CausalWanStudent(cfg).to(torch.bfloat16)
    weights = sum(p.nbytes for p in model.parameters())
    assert _item(plan_14b, "student weights")["bytes"] + _item(plan_14b, "student text weights")["bytes"] == weights
    assert weights == 2 * 14_294_081_696
    cache = SinkWindowCache(cfg, STREAM, device="meta", dtype=torch.bfloat16)
    assert _item(plan_14b, "KV cache")["bytes"] == cache.nbytes == 2 * 40 * 4 * 1024 * 5120 * 2
    assert _item(plan_14b, "text K/V")["bytes"] == 40 * 2 * 512 * 5120 * 2


def test_plan_totals_add_up_and_14b_fits_36_gb(plan_14b):
    items = plan_14b["items"]

    def phase(name):
        return sum(i["bytes"] for i in items if i["phase"] == name and i["counted"])

    assert plan_14b["resident_bytes"] == phase("resident")
    assert plan_14b["streaming_bytes"] == phase("streaming")
    assert plan_14b["clip_start_bytes"] == phase("clip start")
    assert plan_14b["total_bytes"] == phase("resident") + max(phase("streaming"), phase("clip start"))
    assert plan_14b["total_bytes"] <= 36e9
    assert all(i["bytes"] > 0 for i in items)
    assert _item(plan_14b, "activations per call")["bytes"] <= _item(plan_14b, "graph pool")["bytes"]


def test_info_memory_json_cli(capsys):
    import json

    from lipforcing.cli import main

    assert main(["info", "--model", "tiny", "--memory", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["total_bytes"] > 0 and {"KV cache", "graph pool", "audio encoder"} <= {i["name"] for i in plan["items"]}
    assert main(["info", "--model", "tiny", "--memory"]) == 0
    assert "total" in capsys.readouterr().out


def test_plan_of_several_sessions_on_avatars():
    cfg = ModelConfig.from_name("1.3b")
    one = memory_plan(cfg, STREAM, sessions=1, avatar=True)
    three = memory_plan(cfg, STREAM, sessions=3, avatar=True)
    assert _item(three, "KV cache")["bytes"] == 3 * _item(one, "KV cache")["bytes"]
    assert _item(three, "student weights")["bytes"] == _item(one, "student weights")["bytes"]  # shared
    assert not any(i["name"].startswith(("wan encoder", "taehv encoder")) for i in three["items"])  # no encoder
    assert three["per_session_bytes"] > 0
    assert three["total_bytes"] > one["total_bytes"] + 1.5 * three["per_session_bytes"]
    assert three["sessions"] == 3 and three["encoder"] is None
