"""The Ray Serve deployment that hosts one vLLM engine per replica.

The replica is the unit Serve scales, health-checks and routes to; the engine inside does continuous
batching and paged (sliding-window) KV. The engine is injected through `engine_factory` so the replica can
be exercised without vllm; the default factory is the only path that imports it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from functools import partial
from typing import Any, Optional, Protocol, Union

from ray import serve

from mistral_ray.autoscaling import KV_USAGE, RUNNING, WAITING
from mistral_ray.config import ServiceConfig
from mistral_ray.metrics import TokenMetrics
from mistral_ray.protocol import Head, error_json
from mistral_ray.routing import RouteHint, kv_usage


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
    if cfg.engine.device == "cpu" and cfg.engine.cpu_threads:  # the engine's workers inherit this environment
        os.environ["OMP_NUM_THREADS"] = str(cfg.engine.cpu_threads)
    return await VLLMEngine.start(cfg.engine_kwargs(), ray_metrics=cfg.observability.engine_metrics,
                                  max_prompt_tokens=cfg.router.limits.max_prompt_tokens)


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
        info = self.engine.info()
        self.sliding_window = info.get("sliding_window")
        self.kv_capacity = (info.get("num_kv_blocks") or 0) * (info.get("block_size") or 0)
        self.chars_per_token = cfg.router.routing.chars_per_token
        # In-flight sequences: [estimated tokens so far, started]; a request is waiting until its first chunk.
        self.inflight: dict[object, list] = {}

    async def generate(
        self, route: str, body: bytes, hint: Optional[RouteHint] = None
    ) -> AsyncIterator[Union[Head, str]]:
        prompt_chars = hint.prompt_chars if hint is not None else len(body)
        key = object()
        seq = self.inflight[key] = [int(prompt_chars / self.chars_per_token), False]
        try:
            # Closed explicitly, not left to the garbage collector: closing is what aborts the request in
            # vLLM when the client goes away (see coalesce).
            async with aclosing(self._generate(route, body, seq)) as items:
                async for item in items:
                    yield item
        finally:
            del self.inflight[key]

    async def _generate(self, route: str, body: bytes, seq: list) -> AsyncIterator[Union[Head, str]]:
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

        def produced() -> None:
            seq[0] += 1
            seq[1] = True

        async with aclosing(coalesce(payload, produced)) as coalesced:
            async for chunks in coalesced:
                yield chunks

    def load(self) -> dict[str, float]:
        """Queued + running requests and sliding-window-aware KV use, as routing and autoscaling see them."""
        running = sum(1 for _, started in self.inflight.values() if started)
        return {
            WAITING: len(self.inflight) - running,
            RUNNING: running,
            KV_USAGE: kv_usage((n for n, _ in self.inflight.values()), self.sliding_window, self.kv_capacity),
        }

    def record_routing_stats(self) -> dict[str, float]:
        """Serve's request router reads this every `routing.stats_period_s`."""
        return self.load()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaler reads this every `scaling.metrics_interval_s` (see autoscaling.py)."""
        return self.load()

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


_END = object()


async def coalesce(chunks: AsyncIterator[str], produced: Callable[[], None]) -> AsyncIterator[str]:
    """The engine's SSE chunks, each sent as soon as it exists; chunks that pile up while the previous item
    crosses the Ray hop go together as one item (still plain SSE text). No timer holds anything back, so the
    first token and an idle stream's tokens go out at once, while a loaded replica sends fewer, larger items
    and spends less CPU per token on the hop."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for chunk in chunks:
                produced()
                queue.put_nowait(chunk)
            queue.put_nowait(_END)
        except Exception as exc:
            queue.put_nowait(exc)

    task = asyncio.create_task(pump())
    try:
        while True:
            parts, item = [], await queue.get()
            while True:
                if item is _END or isinstance(item, Exception):
                    if parts:
                        yield "".join(parts)
                    if isinstance(item, Exception):
                        raise item
                    return
                parts.append(item)
                if queue.empty():
                    break
                item = queue.get_nowait()
            yield "".join(parts)
    finally:
        task.cancel()  # the client left or the stream ended: cancelling the engine's generator aborts it
        await asyncio.gather(task, return_exceptions=True)


def _replica_id() -> str:
    """Serve's replica id; the process id when the class runs outside Serve (unit tests)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"pid-{os.getpid()}"


def deployment(cfg: ServiceConfig):
    """The LLM deployment with its Serve options taken from the config."""
    return serve.deployment(LLMServer).options(**cfg.llm_deployment_options())
