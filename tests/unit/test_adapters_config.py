"""LoRA in the config: engine slots in the args, adapters in the LLM deployment's user_config (what a deploy
changes in place), checked against each other where the file is read."""

import json

import pytest
import yaml

from mistral_ray import launcher, tiny_adapters
from mistral_ray.config import ConfigError, load_deployment, parse_adapters, parse_service
from mistral_ray.options import LLM_DEPLOYMENT, vllm_args
from tests.conftest import LOCAL_CPU


def _file(tmp_path, args, user_config):
    raw = yaml.safe_load(LOCAL_CPU.read_text())
    raw["applications"][0]["args"] = args
    raw["applications"][0]["deployments"] = [{"name": LLM_DEPLOYMENT, "user_config": user_config,
                                              "max_ongoing_requests": 300}]
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_engine_lora_settings_reach_vllm_and_adapters_come_from_user_config(tmp_path):
    path = _file(tmp_path, {"engine": {"lora": {"max_loras": 2, "max_lora_rank": 8, "max_cpu_loras": 4}}},
                 {"adapters": {"ft-1": {"source": ".state/adapters/ft-1", "build_tiny": True}}})
    dep = load_deployment(path)
    args = vllm_args(dep.service)
    assert args["enable_lora"] is True and (args["max_loras"], args["max_lora_rank"], args["max_cpu_loras"]) == (2, 8, 4)
    assert dep.live.adapters["ft-1"].resolved_source().endswith(".state/adapters/ft-1")
    assert "enable_lora" not in vllm_args(parse_service({}))
    # what Serve is given: the validated args, and the file's own overrides of the LLM deployment kept
    app = launcher.application(dep)
    llm = next(d for d in app["deployments"] if d["name"] == LLM_DEPLOYMENT)
    assert llm["max_ongoing_requests"] == 300 and llm["user_config"] == dep.live.model_dump(mode="json")
    assert app["args"]["engine"]["lora"]["max_loras"] == 2


@pytest.mark.parametrize("args,user_config,message", [
    ({}, {"adapters": {"a": {"source": "./a"}}}, "adapters need engine.lora"),
    ({"engine": {"lora": {}}}, {"adapters": {"tiny-mistral": {"source": "./a"}}}, "base model's name"),
    ({"engine": {"lora": {}}}, {"adapters": {"a": {"source": "org/a", "build_tiny": True}}}, "local path"),
    ({"engine": {"lora": {}}}, {"adapters": {"a": {}}}, "adapters.a.source"),
    ({"engine": {"lora": {}}}, {"adapter": {}}, "user_config.adapter"),
    ({"engine": {"lora": {"max_loras": 4, "max_cpu_loras": 2}}}, {}, "max_cpu_loras"),
    ({"engine": {"lora": {}}}, {"adapters": {"a": {"source": "./a", "keys": ["team-a"]}}}, "api_keys.enabled"),
])
def test_bad_adapter_config_names_the_field(tmp_path, args, user_config, message):
    with pytest.raises(ConfigError, match=message):
        load_deployment(_file(tmp_path, args, user_config))


def test_no_user_config_serves_no_adapters():
    assert parse_adapters(None, parse_service({})).adapters == {}
    assert load_deployment(LOCAL_CPU).live.adapters == {}


# sha256 (tiny_model.digest) of the tiny adapter ft-1 with the pinned numpy/safetensors: the same bytes everywhere.
GOLDEN_FT1 = "597851274144dcabdaec5a2b4673cf66811cdf33cd33ceff023019457511f818"


def test_tiny_adapters_are_reproducible_peft_lora(tmp_path):
    from mistral_ray import tiny_model

    a = tiny_adapters.ensure(tmp_path / "ft-1")
    assert tiny_model.digest(a) == GOLDEN_FT1
    b = tiny_adapters.ensure(tmp_path / "again", name="ft-1")
    c = tiny_adapters.ensure(tmp_path / "ft-2")
    read = lambda d: (d / "adapter_model.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b) and read(a) != read(c)
    cfg = json.loads((a / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == tiny_adapters.RANK and cfg["bias"] == "none"
    from safetensors.numpy import load_file

    tensors = load_file(str(a / "adapter_model.safetensors"))
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.lora_A.weight"].shape == (tiny_adapters.RANK, 256)
    assert tensors[f"{q}.lora_B.weight"].shape == (256, tiny_adapters.RANK)
    (tmp_path / "kept" / "x").parent.mkdir()
    (tmp_path / "kept" / "x").write_text("mine")
    tiny_adapters.ensure(tmp_path / "kept")  # never replaces what is there
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["x"]


def test_the_gpu_files_lora_example_validates_uncommented(tmp_path):
    """deployments/mistral-7b-instruct-v0.1.yaml shows LoRA in comments: uncommented, it is a valid file."""
    import re

    from mistral_ray.config import PROJECT_ROOT

    text = (PROJECT_ROOT / "deployments" / "mistral-7b-instruct-v0.1.yaml").read_text()
    text = re.sub(r"^(\s*)# (lora: .*)$", r"\1\2", text, flags=re.M)
    tail = text.index("    # deployments:")
    text = text[:tail] + re.sub(r"^    # ", "    ", text[tail:], flags=re.M)
    path = tmp_path / "gpu-lora.yaml"
    path.write_text(text)
    dep = load_deployment(path)
    assert dep.service.engine.lora.max_loras == 4
    assert set(dep.live.adapters) == {"support-bot", "sql-expert"}
