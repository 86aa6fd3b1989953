"""A replica's load as routing and autoscaling see it: its requests in flight, and the KV they hold.

A request is waiting until its first body byte goes out, then running. KV is estimated per sequence as
min(length, sliding_window) tokens (see routing/policies.py); lengths start from the prompt's characters and
grow with each streamed chunk. A request's slot is reserved before anything is awaited for it (the quota
bank), so the bound `max_ongoing_requests` holds however many arrive at once. Arrivals count, per ingress
router, the authenticated requests it picked this replica for, so that router can tell which of its picks a
report already includes; at most `MAX_PICKERS` routers are remembered (HAProxy strips the header from
clients, but a replica's port can be reached without HAProxy).
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import chain, repeat
from typing import Callable, Iterator, Optional

from mistral_ray.autoscaling import KV_USAGE, RUNNING, WAITING
from mistral_ray.routing.policies import ACTIVE, ADAPTERS, ARRIVALS, SERVED, kv_usage
from mistral_ray.server.auth import Tenant


MAX_PICKERS = 256  # ingress routers, one per node
_PICKER_CHARS = 64


class Sequence:
    """One admitted request: `width` sequences in the engine (n x prompts) of about `tokens` each."""

    __slots__ = ("tokens", "width", "started", "adapter", "tenant", "tag")

    def __init__(self, tokens: float, width: int = 1, tenant: Optional[Tenant] = None):
        self.tokens, self.width, self.started = tokens, max(1, width), False
        self.adapter: Optional[str] = None  # the LoRA adapter it runs on (None: the base model)
        self.tenant = tenant  # whose key sent it (fair share; None: keys off)
        self.tag: Optional[float] = None  # its start tag in the fair order (server/fairness.py)

    def grow(self) -> None:
        """One streamed chunk: a token of one of its `width` sequences."""
        self.tokens += 1 / self.width


class Inflight:
    def __init__(self, sliding_window: Optional[int], kv_capacity_tokens: int, max_ongoing: int):
        self.sliding_window, self.kv_capacity = sliding_window, kv_capacity_tokens
        self.max_ongoing = max_ongoing
        self.sequences: set[Sequence] = set()
        self.arrivals: OrderedDict[str, int] = OrderedDict()
        self.on_change: Optional[Callable[[], None]] = None  # kv_aware's router link publishes each change
        # The LoRA adapters the engine holds: those of its last `adapter_slots` adapter requests, least recently
        # used out, as vLLM's own adapter cache (max_cpu_loras) keeps them. 0: the app serves no adapters.
        self.adapter_slots = 0
        self.adapters: OrderedDict[str, None] = OrderedDict()
        self.served: list[str] = []  # the adapters the replica serves (reconfigure)

    def used(self, adapter: str) -> tuple[bool, list[str]]:
        """A request for `adapter` was admitted: the engine loads it (or keeps it) for that request. Whether
        it had to load it, and the adapters that made room for it."""
        if not self.adapter_slots:
            return False, []
        loaded = adapter not in self.adapters
        self.adapters[adapter] = None
        self.adapters.move_to_end(adapter)
        evicted = []
        while len(self.adapters) > self.adapter_slots:
            evicted.append(self.adapters.popitem(last=False)[0])
        return loaded, evicted

    def serve_adapters(self, served: set[str]) -> list[str]:
        """The adapters the replica serves from now on (reported to routers); those it held and no longer serves
        are not offered any more (the engine's cache lets them go): returned."""
        self.served = sorted(served)
        dropped = [a for a in self.adapters if a not in served]
        for name in dropped:
            del self.adapters[name]
        return dropped

    def arrived(self, picker: Optional[str]) -> None:
        if not picker or len(picker) > _PICKER_CHARS:
            return
        self.arrivals[picker] = self.arrivals.pop(picker, 0) + 1
        if len(self.arrivals) > MAX_PICKERS:
            self.arrivals.popitem(last=False)  # the router seen least recently (one that left)
        self._changed()

    def reserve(self, prompt_tokens: int, width: int = 1, tenant: Optional[Tenant] = None) -> Optional[Sequence]:
        """A slot for one request, or None when the replica holds max_ongoing_requests already. Nothing
        is awaited between the count and the take: concurrent arrivals cannot pass the same count."""
        if len(self.sequences) >= self.max_ongoing:
            return None
        seq = Sequence(prompt_tokens // max(1, width), width, tenant)
        self.sequences.add(seq)
        self._changed()
        return seq

    def remove(self, seq: Sequence) -> None:
        self.sequences.discard(seq)
        self._changed()

    def holders(self) -> Iterator[Tenant]:
        """The tenant of each request held (keys on)."""
        return (s.tenant for s in self.sequences if s.tenant is not None)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def width(self) -> int:
        """Engine sequences the admitted requests make (n x prompts each)."""
        return sum(s.width for s in self.sequences)

    def stats(self) -> dict[str, float]:
        """Queued + running requests and KV use: what the autoscaling policy averages."""
        running = sum(1 for s in self.sequences if s.started)
        lengths = chain.from_iterable(repeat(s.tokens, s.width) for s in self.sequences)
        return {
            WAITING: len(self.sequences) - running,
            RUNNING: running,
            KV_USAGE: kv_usage(lengths, self.sliding_window, self.kv_capacity),
        }

    def routing_stats(self) -> dict:
        stats = {**self.stats(), ARRIVALS: dict(self.arrivals)}
        if self.adapter_slots:
            stats[ADAPTERS], stats[SERVED] = list(self.adapters), self.served
            stats[ACTIVE] = sorted({s.adapter for s in self.sequences if s.adapter})
        return stats


def engine_load(running: int, waiting: int, width: int) -> tuple[int, int, int]:
    """(running, waiting, pending) sequences of a replica: the engine's counts as of its last step, bounded by
    the sequences the gate admitted (`width`: every sequence the engine runs came through it, so more is a
    count from before a request left, e.g. one aborted while the engine had no step to report it), and
    pending, the admitted ones the engine has not counted yet (being rendered, or queued before its next
    step)."""
    running = min(running, width)
    waiting = min(waiting, width - running)
    return running, waiting, width - running - waiting
