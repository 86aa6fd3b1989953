"""The config tree: both shipped deployment files load, and bad ones fail naming the field."""

import os
from pathlib import Path

import pytest
import yaml

from mistral_ray.config import (
    ConfigError,
    PROJECT_ROOT,
    ServiceConfig,
    load_deployment,
    parse_service,
)
from mistral_ray.engine.step_wait import ENV as STEP_WAIT_ENV
from mistral_ray.options import cluster_env, llm_deployment_options, replica_env, vllm_args

DEPLOYMENTS = PROJECT_ROOT / "deployments"


def write(tmp_path: Path, args: dict) -> Path:
    raw = yaml.safe_load((DEPLOYMENTS / "local-cpu.yaml").read_text())
    raw["applications"][0]["args"] = args
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_local_cpu_file():
    dep = load_deployment(DEPLOYMENTS / "local-cpu.yaml")
    svc = dep.service
    assert dep.base_url == "http://127.0.0.1:8000"
    assert svc.model.build_tiny and svc.engine.device == "cpu"
    assert (svc.scaling.min_replicas, svc.scaling.max_replicas) == (1, 1)
    opts = llm_deployment_options(svc)
    assert opts["num_replicas"] == 1 and "autoscaling_config" not in opts
    # Two replicas and the ingress routers must fit on a 2-core machine.
    assert 2 * opts["ray_actor_options"]["num_cpus"] + svc.router.num_cpus <= 2
    env = opts["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["VLLM_CACHE_ROOT"].endswith(".state/vllm-cache")
    # Our replicas' CPU engines wait for each step with a sleep (the vLLM plugin); the env bare vLLM gets does not.
    assert env[STEP_WAIT_ENV] == str(svc.engine.cpu_step_wait_us) == "100"
    assert STEP_WAIT_ENV not in replica_env(svc)
    off = svc.model_copy(update={"engine": svc.engine.model_copy(update={"cpu_step_wait_us": None})})
    assert STEP_WAIT_ENV not in llm_deployment_options(off)["ray_actor_options"]["runtime_env"]["env_vars"]


def test_mistral_7b_file():
    svc = load_deployment(DEPLOYMENTS / "mistral-7b-instruct-v0.1.yaml").service
    kw = vllm_args(svc)
    assert kw["model"] == "mistralai/Mistral-7B-Instruct-v0.1"  # a hub id passes through unresolved
    assert kw["dtype"] == "bfloat16" and kw["max_model_len"] == 32768
    assert kw["gpu_memory_utilization"] == 0.9
    assert kw["tool_call_parser"] == "mistral" and kw["enable_auto_tool_choice"] is True
    opts = llm_deployment_options(svc)
    assert opts["ray_actor_options"]["num_gpus"] == 1
    # Serve's shutdown budget covers the deregistration window and then the drain the config names.
    assert opts["graceful_shutdown_timeout_s"] == svc.scaling.drain_timeout_s + svc.router.deregister_s
    assert opts["autoscaling_config"]["min_replicas"] == 1 and opts["autoscaling_config"]["max_replicas"] == 4
    assert "VLLM_CPU_KVCACHE_SPACE" not in opts["ray_actor_options"]["runtime_env"]["env_vars"]
    assert STEP_WAIT_ENV not in opts["ray_actor_options"]["runtime_env"]["env_vars"]  # GPU engines keep vLLM's spin


def test_a_hub_checkpoint_is_never_the_tiny_model(tmp_path):
    # A file that names only a hub checkpoint serves that checkpoint: building the random tiny model in its
    # place is a choice the file must make, and it cannot make it for a hub id.
    svc = parse_service({"model": {"name": "mistralai/Mistral-7B-Instruct-v0.1",
                                   "source": "mistralai/Mistral-7B-Instruct-v0.1"}})
    assert svc.model.build_tiny is False and vllm_args(svc)["model"] == "mistralai/Mistral-7B-Instruct-v0.1"
    with pytest.raises(ConfigError, match=r"applications\[0\]\.args\.model: .*build_tiny.*reads as a hub checkpoint"):
        load_deployment(write(tmp_path, {"model": {"source": "mistralai/Mistral-7B-Instruct-v0.1",
                                                   "build_tiny": True}}))
    assert load_deployment(DEPLOYMENTS / "local-cpu.yaml").service.model.build_tiny  # the laptop file says so


def test_local_source_resolves_to_absolute_path():
    svc = ServiceConfig()
    assert not svc.model.build_tiny  # building the tiny model is never a default
    assert Path(vllm_args(svc)["model"]).is_absolute()
    assert vllm_args(svc)["model"] == str(PROJECT_ROOT / ".state/models/tiny-mistral")


def test_vllm_serving_options_and_extra_args_reach_vllm():
    svc = parse_service({"engine": {"tool_call_parser": "mistral", "enable_auto_tool_choice": True,
                                    "extra_args": {"max_logprobs": 5}}})
    kw = vllm_args(svc)
    assert (kw["tool_call_parser"], kw["enable_auto_tool_choice"], kw["max_logprobs"]) == ("mistral", True, 5)
    with pytest.raises(ConfigError, match="enable_auto_tool_choice needs engine.tool_call_parser"):
        parse_service({"engine": {"enable_auto_tool_choice": True}})


def test_cluster_env_turns_the_data_plane_on_from_the_config():
    env = cluster_env(parse_service({"router": {"request_timeout_s": 30, "retries": 2}}))
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY"] == "0"  # pow2 needs no body
    assert env["RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S"] == "40" and env["RAY_SERVE_HAPROXY_RETRIES"] == "2"
    affinity = cluster_env(parse_service({"router": {"routing": {"policy": "prefix_affinity"}}}))
    assert affinity["RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY"] == "1"
    assert env["RAY_SERVE_USE_COMPACT_SCHEDULING_STRATEGY"] == "0"  # spread replicas over worker nodes
    guard = Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"])  # this Python's console script: Ray can start it
    assert guard.name == "mistral-ray-haproxy" and guard.is_file() and os.access(guard, os.X_OK)
    assert env["MISTRAL_RAY_STREAM_GUARD"] == str(2 * 2**20)  # on by default, holding what the replica reads
    capped = cluster_env(parse_service({"router": {"limits": {"max_body_bytes": 65536}}}))
    assert capped["MISTRAL_RAY_STREAM_GUARD"] == "65536"
    unguarded = cluster_env(parse_service({"router": {"stream_guard": False}}))  # the wrapper still sets request ids
    assert unguarded["MISTRAL_RAY_STREAM_GUARD"] == "0" and unguarded["RAY_SERVE_HAPROXY_BINARY_PATH"] == str(guard)
    assert cluster_env(parse_service({"router": {"haproxy": False}, "scaling": {"placement": "pack"}})) == {
        "RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_USE_COMPACT_SCHEDULING_STRATEGY": "1"}


@pytest.mark.parametrize(
    "args, field",
    [
        ({"scaling": {"replicas": 2}}, "scaling.replicas"),
        ({"engine": {"dtype": "fp7"}}, "engine.dtype"),
        ({"engine": {"max_num_seqs": 0}}, "engine.max_num_seqs"),
        ({"modell": {}}, "modell"),
        ({"scaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas (3) > max_replicas (2)"),
        ({"router": {"max_queued_requests": 10}}, "router.max_queued_requests"),
        ({"scaling": {"initial_replicas": 5, "max_replicas": 2}}, "initial_replicas (5) outside"),
        ({"engine": {"device": "cuda"}}, "replica_gpus must be >= engine.tensor_parallel_size"),
        ({"scaling": {"replica_gpus": 1}}, "replica_gpus must be 0 on device cpu"),
        ({"scaling": {"replica_cpus": 0}}, "replica_cpus or replica_gpus must be > 0"),
        ({"scaling": {"placement": "random"}}, "scaling.placement"),
        ({"router": {"routing": {"route_body_bytes": 1024}}}, "router.routing.route_body_bytes"),  # HAProxy's buffer
        ({"router": {"limits": {"max_batch_prompts": 0}}}, "router.limits.max_batch_prompts"),
    ],
)
def test_bad_config_names_the_field(tmp_path, args, field):
    with pytest.raises(ConfigError) as err:
        load_deployment(write(tmp_path, args))
    assert field in str(err.value)
    assert "applications[0].args" in str(err.value)


def test_autoscaling_when_min_below_max_uses_our_policy_as_serve_reads_it():
    from ray.serve.config import AutoscalingConfig

    from mistral_ray.autoscaling import LLMAutoscalingPolicy

    svc = parse_service({"scaling": {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 8,
                                     "upscale_delay_s": 2, "downscale_to_zero_delay_s": 300}})
    auto = AutoscalingConfig(**llm_deployment_options(svc)["autoscaling_config"])
    assert (auto.min_replicas, auto.max_replicas, auto.upscale_delay_s, auto.downscale_to_zero_delay_s) == (0, 3, 2, 300)
    assert auto.policy.policy_function == "mistral_ray.autoscaling:LLMAutoscalingPolicy"
    assert auto.policy.policy_kwargs == {"target_ongoing_requests": 8, "target_kv_usage": 0.8}
    policy = auto.policy.get_policy()(**auto.policy.policy_kwargs)  # what Serve's controller does
    assert policy.target_ongoing_requests == 8 and type(policy).__name__ == LLMAutoscalingPolicy.__name__


def test_routing_policy_reaches_serve_request_router_config():
    from ray.serve.config import RequestRouterConfig

    from mistral_ray.routing.request_router import LLMRequestRouter

    svc = parse_service({"router": {"routing": {"policy": "prefix_affinity", "imbalance": 3}}})
    rrc = RequestRouterConfig(**llm_deployment_options(svc)["request_router_config"])
    assert rrc.get_request_router_class() is LLMRequestRouter
    assert rrc.request_router_kwargs["policy"] == "prefix_affinity" and rrc.request_routing_stats_period_s == 0.5
    with pytest.raises(ConfigError, match="router.routing.policy"):
        parse_service({"router": {"routing": {"policy": "random"}}})


def test_file_without_our_app_is_rejected(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("applications:\n  - name: other\n    import_path: foo:bar\n")
    with pytest.raises(ConfigError, match="mistral_ray.app:build_app"):
        load_deployment(path)
