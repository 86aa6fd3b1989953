"""How a replica is chosen for a request: pure policy logic, no Ray, no vllm.

The Serve request router (`router/request_router.py`) feeds these policies the live load of each replica and
the request's `RouteHint`, and sends the request to the first rank of replicas that has room. Policies:

- `pow2`: two random replicas, the less loaded first (load-aware baseline).
- `prefix_affinity`: the replica holding the longest cached prefix of the prompt, unless it is overloaded
  (load beyond the least loaded replica by more than `imbalance`, or KV nearly full); then `pow2`. A chat's
  first request (no assistant message yet) goes by load too: all it can share is a system prompt.
- `session`: the replica a session (header or `user` field) went to before, with the same overload fallback.

Load is queued + running requests as the replicas report them. KV pressure counts each sequence's KV as
min(length, sliding_window) tokens: with Mistral's sliding window a sequence never holds more than W tokens
of KV, however long it grows, so long conversations do not look heavier than they are.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Optional

POLICIES = ("pow2", "prefix_affinity", "session")


@dataclass(frozen=True)
class RouteHint:
    """What the ingress learned about a request while parsing it, for the routing policy."""

    prefix: tuple[bytes, ...] = ()  # chained digests of the prompt's leading fixed-size blocks
    session: Optional[str] = None
    prompt_chars: int = 0
    follow_up: bool = True  # False for a chat's first request: nothing of its own can be cached yet


@dataclass(frozen=True)
class Load:
    """One replica as the policy sees it."""

    replica: str
    ongoing: int  # queued + running requests
    kv_usage: float = 0.0  # sliding-window-aware KV tokens / KV capacity, 0..1+


def prompt_text(route: str, payload: dict[str, Any]) -> str:
    """The text a prompt's KV cache is keyed by: chat messages in order (role and content), or the prompt."""
    if route == "chat":
        parts = []
        for message in payload.get("messages") or []:
            if isinstance(message, dict):
                parts.append(f"{message.get('role')}\x00{_text(message.get('content'))}\x00")
        return "".join(parts)
    return _text(payload.get("prompt"))


def is_follow_up(route: str, payload: dict[str, Any]) -> bool:
    """Does the prompt carry an earlier answer (a chat with an assistant or tool message)? Completions have
    no turns to tell, so they count as follow-ups (routed by their prefix)."""
    if route != "chat":
        return True
    return any(isinstance(m, dict) and m.get("role") in ("assistant", "tool") for m in payload.get("messages") or [])


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts, or a token-id prompt
        return "".join(_text(v.get("text")) if isinstance(v, dict) else str(v) + " " for v in value)
    return ""


def prefix_blocks(text: str, block_chars: int, max_blocks: int) -> tuple[bytes, ...]:
    """Chained digests of the text's whole leading blocks: block i's digest covers blocks 0..i, so equal
    digests mean equal prefixes (as vLLM's block hashes do, in characters since the router has no tokenizer)."""
    digests: list[bytes] = []
    previous = b""
    data = text.encode("utf-8", "surrogatepass")
    for i in range(min(len(data) // block_chars, max_blocks)):
        previous = hashlib.blake2b(previous + data[i * block_chars:(i + 1) * block_chars], digest_size=8).digest()
        digests.append(previous)
    return tuple(digests)


def sequence_kv_tokens(length: int, sliding_window: Optional[int]) -> int:
    """KV tokens one sequence of `length` tokens holds: at most W with a sliding window."""
    return min(length, sliding_window) if sliding_window else length


def kv_usage(lengths: Iterable[int], sliding_window: Optional[int], capacity_tokens: int) -> float:
    """Share of a replica's KV cache its sequences hold, counting each as min(length, W)."""
    if capacity_tokens <= 0:
        return 0.0
    return sum(sequence_kv_tokens(n, sliding_window) for n in lengths) / capacity_tokens


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


class Policy:
    """Base: `pow2`. `rank` returns replica ids in preference ranks; Serve takes the first rank with room."""

    name = "pow2"

    def __init__(self, imbalance: int = 8, kv_limit: float = 0.95, rng: Optional[random.Random] = None):
        self.imbalance = imbalance
        self.kv_limit = kv_limit
        self.rng = rng or random.Random()

    def rank(self, hint: Optional[RouteHint], loads: list[Load]) -> list[list[str]]:
        return self._by_load(loads)

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
        least = min(l.ongoing for l in loads)
        return load.ongoing - least > self.imbalance or load.kv_usage >= self.kv_limit

    def _prefer(self, favourite: Load, loads: list[Load]) -> list[list[str]]:
        """The favourite alone first; if Serve finds it full, the pow2 choice among the others."""
        others = [l for l in loads if l.replica != favourite.replica]
        return [[favourite.replica]] + self._by_load(others)


class PrefixAffinity(Policy):
    name = "prefix_affinity"

    def __init__(self, index: PrefixIndex, **kwargs):
        super().__init__(**kwargs)
        self.index = index

    def rank(self, hint: Optional[RouteHint], loads: list[Load]) -> list[list[str]]:
        # A chat's first request goes by load even when one replica holds its shared system prompt:
        # following that would pile every new conversation onto the replica that cached it first, as long as
        # the load gap stays under `imbalance` (seen at concurrency 8: 128 of 128 requests on one replica).
        if hint is None or not hint.prefix or not hint.follow_up or not loads:
            return self._by_load(loads)
        scored = [(self.index.match(l.replica, hint.prefix), l) for l in loads]
        best_match = max(m for m, _ in scored)
        if best_match == 0:
            return self._by_load(loads)  # nothing cached anywhere: spread new prefixes by load
        holders = [l for m, l in scored if m == best_match and not self._overloaded(l, loads)]
        if not holders:
            return self._by_load(loads)
        return self._prefer(min(holders, key=lambda l: (l.ongoing, l.kv_usage)), loads)

    def routed(self, hint: Optional[RouteHint], replica: str) -> None:
        if hint is not None and hint.prefix:
            self.index.insert(replica, hint.prefix)

    def forget(self, replica: str) -> None:
        self.index.forget(replica)


class Session(Policy):
    name = "session"

    def __init__(self, max_sessions: int = 100_000, **kwargs):
        super().__init__(**kwargs)
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[str, str] = OrderedDict()

    def rank(self, hint: Optional[RouteHint], loads: list[Load]) -> list[list[str]]:
        home = self.sessions.get(hint.session) if hint is not None and hint.session else None
        for load in loads:
            if load.replica == home and not self._overloaded(load, loads):
                return self._prefer(load, loads)
        return self._by_load(loads)

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


def make_policy(name: str, *, imbalance: int, kv_limit: float, index_blocks: int = 65536,
                rng: Optional[random.Random] = None) -> Policy:
    common = dict(imbalance=imbalance, kv_limit=kv_limit, rng=rng)
    if name == "prefix_affinity":
        return PrefixAffinity(PrefixIndex(index_blocks), **common)
    if name == "session":
        return Session(**common)
    if name == "pow2":
        return Policy(**common)
    raise ValueError(f"unknown routing policy {name!r}; one of {', '.join(POLICIES)}")
