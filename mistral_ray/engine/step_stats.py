"""The engine's own count of its requests and KV blocks, at every step, as a vLLM stat logger.

vLLM's scheduler reports running and waiting requests and the share of KV blocks in use (cached blocks no
request holds count as free: they are evictable) with each step's outputs; the AsyncLLM hands them to its
stat loggers on the replica's event loop. This one passes them on to a listener (the replica's router link,
`server/link.py`), which kv_aware's routers read instead of guessing a replica's load from their picks.
"""

from __future__ import annotations

import logging
from typing import Callable

from vllm.v1.metrics.loggers import StatLoggerBase

logger = logging.getLogger("ray.serve")
Listener = Callable[[int, int, float], None]  # (running, waiting, KV blocks in use / all blocks)


class StepStats(StatLoggerBase):
    def __init__(self, vllm_config, engine_index: int = 0, *, listener: Listener):
        self.listener = listener
        self._failed = False

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        if scheduler_stats is None:
            return
        try:
            self.listener(scheduler_stats.num_running_reqs,
                          scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs,
                          float(scheduler_stats.kv_cache_usage))
        except Exception:  # never into vLLM's output handler: that would stop every answer of the replica
            if not self._failed:
                logger.exception("engine step stats: the listener failed (logged once)")
            self._failed = True

    def log_engine_initialized(self) -> None:
        pass
