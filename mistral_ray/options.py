"""The only translation from a `ServiceConfig` to what Ray Serve, vLLM and the Ray cluster are given.

Serve deployment options for the three deployments, vLLM's arguments, the replicas' environment, and the
data plane's environment (HAProxy and direct ingress are switched on per Ray cluster, by environment
variables every Ray process reads at import: `mistral-ray run`, the tests and the RayService set them).
"""

from __future__ import annotations

import ipaddress
import math
import sys
from pathlib import Path
from typing import Any, Optional

from mistral_ray.config import LLM_DEPLOYMENT, STATE_DIR, DeploymentFile, ServiceConfig
from mistral_ray.engine.fate_share import ENV as FATE_SHARE_ENV
from mistral_ray.engine.step_wait import ENV as STEP_WAIT_ENV
from mistral_ray.proxy import GUARD_ENV, MIGRATION_ENV

INGRESS_ROUTER_DEPLOYMENT = "IngressRouter"
QUOTA_DEPLOYMENT = "QuotaBank"
# Serve imports these by path on the controller and in every handle.
REQUEST_ROUTER = "mistral_ray.routing.request_router:LLMRequestRouter"
AUTOSCALING_POLICY = "mistral_ray.autoscaling:LLMAutoscalingPolicy"
# HAProxy gives up on a silent replica this long after the replica's own timeout would have answered 504.
_HAPROXY_GRACE_S = 10


def vllm_args(cfg: ServiceConfig) -> dict[str, Any]:
    """`vllm serve`'s arguments (engine and OpenAI server), by argument name."""
    e = cfg.engine
    args: dict[str, Any] = dict(
        model=cfg.model.resolved_source(),
        served_model_name=[cfg.model.name],
        revision=cfg.model.revision,
        dtype=e.dtype,
        max_model_len=e.max_model_len,
        max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens,
        block_size=e.block_size,
        enable_prefix_caching=e.enable_prefix_caching,
        tensor_parallel_size=e.tensor_parallel_size,
        enforce_eager=e.enforce_eager,
        seed=e.seed,
        tokenizer_mode=e.tokenizer_mode,
        config_format=e.config_format,
        load_format=e.load_format,
        chat_template=e.chat_template,
        enable_auto_tool_choice=e.enable_auto_tool_choice,
        tool_call_parser=e.tool_call_parser,
        scheduling_policy=e.scheduling_policy,
    )
    if e.device == "cuda":
        args["gpu_memory_utilization"] = e.gpu_memory_utilization
    if e.lora is not None:  # the adapters come from the deployment's user_config, at run time
        args.update(enable_lora=True, max_loras=e.lora.max_loras, max_lora_rank=e.lora.max_lora_rank,
                    max_cpu_loras=e.lora.max_cpu_loras)
    args.update(e.extra_args)
    if cfg.router.routing.policy == "kv_aware":
        # The engine publishes what it caches (tcp://*:0: the node's address, VLLM_HOST_IP, on a free port;
        # the replica reports where), keeps a replay buffer for a router that missed some, and reports each
        # answer's cached prompt tokens (usage.prompt_tokens_details), which the gate compares with what the
        # router predicted. sha256 is vLLM's default block hash; the router computes the same.
        args["kv_events_config"] = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:0",
                                    "replay_endpoint": "tcp://*:0"}
        args["enable_prompt_tokens_details"] = True
        args["prefix_caching_hash_algo"] = "sha256"
    cap = cfg.router.limits.max_tokens
    if cap is not None:
        # The engine's own cap on completion tokens, on every route, asked or not: vLLM takes the smallest of
        # this, the request's value and the rest of the context (a request without max_tokens gets the cap).
        args["override_generation_config"] = {**(args.get("override_generation_config") or {}), "max_new_tokens": cap}
    return {k: v for k, v in args.items() if v is not None}


def replica_env(cfg: ServiceConfig) -> dict[str, str]:
    """Environment of each LLM replica process (read by vLLM at import)."""
    env = {"VLLM_CACHE_ROOT": str(STATE_DIR / "vllm-cache"), "TOKENIZERS_PARALLELISM": "false"}
    if cfg.engine.device == "cpu":
        env["VLLM_TARGET_DEVICE"] = "cpu"
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{cfg.engine.cpu_kvcache_space_gib:g}"
        # Replicas share the machine's cores; pinning OMP threads to the same cores would serialize them.
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return env


def engine_env(cfg: ServiceConfig) -> dict[str, str]:
    """What turns on our vLLM plugins in a replica: the EngineCore ends with its replica (fate_share.py),
    and the step wait (`engine.cpu_step_wait_us`). Kept out of `replica_env`, which the bench also gives
    bare `vllm serve` and ray.serve.llm: they run as shipped."""
    env = {FATE_SHARE_ENV: "1"}
    if cfg.engine.device == "cpu" and cfg.engine.cpu_step_wait_us:
        env[STEP_WAIT_ENV] = str(cfg.engine.cpu_step_wait_us)
    return env


def cluster_env(cfg: ServiceConfig, scripts_dir: Optional[str] = None) -> dict[str, str]:
    """The Ray cluster's environment for this data plane: every Ray process (controller, HAProxy manager,
    replicas) must start with it. Empty values are left unset. `scripts_dir` holds our `mistral-ray-haproxy`
    where the cluster runs (this Python's by default; the image's for Kubernetes)."""
    r = cfg.router
    placement = {"RAY_SERVE_USE_COMPACT_SCHEDULING_STRATEGY": "1" if cfg.scaling.placement == "pack" else "0"}
    if not r.haproxy:
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0", **placement}
    # prefix digests, the body's `user` as the session, or the adapter a request names as its `model`
    needs_body = r.routing.policy != "pow2" or cfg.engine.lora is not None
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        # Replica user code on the replica's own event loop, gRPC between Ray processes, direct ingress.
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1" if needs_body else "0",
        "RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_BUFSIZE": str(r.routing.route_body_bytes),
        "RAY_SERVE_SESSION_ID_HEADER_KEY": r.routing.session_header,
        "RAY_SERVE_HAPROXY_NBTHREAD": str(r.haproxy_threads),
        "RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_TIMEOUT_S": str(r.route_timeout_s),
        # Inactivity on the replica side: a dead node's streams end, and a request waiting for a replica at
        # scale from zero gives up (the replica's own 504 comes first whenever a replica answers).
        "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": str(math.ceil(r.request_timeout_s) + _HAPROXY_GRACE_S),
        # A replica that refused the connection or closed it without a byte of answer: send it elsewhere.
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
        "RAY_SERVE_HAPROXY_RETRIES": str(r.retries),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(cfg.observability.haproxy_metrics_port),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": f"{r.deregister_s:g}",
        **placement,
        # Our wrapper of HAProxy (proxy/haproxy.py): request ids and OpenAI error bodies, and the stream guard.
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(Path(scripts_dir or Path(sys.executable).parent) / "mistral-ray-haproxy"),
        GUARD_ENV: str(r.limits.max_body_bytes if r.stream_guard else 0),
        MIGRATION_ENV: str(r.migration_limit),
    }


def node_env(dep: DeploymentFile) -> dict[str, str]:
    """The environment of a Ray cluster this machine starts for `dep` (`mistral-ray run`, `serve run` after
    `mistral-ray env`): the data plane's, and with a loopback `http_options.host` a Ray whose nodes take the
    loopback address, so its gRPC servers, agents and metrics exporter listen there and nowhere else. On
    Linux Ray otherwise takes the machine's address and binds every interface; this is its own switch for
    single-machine clusters (on by default on macOS and Windows). Never on Kubernetes: pods need their
    address."""
    env = cluster_env(dep.service)
    try:
        loopback = dep.http.host == "localhost" or ipaddress.ip_address(dep.http.host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def _autoscaling(cfg: ServiceConfig) -> dict[str, Any]:
    s = cfg.scaling
    if s.min_replicas == s.max_replicas:
        return {"num_replicas": s.min_replicas}
    return {"autoscaling_config": dict(
        min_replicas=s.min_replicas,
        max_replicas=s.max_replicas,
        initial_replicas=s.initial_replicas,
        upscale_delay_s=s.upscale_delay_s,
        downscale_delay_s=s.downscale_delay_s,
        downscale_to_zero_delay_s=s.downscale_to_zero_delay_s,
        look_back_period_s=s.look_back_period_s,
        metrics_interval_s=s.metrics_interval_s,
        policy=dict(
            policy_function=AUTOSCALING_POLICY,
            policy_kwargs=dict(target_ongoing_requests=s.target_ongoing_requests, target_kv_usage=s.target_kv_usage),
        ),
    )}


def llm_deployment_options(cfg: ServiceConfig) -> dict[str, Any]:
    s, routing = cfg.scaling, cfg.router.routing
    return dict(
        name=LLM_DEPLOYMENT,
        # The replica's own gate answers 503 beyond scaling.max_ongoing_requests; Serve's limit sits above it
        # so that no request waits in Serve's queue, out of the gate's sight.
        max_ongoing_requests=4 * s.max_ongoing_requests,
        ray_actor_options=dict(
            num_cpus=s.replica_cpus,
            num_gpus=s.replica_gpus,
            runtime_env={"env_vars": {**replica_env(cfg), **engine_env(cfg)}},
        ),
        health_check_period_s=s.health_check_period_s,
        health_check_timeout_s=s.health_check_timeout_s,
        # The replica stays reachable router.deregister_s before it closes its port; the drain time its requests
        # get counts from there (Serve's budget covers both, and was cutting streams at drain_timeout_s overall).
        graceful_shutdown_timeout_s=s.drain_timeout_s + (cfg.router.deregister_s if cfg.router.haproxy else 0),
        graceful_shutdown_wait_loop_s=1,
        # What the replicas serve when a file gives no user_config (Serve then falls back to this, and skips
        # reconfigure for None: adapters a file stopped listing would stay).
        user_config={"adapters": {}},
        request_router_config=dict(
            request_router_class=REQUEST_ROUTER,
            request_router_kwargs={**routing.model_dump(), "metrics": cfg.observability.request_metrics,
                                   "adapters": cfg.engine.lora.max_loras if cfg.engine.lora is not None else 0},
            request_routing_stats_period_s=routing.stats_period_s,
            request_routing_stats_timeout_s=max(1.0, routing.stats_period_s),
        ),
        **_autoscaling(cfg),
    )


def ingress_router_options(cfg: ServiceConfig) -> dict[str, Any]:
    """The deployment HAProxy asks which replica gets a request (Serve places one per proxy node)."""
    return dict(name=INGRESS_ROUTER_DEPLOYMENT, max_ongoing_requests=4096,
                ray_actor_options=dict(num_cpus=cfg.router.num_cpus),
                # HAProxy logs every request already; a log line per pick cost a fifth of the router's CPU.
                logging_config=dict(enable_access_log=False))


def quota_options(cfg: ServiceConfig) -> dict[str, Any]:
    """One replica holds every key's buckets, so limits hold for the whole application."""
    return dict(name=QUOTA_DEPLOYMENT, num_replicas=1, max_ongoing_requests=4096,
                ray_actor_options=dict(num_cpus=0))
