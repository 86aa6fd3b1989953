"""The engine's adapter table, changed in place: checked as vLLM's loader checks adapters, a bad one kept out
without touching the others. vLLM's own LoRA config, PEFT reader and request type; the engine stubbed."""

import asyncio
import json
import types
from pathlib import Path

import pytest

from mistral_ray import tiny_adapters


@pytest.fixture
def table():
    from vllm.config.lora import LoRAConfig
    from vllm.utils.counter import AtomicCounter

    from mistral_ray.engine.adapters import Adapters

    loaded = []

    async def add_lora(request):  # the engine's load: weights a test made unreadable fail it
        if (Path(request.lora_path) / "unreadable").exists():
            raise RuntimeError("Call to add_lora method failed: cannot read the weights")
        loaded.append(request.lora_name)
        return True

    llm = types.SimpleNamespace(vllm_config=types.SimpleNamespace(lora_config=LoRAConfig(max_loras=2, max_lora_rank=8)),
                                model_config=types.SimpleNamespace(max_model_len=2048), add_lora=add_lora,
                                loaded=loaded)
    models = types.SimpleNamespace(lora_requests={}, lora_id_counter=AtomicCounter(0))
    models.llm = llm
    return Adapters(llm, models, "tiny-mistral"), models


def test_add_change_remove(table, tmp_path):
    adapters, models = table
    one, two = tiny_adapters.ensure(tmp_path / "ft-1"), tiny_adapters.ensure(tmp_path / "ft-2")
    out = asyncio.run(adapters.apply({"ft-1": str(one), "ft-2": str(two)}))
    assert out["added"] == ["ft-1", "ft-2"] and not out["failed"] and out["served"] == ["ft-1", "ft-2"]
    first = models.lora_requests["ft-1"]
    assert first.base_model_name == "tiny-mistral" and first.lora_path == str(one)
    out = asyncio.run(adapters.apply({"ft-1": str(one), "ft-2": str(two)}))
    assert out["added"] == [] and models.lora_requests["ft-1"] is first  # unchanged: untouched
    moved = tiny_adapters.ensure(tmp_path / "moved", name="ft-3")
    out = asyncio.run(adapters.apply({"ft-1": str(moved)}))
    assert out == {"added": ["ft-1"], "removed": ["ft-2"], "failed": {}, "served": ["ft-1"]}
    assert models.lora_requests["ft-1"].lora_int_id != first.lora_int_id  # the engine tells them apart
    assert models.llm.loaded == ["ft-1", "ft-2", "ft-1"]  # loaded by the engine once each, before serving


def test_a_bad_adapter_is_kept_out_and_changes_nothing_else(table, tmp_path):
    adapters, models = table
    one = tiny_adapters.ensure(tmp_path / "ft-1")
    asyncio.run(adapters.apply({"ft-1": str(one)}))
    wide = tiny_adapters.ensure(tmp_path / "wide")
    cfg = json.loads((wide / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps({**cfg, "r": 64}))
    hollow = tiny_adapters.ensure(tmp_path / "hollow")
    (hollow / "unreadable").touch()
    out = asyncio.run(adapters.apply({"ft-1": str(tmp_path / "missing"), "wide": str(wide), "ok": str(one),
                                      "hollow": str(hollow)}))
    assert set(out["failed"]) == {"ft-1", "wide", "hollow"} and "max_lora_rank" in out["failed"]["wide"]
    assert "the engine cannot load it" in out["failed"]["hollow"]
    assert "adapter_config.json" in out["failed"]["ft-1"]
    assert models.lora_requests["ft-1"].lora_path == str(one)  # the old source stays served
    assert out["served"] == ["ft-1", "ok"]
