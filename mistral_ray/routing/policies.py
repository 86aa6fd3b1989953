"""How a replica is chosen for a request: pure policy logic, no Ray, no vllm.

The Serve request router (`routing/request_router.py`) feeds these policies the live load of each replica and
the request's `RouteHint` (`routing/hint.py`), and the request goes to the first replica of the ranking. Policies:

- `pow2`: two random replicas, the less loaded first (load-aware baseline).
- `prefix_affinity`: the replica holding the longest cached prefix of the prompt, unless it is overloaded
  (load beyond the least loaded replica's by more than `imbalance` and `imbalance_ratio` times, or KV nearly
  full); then `pow2`. A chat's first request (no assistant message yet) goes by load too: all it can share
  is a system prompt.
- `kv_aware` (`kv_policy.py`): the replica whose engine holds the most reusable prompt tokens, from its
  own KV events; prefix_affinity until those are in.
- `session`: the replica a session (header or `user` field) went to before, with the same overload fallback.

Load is queued + running requests as the replicas report them; the overload check sees each load rise at
once and fall slowly (`LoadAverage`, see there why). KV pressure counts each sequence's KV as
min(length, sliding_window) tokens: with Mistral's sliding window a sequence never holds more than W tokens
of KV, however long it grows, so long conversations do not look heavier than they are.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional

from mistral_ray.routing.hint import RouteHint

POLICIES = ("pow2", "prefix_affinity", "kv_aware", "session")
ARRIVALS = "arrivals"  # a replica's routing stat: {picker id: requests it received from that picker}
# A replica's routing stat under kv_aware: where its engine publishes KV events (routing/kv_feed.py).
KV_EVENTS = "kv_events"
ADAPTERS = "adapters"  # a replica's routing stat: the LoRA adapters its engine holds now
SERVED = "served_adapters"  # ... and those it serves
ACTIVE = "active_adapters"  # ... and those of the requests it holds now


@dataclass(frozen=True)
class Load:
    """One replica as the policy sees it."""

    replica: str
    ongoing: int  # queued + running requests
    kv_usage: float = 0.0  # sliding-window-aware KV tokens / KV capacity, 0..1+
    average: Optional[float] = None  # `ongoing` averaged over the last moments (LoadAverage); None: ongoing
    adapters: frozenset = frozenset()  # LoRA adapters its engine holds (adapter_policy.py)
    served: frozenset = frozenset()  # LoRA adapters it serves (its config's, as applied)
    active: frozenset = frozenset()  # LoRA adapters of the requests it holds now


class LoadAverage:
    """Each replica's load as the overload check sees it: it rises at once and falls over about `window_s`
    seconds (an exponential moving average in time on the way down), updated whenever a request is routed.

    Why it falls slowly: replicas answer in batches, and when a batch ends its replica is nearly empty for
    the moment before its conversations' next turns arrive. Compared at that moment, every other replica
    looks `imbalance` above it, and conversations left the replicas holding their prefixes for it, at every
    batch's end (the chat trace at concurrency 32, 2 replicas: docs/benchmarks.md, "Routing: overload needs a
    gap and a ratio", 2026-11-29). A sustained
    imbalance still shows within a window or two. Why it rises at once: a rise is requests that are there,
    most of them our own picks; averaged in slowly, a replica that just took a burst of moved conversations
    still looked light, and drew more (8 moves in 0.12 s where 2 or 3 closed the gap: docs/benchmarks.md,
    "Routing: overload needs a gap and a ratio", 2026-11-29)."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._last: dict[str, tuple[float, float]] = {}  # replica -> (average, when)

    def update(self, replica: str, load: float, now: float) -> float:
        last = self._last.get(replica)
        if last is None or self.window_s <= 0 or load >= last[0]:
            average = float(load)
        else:
            average, when = last
            average += (1 - math.exp(-max(0.0, now - when) / self.window_s)) * (load - average)
        self._last[replica] = (average, now)
        return average

    def forget(self, replica: str) -> None:
        self._last.pop(replica, None)


def sequence_kv_tokens(length: int, sliding_window: Optional[int]) -> int:
    """KV tokens one sequence of `length` tokens holds: at most W with a sliding window."""
    return min(length, sliding_window) if sliding_window else length


def kv_usage(lengths: Iterable[int], sliding_window: Optional[int], capacity_tokens: int) -> float:
    """Share of a replica's KV cache its sequences hold, counting each as min(length, W)."""
    if capacity_tokens <= 0:
        return 0.0
    return sum(sequence_kv_tokens(n, sliding_window) for n in lengths) / capacity_tokens


def _averaged(load: Load) -> float:
    return load.ongoing if load.average is None else load.average


class PrefixIndex:
    """Which prefix blocks each replica has seen recently: an LRU of block digests per replica, sized like
    its KV cache, so a block the engine has likely evicted is forgotten here too."""

    def __init__(self, max_blocks_per_replica: int):
        self.max_blocks = max_blocks_per_replica
        self._blocks: dict[str, OrderedDict[bytes, None]] = {}

    def match(self, replica: str, prefix: tuple[bytes, ...]) -> int:
        """Leading blocks of `prefix` the replica holds (chained digests make the first miss final)."""
        blocks = self._blocks.get(replica)
        if not blocks:
            return 0
        n = 0
        for digest in prefix:
            if digest not in blocks:
                break
            n += 1
        return n

    def insert(self, replica: str, prefix: tuple[bytes, ...]) -> None:
        blocks = self._blocks.setdefault(replica, OrderedDict())
        for digest in prefix:
            blocks[digest] = None
            blocks.move_to_end(digest)
        while len(blocks) > self.max_blocks:
            blocks.popitem(last=False)

    def forget(self, replica: str) -> None:
        self._blocks.pop(replica, None)


@dataclass(frozen=True)
class Decision:
    """Replica ids in preference ranks, and why (a `mistral_ray_routing_decisions_total` label)."""

    ranks: list[list[str]]
    reason: str  # load | prefix | new_prefix | session | overloaded


class Policy:
    """Base: `pow2`. `decide` ranks replica ids; the request goes to the first rank with room."""

    name = "pow2"

    def __init__(self, imbalance: int, imbalance_ratio: float, kv_limit: float,
                 rng: Optional[random.Random] = None):
        self.imbalance, self.imbalance_ratio = imbalance, imbalance_ratio
        self.kv_limit = kv_limit
        self.rng = rng or random.Random()

    def decide(self, hint: Optional[RouteHint], loads: list[Load]) -> Decision:
        return Decision(self._by_load(loads), "load")

    def rank(self, hint: Optional[RouteHint], loads: list[Load]) -> list[list[str]]:
        return self.decide(hint, loads).ranks

    def _by_load(self, loads: list[Load]) -> list[list[str]]:
        """The pow2 order, as ranks: what every policy falls back to."""
        return self._ranks(self._pow2(loads))

    @staticmethod
    def _ranks(order: list[str]) -> list[list[str]]:
        """One replica per rank: the order is ours. (Within a rank Serve would take the replica its
        queue-length cache knows, and a replica added under load may never get a cache entry.)"""
        return [[replica] for replica in order]

    def routed(self, hint: Optional[RouteHint], replica: str) -> None:
        """The request went to `replica` (learn from it)."""

    def forget(self, replica: str) -> None:
        """The replica is gone."""

    def _pow2(self, loads: list[Load]) -> list[str]:
        pair = loads if len(loads) <= 2 else self.rng.sample(loads, 2)
        # Ties break at random, not by KV use: reported KV use is up to a stats period old, and a stale
        # tie-breaker would send every tied request of that period to the same replica.
        return [l.replica for l in sorted(pair, key=lambda l: (l.kv_usage >= self.kv_limit, l.ongoing,
                                                                self.rng.random()))]

    def _overloaded(self, load: Load, loads: list[Load]) -> bool:
        """Beyond the least loaded replica by more than `imbalance` AND more than `imbalance_ratio` times
        its load (the rule of SGLang's and vLLM's routers), or KV nearly full. Why both: between two busy
        replicas a gap of a few requests costs each a little, a lost prefix costs its whole prefill."""
        if load.kv_usage >= self.kv_limit:
            return True
        least, mine = min(_averaged(l) for l in loads), _averaged(load)
        return mine - least > self.imbalance and mine > self.imbalance_ratio * least

    def _prefer(self, favourite: Load, loads: list[Load]) -> list[list[str]]:
        """The favourite alone first; if Serve finds it full, the pow2 choice among the others."""
        others = [l for l in loads if l.replica != favourite.replica]
        return [[favourite.replica]] + self._by_load(others)


class PrefixAffinity(Policy):
    name = "prefix_affinity"

    def __init__(self, index: PrefixIndex, **kwargs):
        super().__init__(**kwargs)
        self.index = index

    def decide(self, hint: Optional[RouteHint], loads: list[Load]) -> Decision:
        # A chat's first request goes by load even when one replica holds its shared system prompt:
        # following that would pile every new conversation onto the replica that cached it first, as long as
        # the load gap stays under `imbalance` (seen at concurrency 8: 128 of 128 requests on one replica).
        if hint is None or not hint.prefix or not hint.follow_up or not loads:
            return Decision(self._by_load(loads), "load")
        scored = [(self.index.match(l.replica, hint.prefix), l) for l in loads]
        best_match = max(m for m, _ in scored)
        if best_match == 0:
            return Decision(self._by_load(loads), "new_prefix")  # nothing cached anywhere: spread by load
        holders = [l for m, l in scored if m == best_match and not self._overloaded(l, loads)]
        if not holders:
            return Decision(self._by_load(loads), "overloaded")
        return Decision(self._prefer(min(holders, key=lambda l: (l.ongoing, l.kv_usage)), loads), "prefix")

    def routed(self, hint: Optional[RouteHint], replica: str) -> None:
        if hint is not None and hint.prefix:
            self.index.insert(replica, hint.prefix)

    def forget(self, replica: str) -> None:
        self.index.forget(replica)


class Session(Policy):
    name = "session"

    def __init__(self, max_sessions: int, **kwargs):
        super().__init__(**kwargs)
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[str, str] = OrderedDict()

    def decide(self, hint: Optional[RouteHint], loads: list[Load]) -> Decision:
        home = self.sessions.get(hint.session) if hint is not None and hint.session else None
        for load in loads:
            if load.replica == home:
                if self._overloaded(load, loads):
                    return Decision(self._by_load(loads), "overloaded")
                return Decision(self._prefer(load, loads), "session")
        return Decision(self._by_load(loads), "load")

    def routed(self, hint: Optional[RouteHint], replica: str) -> None:
        if hint is None or not hint.session:
            return
        self.sessions[hint.session] = replica  # a fallback moves the session: its KV now lives there
        self.sessions.move_to_end(hint.session)
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)

    def forget(self, replica: str) -> None:
        for session in [s for s, r in self.sessions.items() if r == replica]:
            del self.sessions[session]


def make_policy(name: str, *, imbalance: int, imbalance_ratio: float, kv_limit: float, index_blocks: int,
                max_sessions: int, rng: Optional[random.Random] = None, feed=None) -> Policy:
    """`feed`: kv_aware's KVFeed (routing/kv_feed.py), which the request router owns."""
    common = dict(imbalance=imbalance, imbalance_ratio=imbalance_ratio, kv_limit=kv_limit, rng=rng)
    if name == "kv_aware":
        from mistral_ray.routing.kv_policy import KVAware

        return KVAware(feed, PrefixIndex(index_blocks), **common)
    if name == "prefix_affinity":
        return PrefixAffinity(PrefixIndex(index_blocks), **common)
    if name == "session":
        return Session(max_sessions, **common)
    if name == "pow2":
        return Policy(**common)
    raise ValueError(f"unknown routing policy {name!r}; one of {', '.join(POLICIES)}")
