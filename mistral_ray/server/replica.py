"""The LLM replica: one vLLM engine, served over HTTP by the replica itself.

The replica is the unit Serve scales, health-checks and routes to. With HAProxy it is the application's
ingress (direct ingress: Serve gives it a port of its own and HAProxy forwards each request there); without,
Serve's Python proxy calls the same ASGI app. The app is vLLM's own OpenAI app for this engine, behind our
gate (`gate.py`). The engine is injected through `engine_factory` so the replica can be exercised without
vllm; the default factory is the only path that imports it.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Awaitable, Callable, Optional, Protocol

from ray import serve
from ray.serve.handle import DeploymentHandle

from mistral_ray.config import ConfigError, ServiceConfig, parse_adapters
from mistral_ray.listeners import bind_replica_grpc_to_node
from mistral_ray.metrics import RequestMetrics
from mistral_ray.options import llm_deployment_options, vllm_args
from mistral_ray.routing.policies import KV_EVENTS
from mistral_ray.server.auth import ApiKeys
from mistral_ray.server.checks import Checks
from mistral_ray.server.gate import Gate
from mistral_ray.server.link import RouterLink
from mistral_ray.server.generation import Generation
from mistral_ray.server.load import Inflight
from mistral_ray.server.quota import Quota

logger = logging.getLogger("ray.serve")


class Engine(Protocol):
    def build_app(self) -> Any: ...
    def read_request(self, route: str, payload: dict) -> Generation: ...
    def not_migratable(self, route: str, payload: dict) -> Optional[str]: ...
    def printed_ids(self, ids: tuple) -> tuple: ...
    def info(self) -> dict[str, Any]: ...
    async def set_adapters(self, wanted: dict[str, str]) -> dict[str, list[str]]: ...
    async def check_health(self) -> None: ...
    def shutdown(self) -> None: ...


async def start_vllm(cfg: ServiceConfig, on_step: Optional[Callable[[int, int, float], None]] = None) -> Engine:
    from mistral_ray import tiny_model
    from mistral_ray.engine.vllm_engine import VLLMEngine  # the one place vllm gets imported

    if cfg.model.build_tiny:  # on this replica's node: on a cluster, the builder ran somewhere else
        tiny_model.ensure(cfg.model.resolved_source())
    if cfg.engine.device == "cpu" and cfg.engine.cpu_threads:  # the engine's workers inherit this environment
        os.environ["OMP_NUM_THREADS"] = str(cfg.engine.cpu_threads)
    args = vllm_args(cfg)
    if "kv_events_config" in args:
        # Each replica's events under its own topic; bound on this node's address (the one Ray's own listeners
        # use), where the routers on the other nodes reach it.
        args["kv_events_config"] = {**args["kv_events_config"], "topic": replica_id()}
        os.environ["VLLM_HOST_IP"] = node_address()
    return await VLLMEngine.start(args, ray_metrics=cfg.observability.engine_metrics,
                                  max_prompt_tokens=cfg.router.limits.max_prompt_tokens, on_step=on_step)


def node_address() -> str:
    """This node's address, where Ray's own listeners are (loopback for a loopback deployment)."""
    import ray

    return ray.util.get_node_ip_address()


def haproxy_serves() -> bool:
    """Whether this Ray cluster's Serve runs HAProxy (the cluster's environment, read at import)."""
    from ray.serve._private.constants import RAY_SERVE_ENABLE_HA_PROXY

    return bool(RAY_SERVE_ENABLE_HA_PROXY)


def replica_id() -> str:
    """Serve's replica id; the process id when the class runs outside Serve (unit tests)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"pid-{os.getpid()}"


class LLMServer:
    """One engine and the gate in front of it; reports its load to Serve's router and autoscaler."""

    # Serve keeps traffic off a replica until its constructor returns, so starting the engine here (async)
    # is what makes "replica running" mean "engine ready".
    async def __init__(self, cfg: ServiceConfig, quota: Optional[DeploymentHandle] = None,
                       engine_factory: Optional[Callable[[ServiceConfig], Awaitable[Engine]]] = None):
        bind_replica_grpc_to_node()
        self.cfg = cfg
        self.replica_id = replica_id()
        # kv_aware: the engine's step counts out to the routers, their prompt token ids in (link.py)
        self.link = (RouterLink(node_address(), self.replica_id, cfg.engine.max_model_len or 1 << 17)
                     if cfg.router.routing.policy == "kv_aware" else None)
        factory = engine_factory or functools.partial(start_vllm, on_step=self.link and self.link.engine_step)
        self.engine = await factory(cfg)
        info = self.engine.info()
        self.kv_events = info.get("kv_events")
        kv_tokens = (info.get("num_kv_blocks") or 0) * (info.get("block_size") or 0)
        self.load = Inflight(info.get("sliding_window"), kv_tokens, cfg.scaling.max_ongoing_requests)
        if cfg.engine.lora is not None:
            self.load.adapter_slots = cfg.engine.lora.max_cpu_loras or cfg.engine.lora.max_loras
        if self.link is not None:
            self.link.start(self.load)
        tenants = cfg.router.tenants
        keys = (ApiKeys(cfg.router.api_keys.read_entries(), tenants.tiers, tenants.default_tier)
                if cfg.router.api_keys.enabled else None)
        obs = cfg.observability
        self.metrics = RequestMetrics(cfg.model.name, enabled=obs.request_metrics, key_labels=obs.key_labels,
                                      key_ids=keys.ids if keys else ())
        self.metrics.replica = self.replica_id
        try:
            ctx = serve.get_replica_context()
            self.metrics.configured(ctx.app_name, ctx.deployment, cfg.scaling.min_replicas, cfg.scaling.max_replicas)
        except Exception:
            pass  # outside Serve (unit tests): no deployment to describe
        bank = Quota(quota, cfg.router.limits.quota_timeout_s) if quota is not None else None
        self.checks = Checks(cfg, keys, bank, self.load, self.engine.read_request,
                             info.get("max_model_len") or cfg.engine.max_model_len or 0,
                             getattr(self.engine, "not_migratable", None), getattr(self.engine, "printed_ids", None),
                             info.get("default_max_tokens"))

    async def reconfigure(self, user_config: Optional[dict]) -> None:
        """Serve calls this with the deployment's `user_config` at start and whenever a deploy changes only it:
        the adapters served change in place (config.AdaptersConfig), the replica and its engine stay. A config
        that cannot be applied (a deploy that bypassed `mistral-ray check`) leaves the adapters as they were and
        is logged and named in info(): raising here would make Serve replace every replica, and each would fail
        the same way."""
        import asyncio

        from mistral_ray import tiny_adapters

        try:
            live = parse_adapters(user_config, self.cfg)
            for name, adapter in live.adapters.items():
                if adapter.build_tiny:
                    await asyncio.to_thread(tiny_adapters.ensure, adapter.resolved_source(), name)
        except (ConfigError, OSError) as exc:
            logger.error("user_config not applied, adapters unchanged: %s", exc)
            self.adapter_errors = {"user_config": str(exc)}
            return
        changes = await self.engine.set_adapters({name: a.resolved_source() for name, a in live.adapters.items()})
        self.adapter_errors = changes["failed"]  # kept out, named in info(); the others are served
        self.checks.allowed = {name: frozenset(a.keys) for name, a in live.adapters.items() if a.keys is not None}
        self.checks.models = frozenset({self.cfg.model.name, *changes["served"]})
        for name in self.load.serve_adapters(set(changes["served"])):
            self.metrics.adapters_held.set(0, tags={"model": name, "replica": self.replica_id})

    async def __serve_build_asgi_app__(self):
        """Serve's hook for a late-bound ingress app: built after the engine started."""
        return self.gate()

    def gate(self) -> Gate:
        r = self.cfg.router
        return Gate(self.engine.build_app(), self.checks, self.load, self.metrics, self.replica_id,
                    self.engine.check_health, r.request_timeout_s, r.ready_timeout_s, haproxy_serves(),
                    prompt_ids=self.link.prompt_ids if self.link is not None else None)

    # Both stats hooks are coroutines: Serve runs a plain method on a thread of its pool, where it would read
    # the load's sets while the event loop changes them.
    async def record_routing_stats(self) -> dict:
        """Serve's controller reads this every `routing.stats_period_s` and passes it to every router."""
        stats = self.load.routing_stats()
        if self.kv_events:
            stats[KV_EVENTS] = {**self.kv_events, **(self.link.endpoints if self.link is not None else {})}
        return stats

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaler reads this every `scaling.metrics_interval_s` (see autoscaling.py)."""
        return self.load.stats()

    async def info(self) -> dict[str, Any]:
        # a coroutine: Serve runs a plain method on a thread, where the adapter table may change under it
        link = {"router_link": {"engine_steps": self.link.steps, "most_running": self.link.busiest,
                                "snapshots": self.link.seq}} if self.link is not None else {}
        return {"replica_id": self.replica_id, **self.engine.info(), **link,
                "adapter_errors": getattr(self, "adapter_errors", {})}

    async def check_health(self) -> None:
        """Serve's health check: a dead engine core fails it, and Serve replaces the replica."""
        await self.engine.check_health()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        link = getattr(self, "link", None)
        if link is not None:
            link.close()


def deployment(cfg: ServiceConfig):
    """The LLM deployment, an HTTP ingress of its own, with its Serve options taken from the config."""
    return serve.deployment(serve.ingress()(LLMServer)).options(**llm_deployment_options(cfg))
