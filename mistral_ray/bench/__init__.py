"""`mistral-ray bench`: `vllm bench serve`-style numbers for any OpenAI-compatible URL, and side-by-side runs
of several targets it starts itself (our stack with each routing policy, bare `vllm serve`, ray.serve.llm).

Workloads are seeded and bounded (`workloads.py`); each request is streamed and timed (`load.py`); results go
to a table, JSON and PNG plots, with the engines' prefix-cache hit rate read from their metrics (`report.py`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from mistral_ray.bench.load import Result, drive, summarize
from mistral_ray.bench.report import hit_rate, plot, prefix_cache_counters, table, to_json
from mistral_ray.bench.targets import Target, cpu_ms_per_request
from mistral_ray.bench.workloads import ChatTrace, random_prompts, warmup_prompts

__all__ = ["DEFAULTS", "Result", "run", "run_target", "table", "to_json", "plot", "ChatTrace", "chat_trace"]

# Workload defaults (the CLI shows and takes these). The chat trace is the one the routing acceptance is
# measured on: 3 turns per conversation (LMSYS-Chat-1M averages 2), short shared system prompts, long user
# turns (pasted text, documents), 64-token answers. 4-turn and 6-turn (short-turn) traces: docs/benchmarks.md,
# "Routing on other chat traces" (2026-11-27).
# vLLM's prefix_repetition dataset (`--vllm-client prefix_repetition`): prompts that share one of a few prefixes.
DEFAULTS = dict(requests=64, input_len=128, output_len=64, vocab=961, seed=0, sessions=32, turns=3,
                system_prompts=2, system_words=30, user_words=150, prefix_len=512, suffix_len=64, num_prefixes=16)


def chat_trace(model: str, **overrides) -> ChatTrace:
    """The chat workload with DEFAULTS for whatever `overrides` leaves out."""
    opts = {**DEFAULTS, **overrides}
    return ChatTrace(model, sessions=opts["sessions"], turns=opts["turns"], system_prompts=opts["system_prompts"],
                     system_words=opts["system_words"], user_words=opts["user_words"],
                     output_len=opts["output_len"], seed=opts["seed"])


def _level(target: Target, workload: str, model: str, concurrency: int, opts: dict, progress: bool) -> Result:
    seed = opts["seed"] + concurrency  # a fresh trace per level: no level reuses another's cached prefixes
    if workload == "chat":
        # Twice as many sessions as clients at least: with one per client, every session is always in flight
        # and its next turn goes out the moment its answer is in, nothing else waiting (see `drive`).
        sessions = max(opts["sessions"], 2 * concurrency)
        work = chat_trace(model, **{**opts, "sessions": sessions, "seed": seed})
    else:
        n = max(opts["requests"], 2 * concurrency)
        work = random_prompts(model, n, opts["input_len"], opts["output_len"], opts["vocab"], seed)
    before, cpu = prefix_cache_counters(target.metrics_url), target.cpu_s()
    replies, duration = asyncio.run(drive(target.base_url, work, concurrency, f"{target.label} c={concurrency}",
                                          target.headers, progress))
    cpu = cpu_ms_per_request(cpu, target.cpu_s(), sum(r.ok for r in replies))
    time.sleep(target.metrics_lag_s if before is not None else 0)
    rate = hit_rate(before, prefix_cache_counters(target.metrics_url))
    result = summarize(target.label, workload, concurrency, replies, duration, rate)
    result.memory_mb, result.cpu_ms = target.memory_mb(), cpu
    return result


def run_target(target: Target, model: str, workload: str, concurrencies: list[int], warmup: int = 4,
               progress: bool = True, **opts) -> list[Result]:
    """Warm up, then one bounded run per concurrency level."""
    opts = {**DEFAULTS, **opts}
    if warmup:
        asyncio.run(drive(target.base_url, warmup_prompts(model, warmup), 2, headers=target.headers, progress=False))
    return [_level(target, workload, model, c, opts, progress) for c in concurrencies]


def run(base_url: str, model: str, concurrencies: list[int], requests: int, input_len: int, output_len: int,
        vocab: int, seed: int, target: str, warmup: int = 4, metrics_url: Optional[str] = None,
        progress: bool = False) -> list[Result]:
    """The random-prompt workload against a server that is already running."""
    return run_target(Target(target, base_url, metrics_url), model, "random", concurrencies, warmup, progress,
                      requests=requests, input_len=input_len, output_len=output_len, vocab=vocab, seed=seed)
