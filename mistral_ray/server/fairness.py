"""Weighted fair share between API keys on one replica: who is refused when it is nearly full, and in which
order its engine runs what waits. Pure logic: no Ray, no I/O, no vLLM.

The queue lives in the engine (vLLM's priority scheduling), not in front of it: a request is forwarded at
once with a priority, so nothing waits in Python, no timer holds a first token and no process is added per
token. Priority = tier band + start tag. The tag is start-time fair queueing's (Goyal et al., 1996) on the
tokens a request asks for: a key's next request starts where its last one finished (`finish`) or at the
replica's virtual clock, whichever is later, and finishes `tokens / weight` later (what a request did not use
comes back when it ends). The clock is the smallest start tag among the requests the replica holds (none
held: the largest finish tag, so no debt outlives an idle replica). A key that floods runs far ahead of the
clock, and its newest requests carry the largest tags: they wait, and are what vLLM preempts first (it
preempts the largest priority). A key that comes back after a pause starts at the clock (no credit saved
up beyond the oldest request held): ahead of a flood's backlog.

Admission: up to `soft` requests anyone is admitted; from there to the bound (max_ongoing_requests, where
everyone gets 503) only a key that is not the heaviest: in-flight requests per weight, a lower tier counted
heavier than any higher one. The heaviest key is refused first, and a light key finds the reserve free.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterable, Optional

from mistral_ray.server.auth import Tenant

# Tiers are 10^15 tag units apart: a tag (tokens per weight) reaches that after ~300 years at 10^5 tokens/s.
BAND = 10 ** 15


@dataclass
class Ticket:
    """What the gate tells the engine about one request, and what the engine tells back (engine/ reads it)."""

    priority: int = 0  # vLLM's: lower runs first
    queued_s: Optional[float] = None  # set by the engine: queued -> first scheduled, by its own clock


# Set by the gate around vLLM's app for each generation request; the engine's generate reads it.
TICKET: ContextVar[Optional[Ticket]] = ContextVar("mistral_ray_ticket", default=None)


class FairShare:
    def __init__(self, capacity: int, reserve: float):
        # at least one request is always admitted: a reserve as large as the replica leaves it one
        self.soft = max(1, capacity - max(1, math.ceil(capacity * reserve))) if reserve > 0 else capacity
        self.clock = 0.0  # virtual time (never goes back)
        self.finish: dict[str, float] = {}  # key id -> finish tag of its latest admitted request

    def refuses(self, tenant: Tenant, holders: Iterable[Tenant]) -> bool:
        """Is `tenant`'s next request refused, given the tenants of the requests the replica holds (one
        entry per request)? Only from `soft` on, and only for the heaviest key."""
        held: dict[str, int] = {}
        tenants: dict[str, Tenant] = {}
        total = 0
        for holder in holders:
            held[holder.key_id] = held.get(holder.key_id, 0) + 1
            tenants[holder.key_id] = holder
            total += 1
        if total < self.soft:
            return False
        mine = _weight(tenant, held.get(tenant.key_id, 0) + 1)
        return not any(_weight(other, held[key]) > mine for key, other in tenants.items() if key != tenant.key_id)

    def now(self, held: Iterable[float] = ()) -> float:
        """The virtual clock, given the start tags of the requests the replica holds: the smallest (none
        held: the largest finish tag). It never goes back. Not the newest running tag (start-time fair
        queueing's "in service" on one server): with one, a light key's request tied the flood's newest, the
        ones vLLM preempts first, and waited seconds (docs/benchmarks.md, "Noisy neighbours")."""
        now = min(held, default=None)
        if now is None:
            now = max(self.finish.values(), default=0.0)
        self.clock = max(self.clock, now)
        return self.clock

    def tag(self, tenant: Tenant, tokens: float, held: Iterable[float] = ()) -> float:
        """The start tag of `tenant`'s next request, which asks for `tokens`; its finish tag is remembered."""
        start = max(self.now(held), self.finish.get(tenant.key_id, 0.0))
        self.finish[tenant.key_id] = start + max(1.0, tokens) / tenant.weight
        return start

    def unused(self, tenant: Tenant, tokens: float) -> None:
        """A request of `tenant` ended having used `tokens` fewer than it was tagged for (an answer shorter
        than its budget): its key's finish tag comes back by as much, not behind the clock."""
        if tokens > 0 and tenant.key_id in self.finish:
            self.finish[tenant.key_id] = max(self.clock, self.finish[tenant.key_id] - tokens / tenant.weight)

    @staticmethod
    def priority(tenant: Tenant, tag: float) -> int:
        return tenant.priority * BAND + int(min(max(tag, 0.0), BAND - 1))


def _weight(tenant: Tenant, requests: int) -> tuple[int, float]:
    """How heavy a key holding `requests` is: its tier first (a lower tier is heavier), then per weight."""
    return tenant.priority, requests / tenant.weight
