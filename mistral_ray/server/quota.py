"""Per-key rate limits that hold for the whole application, however many replicas and nodes serve it.

One `QuotaBank` replica (a Serve deployment of the same application, no CPU reserved) holds every key's
buckets; each LLM replica asks it once per generation request, before the engine sees the request, and gives
a charge back when the engine refused the request without generating. Only deployments with a rate limit
configured have a bank, and only they pay the one handle call per request.

If the bank cannot answer within `limits.quota_timeout_s` (it is being restarted), the request is admitted
and a warning logged: a limit that briefly does not hold is better than an endpoint that stops serving.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from ray import serve
from ray.serve.handle import DeploymentHandle

from mistral_ray.config import LimitsConfig, ServiceConfig
from mistral_ray.server.errors import Refused
from mistral_ray.server.limits import RateLimiter

logger = logging.getLogger("ray.serve")
Charge = tuple[float, float]


class QuotaBank:
    """The application's only copy of every key's request and token buckets."""

    def __init__(self, limits: LimitsConfig):
        self.limiter = RateLimiter(limits.requests_per_minute, limits.tokens_per_minute, limits.max_keys)

    def admit(self, key_id: str, tokens: int) -> tuple[Optional[Charge], Optional[tuple[str, int]]]:
        """(charge, None) when admitted, (None, (message, retry_after_s)) when not."""
        try:
            return self.limiter.admit(key_id, tokens), None
        except Refused as refusal:
            return None, (refusal.message, refusal.retry_after_s)

    def refund(self, key_id: str, charge: Charge) -> None:
        self.limiter.refund(key_id, charge)


class Quota:
    """A replica's view of the bank."""

    def __init__(self, bank: DeploymentHandle, timeout_s: float):
        self.bank, self.timeout_s = bank, timeout_s

    async def admit(self, key_id: str, tokens: int) -> Optional[Charge]:
        """The charge taken, None if the bank did not answer in time; raises Refused(429) over the limit."""
        try:
            charge, refused = await asyncio.wait_for(self.bank.admit.remote(key_id, tokens), self.timeout_s)
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
