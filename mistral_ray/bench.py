"""`mistral-ray bench`: `vllm bench serve`-style numbers for any OpenAI-compatible URL.

Streams completions with seeded random token prompts (fixed input/output lengths, `ignore_eos` so every
request does the same work) at each concurrency, and reports requests/s, output tokens/s, TTFT and
inter-token latency percentiles. Bounded by request count; loopback targets only in tests.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass

import httpx


@dataclass
class Result:
    target: str
    concurrency: int
    requests: int
    errors: int
    duration_s: float
    req_per_s: float
    out_tok_per_s: float
    ttft_ms_p50: float
    ttft_ms_p95: float
    ttft_ms_p99: float
    itl_ms_p50: float
    itl_ms_p95: float


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, list[float], int]:
    start = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"{r.status_code}: {r.text[:200]}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:]).get("choices"):
                    stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("no tokens")
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])], len(stamps)


async def run_level(base_url: str, model: str, concurrency: int, requests: int,
                    input_len: int, output_len: int, vocab: int, seed: int, target: str) -> Result:
    rng = random.Random(seed)
    # Token ids from 3 up skip the special tokens; each request gets its own prompt (no prefix sharing).
    prompts = [[rng.randrange(3, vocab) for _ in range(input_len)] for _ in range(requests)]
    url = f"{base_url.rstrip('/')}/v1/completions"
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    ttfts: list[float] = []
    itls: list[float] = []
    tokens = 0
    errors = 0

    async def worker(client):
        nonlocal tokens, errors
        while not queue.empty():
            prompt = queue.get_nowait()
            body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            try:
                ttft, gaps, n = await _one(client, url, body)
            except Exception:
                errors += 1
                continue
            ttfts.append(ttft)
            itls.extend(gaps)
            tokens += n

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        duration = time.perf_counter() - start
    done = len(ttfts)
    return Result(
        target, concurrency, done, errors, duration, done / duration, tokens / duration,
        1000 * _pct(ttfts, 0.5), 1000 * _pct(ttfts, 0.95), 1000 * _pct(ttfts, 0.99),
        1000 * _pct(itls, 0.5), 1000 * _pct(itls, 0.95),
    )


def run(base_url: str, model: str, concurrencies: list[int], requests: int, input_len: int,
        output_len: int, vocab: int, seed: int, target: str, warmup: int = 4) -> list[Result]:
    asyncio.run(run_level(base_url, model, 2, warmup, input_len, output_len, vocab, seed + 1, target))
    return [
        asyncio.run(run_level(base_url, model, c, max(requests, c * 2), input_len, output_len, vocab, seed, target))
        for c in concurrencies
    ]


def table(results: list[Result]) -> str:
    head = f"{'target':<12}{'conc':>5}{'req':>6}{'err':>5}{'req/s':>8}{'out tok/s':>10}" \
           f"{'TTFT p50':>10}{'p95':>8}{'p99':>8}{'ITL p50':>9}{'p95':>8}"
    rows = [head] + [
        f"{r.target:<12}{r.concurrency:>5}{r.requests:>6}{r.errors:>5}{r.req_per_s:>8.1f}{r.out_tok_per_s:>10.0f}"
        f"{r.ttft_ms_p50:>10.1f}{r.ttft_ms_p95:>8.1f}{r.ttft_ms_p99:>8.1f}{r.itl_ms_p50:>9.1f}{r.itl_ms_p95:>8.1f}"
        for r in results
    ]
    return "\n".join(rows)


def to_json(results: list[Result]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)
