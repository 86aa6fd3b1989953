"""Driving a workload against an OpenAI-compatible URL and summarizing what came back."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Optional

import httpx

from mistral_ray.bench.workloads import Call, ChatTrace
from mistral_ray.server.errors import REPLICA_HEADER

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
_END_OF_WORK = object()


@dataclass
class Reply:
    ok: bool
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)  # between SSE events (servers may put several tokens in one)
    tokens: int = 0  # output tokens, from the server's usage
    text: str = ""
    replica: Optional[str] = None
    error: str = ""
    session: Optional[int] = None  # chat trace: which conversation this turn belongs to
    model: Optional[str] = None  # the request's `model` (the LoRA bench: which adapter)
    e2e: float = 0.0

    @property
    def tpot(self) -> Optional[float]:
        """Time per output token after the first: (e2e - TTFT) / (tokens - 1)."""
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.ok and self.tokens > 1 else None


async def send(client: httpx.AsyncClient, base_url: str, call: Call, headers: dict[str, str]) -> Reply:
    """One streamed request: time to first token and to the end, gaps between events, the answer text, and
    the output tokens the server's usage reports (an SSE event may carry two tokens: vLLM sends a token
    whose bytes do not end a character together with the next one)."""
    start = time.perf_counter()
    stamps: list[float] = []
    parts: list[str] = []
    tokens = None
    try:
        async with client.stream("POST", base_url + PATHS[call.route], json=call.body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return Reply(False, error=f"{r.status_code}: {r.text[:200]}")
            replica = r.headers.get(REPLICA_HEADER)
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Reply(False, error=str(event["error"])[:200], replica=replica)
                if event.get("usage"):
                    tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or []:
                    stamps.append(time.perf_counter())
                    parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    except httpx.HTTPError as exc:
        return Reply(False, error=repr(exc))
    end = time.perf_counter()
    if not stamps:
        return Reply(False, error="no tokens", replica=replica)
    if tokens is None:
        return Reply(False, error="no usage in the stream (stream_options.include_usage)", replica=replica)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return Reply(True, stamps[0] - start, gaps, tokens, "".join(parts), replica, e2e=end - start)


def _progress(total: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="req", leave=False, dynamic_ncols=True)


async def drive(base_url: str, work: list[Call] | ChatTrace, concurrency: int, label: str = "",
                headers: Optional[dict[str, str]] = None, progress: bool = True,
                transport: Optional[httpx.AsyncBaseTransport] = None) -> tuple[list[Reply], float]:
    """Send `work` with at most `concurrency` requests in flight. A ChatTrace's sessions interleave, as users
    who read and type between turns do: a session's next turn (sent once its previous answer is in) joins
    the other sessions' waiting turns at a random place (seeded by the trace), as users' think times differ.
    Why not at once: the turn found its previous replica freshly unloaded, and a load-aware policy sent it
    back there more often than chance. Why not at the back: the sessions then cycle in a fixed order, and
    when their count is a multiple of the concurrency, request k takes the slot request k - concurrency
    freed, so pow2 sent every turn of a session to the same replica (the bench's chat trace, 32 sessions at
    c=8: pow2 48 / 48 at the 40.0 % hit rate of one replica). Returns replies and seconds."""
    base_url = base_url.rstrip("/")
    headers = headers or {}
    replies: list[Reply] = []
    chat = isinstance(work, ChatTrace)
    total = work.requests if chat else len(work)
    bar = _progress(total, label) if progress else None
    waiting: deque = deque([(s, 0) for s in range(work.sessions)] if chat else work)
    waiting.extend([_END_OF_WORK] * (concurrency if total == 0 else 0))
    ready = asyncio.Semaphore(len(waiting))
    shuffle = random.Random(work.seed if chat else 0)

    def put(job, anywhere: bool = False) -> None:
        waiting.insert(shuffle.randint(0, len(waiting)) if anywhere else len(waiting), job)
        ready.release()

    async def get():
        await ready.acquire()
        return waiting.popleft()

    async def worker(client: httpx.AsyncClient) -> None:
        while (job := await get()) is not _END_OF_WORK:
            if chat:
                session, turn = job
                call = work.call(session, turn)
                reply = await send(client, base_url, call, headers)
                reply.session = session
                if reply.ok:
                    work.answered(call, reply.text)
                if turn + 1 < work.turns:
                    put((session, turn + 1), anywhere=True)
            else:
                reply = await send(client, base_url, job, headers)
                reply.model = job.body.get("model")
            replies.append(reply)
            bar and bar.update()
            if len(replies) == total:
                for _ in range(concurrency):
                    put(_END_OF_WORK)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits, transport=transport) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        duration = time.perf_counter() - start
    if bar:
        bar.close()
    return replies, duration


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@dataclass
class Result:
    target: str
    workload: str
    concurrency: int
    requests: int
    errors: int
    duration_s: float
    req_per_s: float
    out_tok_per_s: float
    ttft_ms_p50: float
    ttft_ms_p95: float
    ttft_ms_p99: float
    tpot_ms_p50: float
    tpot_ms_p95: float
    itl_ms_p50: float
    itl_ms_p95: float
    itl_ms_p99: float
    prefix_cache_hit_rate: Optional[float] = None
    per_replica: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)
    memory_mb: Optional[dict[str, float]] = None  # the target's processes after the level: rss, pss
    cpu_ms: Optional[dict[str, float]] = None  # the target's CPU per request during the level, by process kind


def summarize(target: str, workload: str, concurrency: int, replies: list[Reply], duration: float,
              hit_rate: Optional[float] = None) -> Result:
    good = [r for r in replies if r.ok]
    ttfts = [r.ttft for r in good]
    tpots = [r.tpot for r in good if r.tpot is not None]
    gaps = [g for r in good for g in r.gaps]
    return Result(
        target, workload, concurrency, len(good), len(replies) - len(good), duration, len(good) / duration,
        sum(r.tokens for r in good) / duration,
        1000 * _pct(ttfts, 0.5), 1000 * _pct(ttfts, 0.95), 1000 * _pct(ttfts, 0.99),
        1000 * _pct(tpots, 0.5), 1000 * _pct(tpots, 0.95),
        1000 * _pct(gaps, 0.5), 1000 * _pct(gaps, 0.95), 1000 * _pct(gaps, 0.99),
        hit_rate, dict(Counter(r.replica for r in good if r.replica)),
        [r.error for r in replies if not r.ok][:3],
    )
