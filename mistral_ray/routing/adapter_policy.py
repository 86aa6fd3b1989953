"""LoRA adapter affinity: a request for adapter A goes to a replica that holds A, and a hot A spreads.

Wraps the configured policy (pow2, prefix_affinity, kv_aware, session) when the app serves adapters; base
model requests go to it untouched. For adapter requests it narrows the candidates first:

- holders: replicas whose engine holds A (each replica reports the adapters its engine keeps loaded, least
  recently used out as vLLM's own cache, `server/load.py`), and those this router sent A to in the last
  `placed_s` (their report cannot show it yet: a burst of A's first requests must not load it everywhere);
- A's share of the fleet: A's part of the requests this router placed over about `window_s` (decaying),
  times the replicas, times `spread`, rounded up: an adapter with 60 % of the traffic on 2 replicas may use
  both, one with 10 % stays on one. While A has fewer holders with room than that, the least loaded other
  replica is added (it loads A on the request), and so is one when every holder is overloaded (the
  policy's `imbalance` rule);
- the wrapped policy ranks those candidates (the prefix or KV hit among them); the others follow by load.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

from mistral_ray.routing.hint import RouteHint
from mistral_ray.routing.policies import Decision, Load, Policy, _averaged


class DecayingCounts:
    """Requests per adapter, each weighing exp(-age / window_s): a share that follows the traffic's mix."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.counts: dict[Optional[str], float] = {}
        self.when = 0.0

    def _decay(self, now: float) -> None:
        factor = math.exp(-max(0.0, now - self.when) / self.window_s)
        self.when = now
        for key in list(self.counts):
            self.counts[key] *= factor
            if self.counts[key] < 1e-3:
                del self.counts[key]

    def add(self, key: Optional[str], now: float) -> None:
        self._decay(now)
        self.counts[key] = self.counts.get(key, 0.0) + 1.0

    def share(self, key: Optional[str], now: float) -> float:
        self._decay(now)
        total = sum(self.counts.values())
        return self.counts.get(key, 0.0) / total if total else 0.0


class AdapterAffinity(Policy):
    def __init__(self, inner: Policy, spread: float, window_s: float, placed_s: float,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(inner.imbalance, inner.imbalance_ratio, inner.kv_limit, inner.rng)
        self.inner, self.spread, self.placed_s, self.clock = inner, spread, placed_s, clock
        self.name = inner.name
        self.traffic = DecayingCounts(window_s)
        self.placed: dict[str, dict[str, float]] = {}  # replica -> adapter -> when this router last sent it there

    def wanted(self, adapter: str, replicas: int, now: float) -> int:
        """How many replicas `adapter` may hold: its share of the traffic's replicas, times `spread`."""
        share = self.traffic.share(adapter, now)
        return max(1, min(replicas, math.ceil(self.spread * share * replicas - 1e-9)))

    def decide(self, hint: Optional[RouteHint], loads: list[Load]) -> Decision:
        if hint is None or hint.adapter is None or not loads:
            return self.inner.decide(hint, loads)
        now, adapter = self.clock(), hint.adapter
        holders = [l for l in loads if adapter in l.adapters
                   or now - self.placed.get(l.replica, {}).get(adapter, -math.inf) < self.placed_s]
        usable = [l for l in holders if not self._overloaded(l, loads)]
        reason = "adapter"
        if len(usable) < self.wanted(adapter, len(loads), now):
            others = [l for l in loads if l not in holders]
            if others:  # one more replica takes the adapter: the least loaded of the others
                usable.append(min(others, key=lambda l: (_averaged(l), l.kv_usage, self.rng.random())))
                reason = "adapter_spread" if holders else "adapter_new"
        if not usable:
            return Decision(self._by_load(loads), "overloaded")
        ranked = self.inner.decide(hint, usable).ranks
        rest = [l for l in loads if l not in usable]
        return Decision(ranked + (self._by_load(rest) if rest else []), reason)

    def routed(self, hint: Optional[RouteHint], replica: str) -> None:
        now = self.clock()
        adapter = hint.adapter if hint is not None else None
        self.traffic.add(adapter, now)
        if adapter is not None:
            self.placed.setdefault(replica, {})[adapter] = now
        self.inner.routed(hint, replica)

    def forget(self, replica: str) -> None:
        self.placed.pop(replica, None)
        self.inner.forget(replica)
