"""A replica's load as routing and autoscaling see it: its requests in flight, and the KV they hold.

A request is waiting until its first body byte goes out, then running. KV is estimated per sequence as
min(length, sliding_window) tokens (see routing/policies.py); lengths start from the prompt's characters and
grow with each streamed chunk. Arrivals count, per ingress router, the requests it picked this replica for,
so that router can tell which of its picks a report already includes.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

from mistral_ray.autoscaling import KV_USAGE, RUNNING, WAITING
from mistral_ray.routing.policies import ARRIVALS, kv_usage


class Sequence:
    __slots__ = ("tokens", "started")

    def __init__(self, tokens: int):
        self.tokens, self.started = tokens, False


class Inflight:
    def __init__(self, chars_per_token: float, sliding_window: Optional[int], kv_capacity_tokens: int,
                 max_ongoing: int):
        self.chars_per_token = chars_per_token
        self.sliding_window, self.kv_capacity = sliding_window, kv_capacity_tokens
        self.max_ongoing = max_ongoing
        self.sequences: set[Sequence] = set()
        self.arrivals: Counter[str] = Counter()

    def has_room(self) -> bool:
        return len(self.sequences) < self.max_ongoing

    def arrived(self, picker: Optional[str]) -> None:
        if picker:
            self.arrivals[picker] += 1

    def add(self, prompt_chars: int) -> Sequence:
        seq = Sequence(int(prompt_chars / self.chars_per_token))
        self.sequences.add(seq)
        return seq

    def remove(self, seq: Sequence) -> None:
        self.sequences.discard(seq)

    def stats(self) -> dict[str, float]:
        """Queued + running requests and KV use: what the autoscaling policy averages."""
        running = sum(1 for s in self.sequences if s.started)
        return {
            WAITING: len(self.sequences) - running,
            RUNNING: running,
            KV_USAGE: kv_usage((s.tokens for s in self.sequences), self.sliding_window, self.kv_capacity),
        }

    def routing_stats(self) -> dict:
        return {**self.stats(), ARRIVALS: dict(self.arrivals)}
