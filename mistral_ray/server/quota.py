"""Per-key rate limits that hold for the whole application, however many replicas and nodes serve it.

One `QuotaBank` replica (a Serve deployment of the same application, no CPU reserved) holds every key's
buckets; each LLM replica asks it once per generation request, before the engine sees the request, and gives
the tokens back when the engine refused the request without generating. Applications with a rate limit or API
keys have a bank (a key file line may carry the key's own `rpm=`/`tpm=`); only requests of a key with a
limit (its own or the application's) pay the one handle call.

A request HAProxy sends again after its replica died without answering (`router.retries`) carries the same
`REQUEST_ID_HEADER`, which HAProxy sets on every request (overwriting any a client sent): the bank charges
an id once and admits up to `retries` repeats of it free, so a retried request is never charged twice.

If the bank cannot answer within `limits.quota_timeout_s` (it is being restarted), the request is admitted
and a warning logged: a limit that briefly does not hold is better than an endpoint that stops serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Optional

from ray import serve
from ray.serve.handle import DeploymentHandle

from mistral_ray.config import LimitsConfig, ServiceConfig
from mistral_ray.listeners import bind_replica_grpc_to_node
from mistral_ray.server.errors import Refused
from mistral_ray.server.limits import RateLimiter

logger = logging.getLogger("ray.serve")
Charge = tuple[float, float]
FREE: Charge = (0.0, 0.0)


class QuotaBank:
    """The application's only copy of every key's request and token buckets. Its methods are coroutines,
    so Serve runs them one at a time on the bank's event loop (and the limiter locks besides)."""

    def __init__(self, limits: LimitsConfig, retries: int = 0, remember_s: float = 300.0,
                 now=time.monotonic):
        bind_replica_grpc_to_node()
        self.limiter = RateLimiter(limits.requests_per_minute, limits.tokens_per_minute, limits.max_keys, now)
        self.retries, self.remember_s, self.now = retries, remember_s, now
        self.max_ids = limits.max_keys
        self.charged: OrderedDict[str, list] = OrderedDict()  # key id + request id -> [stamp, free repeats left]

    async def admit(self, key_id: str, tokens: int, request_id: Optional[str] = None,
                    own: Optional[tuple[Optional[int], Optional[int]]] = None
                    ) -> tuple[Optional[Charge], Optional[tuple[str, int]]]:
        """(charge, None) when admitted, (None, (message, retry_after_s)) when not. `own`: the key's own
        (rpm, tpm) from the key file, in place of the application's."""
        seen = f"{key_id}\x00{request_id}" if request_id else None
        if seen is not None and self._repeat(seen):
            return FREE, None
        try:
            charge = self.limiter.admit(key_id, tokens, own)
        except Refused as refusal:
            return None, (refusal.message, refusal.retry_after_s)
        if seen is not None and self.retries:
            self.charged[seen] = [self.now(), self.retries]
            while len(self.charged) > self.max_ids:
                self.charged.popitem(last=False)
        return charge, None

    def _repeat(self, seen: str) -> bool:
        """Is this a retry of a request already charged (and has it free repeats left)?"""
        horizon = self.now() - self.remember_s
        while self.charged and next(iter(self.charged.values()))[0] < horizon:
            self.charged.popitem(last=False)
        entry = self.charged.get(seen)
        if entry is None or entry[1] <= 0:
            return False
        entry[1] -= 1
        return True

    async def refund(self, key_id: str, charge: Charge) -> None:
        self.limiter.refund(key_id, charge)


class Quota:
    """A replica's view of the bank."""

    def __init__(self, bank: DeploymentHandle, timeout_s: float):
        self.bank, self.timeout_s = bank, timeout_s

    async def admit(self, key_id: str, tokens: int, request_id: Optional[str] = None,
                    own: Optional[tuple[Optional[int], Optional[int]]] = None) -> Optional[Charge]:
        """The charge taken, None if the bank did not answer in time; raises Refused(429) over the limit."""
        try:
            charge, refused = await asyncio.wait_for(self.bank.admit.remote(key_id, tokens, request_id, own),
                                                     self.timeout_s)
        except Exception as exc:
            logger.warning("quota bank unavailable (%s); request admitted without a rate check", type(exc).__name__)
            return None
        if refused is not None:
            message, retry_after_s = refused
            raise Refused(429, message, code="rate_limit_exceeded", retry_after_s=retry_after_s, reason="rate_limit")
        return charge

    def refund(self, key_id: str, charge: Charge) -> None:
        self.bank.refund.remote(key_id, charge)  # fire and forget: nobody waits for a refund


def deployment(cfg: ServiceConfig):
    from mistral_ray.options import quota_options

    return serve.deployment(QuotaBank).options(**quota_options(cfg))
