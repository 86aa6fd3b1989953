"""LoRA adapter affinity: a request for adapter A goes to a replica that holds A, and a hot A spreads.

Wraps the configured policy (pow2, prefix_affinity, kv_aware, session) when the app serves adapters; base
model requests go to it untouched. For adapter requests it narrows the candidates first:

Only adapters the replicas report serving count (a made-up `model` goes by the policy alone, and 404s).

- running: replicas with requests for A in their engine now (reported with their load, plus this router's
  picks of the last `fresh_s`): A's next request joins that batch without taking one of the engine's
  `max_loras` slots (vLLM makes a request for an adapter beyond them wait in its queue);
- holders: replicas whose engine holds A (each replica reports the adapters its engine keeps loaded, least
  recently used out as vLLM's own cache, `server/load.py`), and those this router sent A to in the last
  `placed_s` (`adapter_window_s`: their report may not show it yet, so a burst of A's first requests does
  not load it everywhere, and a replica that served A lately stays its home while A's traffic goes on);
- A's share of the fleet: A's part of the requests this router placed over about `window_s` (decaying),
  times the replicas, times `spread`, rounded up: an adapter with 60 % of the traffic on 2 replicas may use
  both, one with 10 % stays on one. While A runs on fewer replicas with room (the policy's `imbalance`
  rule) than that, one more joins them, the least loaded of: those with a free slot that hold A, else any
  with a free slot, else those holding A, else any; while it runs on more (its share fell), only the first
  of them in an order of A's own (rendezvous hashing) get its requests, and the others drain;
- the wrapped policy ranks those candidates (the prefix or KV hit among them); the others follow by load.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Callable, Optional

from mistral_ray.routing.hint import RouteHint
from mistral_ray.routing.policies import Decision, Load, Policy, _averaged


def _rendezvous(adapter: str, replica: str) -> bytes:
    """A replica order of its own for every adapter (highest random weight hashing): stable as replicas come
    and go, and different adapters prefer different replicas."""
    return hashlib.blake2b(f"{adapter}\0{replica}".encode(), digest_size=8).digest()


MAX_PLACED = 1024  # adapters remembered per replica before the expired ones are swept


class DecayingCounts:
    """Requests per adapter, each weighing exp(-age / window_s): a share that follows the traffic's mix.
    Kept as weights growing with time (a share is a ratio: the common decay cancels), so adding is O(1);
    rescaled now and then before the weights overflow."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.counts: dict[Optional[str], float] = {}
        self.total = 0.0
        self.origin: Optional[float] = None

    def _weight(self, now: float) -> float:
        if self.origin is None:
            self.origin = now
        age = (now - self.origin) / self.window_s
        if age > 50:  # rescale: weights relative to now, the negligible ones dropped
            factor = math.exp(-age)
            self.counts = {k: v * factor for k, v in self.counts.items() if v * factor > 1e-6}
            self.total = sum(self.counts.values())
            self.origin, age = now, 0.0
        return math.exp(max(age, 0.0))

    def add(self, key: Optional[str], now: float) -> None:
        weight = self._weight(now)
        self.counts[key] = self.counts.get(key, 0.0) + weight
        self.total += weight

    def share(self, key: Optional[str], now: float) -> float:
        self._weight(now)
        return self.counts.get(key, 0.0) / self.total if self.total else 0.0


class AdapterAffinity(Policy):
    def __init__(self, inner: Policy, spread: float, window_s: float, placed_s: float, slots: int = 1,
                 fresh_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        super().__init__(inner.imbalance, inner.imbalance_ratio, inner.kv_limit, inner.rng)
        self.inner, self.spread, self.placed_s, self.clock = inner, spread, placed_s, clock
        self.slots, self.fresh_s = slots, fresh_s  # max_loras; how long a pick counts as running there
        self.name = inner.name
        self.traffic = DecayingCounts(window_s)
        self.known: frozenset = frozenset()  # the adapters the replicas serve, as last reported
        # replica -> adapter -> when this router last sent it there (names a client made up expire too)
        self.placed: dict[str, dict[str, float]] = {}

    def wanted(self, adapter: str, replicas: int, now: float) -> int:
        """How many replicas `adapter` may hold: its share of the traffic's replicas, times `spread`."""
        share = self.traffic.share(adapter, now)
        return max(1, min(replicas, math.ceil(self.spread * share * replicas - 1e-9)))

    def _running(self, load: Load, now: float) -> set:
        """Adapters with requests in the replica's engine: as it reported them, and as sent there since."""
        recent = {a for a, t in self.placed.get(load.replica, {}).items() if now - t < self.fresh_s}
        return set(load.active) | recent

    def _held(self, load: Load, adapter: str, now: float) -> bool:
        return adapter in load.adapters or now - self.placed.get(load.replica, {}).get(adapter, -math.inf) < self.placed_s

    def decide(self, hint: Optional[RouteHint], loads: list[Load]) -> Decision:
        # Only adapters some replica serves: a made-up name (the router reads bodies before any key check)
        # goes by the policy alone, and the replica answers 404; it is not remembered here.
        self.known = frozenset().union(*(l.served for l in loads))
        if hint is None or hint.adapter not in self.known or not loads:
            return self.inner.decide(hint, loads)
        now, adapter = self.clock(), hint.adapter
        room = [l for l in loads if not self._overloaded(l, loads)]
        running = {l.replica: self._running(l, now) for l in loads}
        # Where A runs now: its requests join the batch without taking another of the engine's max_loras slots.
        usable = [l for l in room if adapter in running[l.replica]]
        reason, wanted = "adapter", self.wanted(adapter, len(loads), now)
        if len(usable) > wanted:  # more than its share: the same `wanted` of them each time, the others drain
            usable = sorted(usable, key=lambda l: _rendezvous(adapter, l.replica))[:wanted]
        elif len(usable) < wanted:
            # One more replica takes A: one with a free slot that holds A, else any with a free slot (a request
            # for an adapter beyond max_loras waits in the engine's queue), else one holding A, else by load.
            others = [l for l in room if l not in usable]
            free = [l for l in others if len(running[l.replica]) < self.slots]
            pool = ([l for l in free if self._held(l, adapter, now)] or free
                    or [l for l in others if self._held(l, adapter, now)] or others)
            if pool:
                usable.append(min(pool, key=lambda l: (_averaged(l), l.kv_usage, self.rng.random())))
                reason = "adapter_spread" if usable[:-1] else "adapter_new"
        if not usable:
            return Decision(self._by_load(loads), "overloaded")
        ranked = self.inner.decide(hint, usable).ranks
        rest = [l for l in loads if l not in usable]
        return Decision(ranked + (self._by_load(rest) if rest else []), reason)

    def routed(self, hint: Optional[RouteHint], replica: str) -> None:
        now = self.clock()
        adapter = hint.adapter if hint is not None and hint.adapter in self.known else None
        self.traffic.add(adapter, now)
        if adapter is not None:
            placed = self.placed.setdefault(replica, {})
            placed[adapter] = now
            if len(placed) > MAX_PLACED:
                for name in [a for a, t in placed.items() if now - t >= self.placed_s]:
                    del placed[name]
        self.inner.routed(hint, replica)

    def forget(self, replica: str) -> None:
        self.placed.pop(replica, None)
        self.inner.forget(replica)
