"""The Ray Serve deployment that hosts one vLLM engine per replica.

The replica is the unit Serve scales, health-checks and routes to; the engine inside does continuous
batching and paged (sliding-window) KV. The engine is injected through `engine_factory` so the replica can
be exercised without vllm; the default factory is the only path that imports it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, Optional, Protocol, Union

from ray import serve

from mistral_ray.config import ServiceConfig
from mistral_ray.metrics import TokenMetrics
from mistral_ray.protocol import Head, error_json


class Engine(Protocol):
    async def handle(
        self, route: str, body: bytes, on_usage: Optional[Callable[[int, int], None]] = None
    ) -> tuple[int, Union[str, AsyncIterator[str]]]: ...
    def info(self) -> dict[str, Any]: ...
    async def check_health(self) -> None: ...
    def shutdown(self) -> None: ...


async def start_vllm(cfg: ServiceConfig) -> Engine:
    from mistral_ray import tiny_model
    from mistral_ray.engine.vllm_engine import VLLMEngine  # the one place vllm gets imported

    if cfg.model.build_tiny:  # on this replica's node: on a cluster, the builder ran somewhere else
        tiny_model.ensure(cfg.model.resolved_source())
    return await VLLMEngine.start(cfg.engine_kwargs(), ray_metrics=cfg.observability.engine_metrics)


class LLMServer:
    """One engine, exposed to the router as a stream of `Head` then body chunks."""

    # Serve keeps traffic off a replica until its constructor returns, so starting the engine here (async)
    # is what makes "replica running" mean "engine ready".
    async def __init__(
        self, cfg: ServiceConfig, engine_factory: Optional[Callable[[ServiceConfig], Awaitable[Engine]]] = None
    ):
        self.engine = await (engine_factory or start_vllm)(cfg)
        self.replica_id = _replica_id()
        self.tokens = TokenMetrics(cfg.model.name, enabled=cfg.observability.router_metrics)

    async def generate(self, route: str, body: bytes) -> AsyncIterator[Union[Head, str]]:
        try:
            status, payload = await self.engine.handle(route, body, on_usage=partial(self.tokens.count, route))
        except Exception as exc:  # the engine failed this request; the replica keeps serving others
            yield Head(500, self.replica_id, stream=False)
            yield error_json(500, f"engine error: {type(exc).__name__}: {exc}")
            return
        if isinstance(payload, str):
            yield Head(status, self.replica_id, stream=False)
            yield payload
            return
        yield Head(status, self.replica_id, stream=True)
        async for chunk in payload:
            yield chunk

    def info(self) -> dict[str, Any]:
        return {"replica_id": self.replica_id, **self.engine.info()}

    async def ready(self) -> str:
        await self.engine.check_health()
        return self.replica_id

    async def check_health(self) -> None:
        """Serve's health check: a dead engine core fails it, and Serve replaces the replica."""
        await self.engine.check_health()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _replica_id() -> str:
    """Serve's replica id; the process id when the class runs outside Serve (unit tests)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"pid-{os.getpid()}"


def deployment(cfg: ServiceConfig):
    """The LLM deployment with its Serve options taken from the config."""
    return serve.deployment(LLMServer).options(**cfg.llm_deployment_options())
