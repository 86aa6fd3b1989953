"""Admission limits checked by the router before a request costs an engine anything.

Per API key, two token buckets (requests/min and tokens/min, OpenAI's RPM/TPM): a bucket holds up to one
minute's allowance and refills continuously, so short bursts pass and sustained excess gets 429 with the
seconds until enough has refilled. Tokens are counted at admission as OpenAI does: the prompt's estimated
tokens plus the completion tokens asked for (`max_tokens`, or the model's context when absent).
Size limits (body, `max_tokens`, `n`) give 400/413 with the parameter named. Pure logic: no Ray, no I/O.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional


class TokenBucket:
    def __init__(self, per_minute: float, now: Callable[[], float] = time.monotonic):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.now = now
        self.stamp = now()

    def _refill(self) -> None:
        t = self.now()
        self.level = min(self.capacity, self.level + (t - self.stamp) * self.rate)
        self.stamp = t

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` is available (0: now). Asking for more than a minute's worth waits for a
        full bucket, so one big request is possible but not two in a row."""
        self._refill()
        needed = min(amount, self.capacity) - self.level
        return 0.0 if needed <= 0 else needed / self.rate

    def take(self, amount: float) -> None:
        self.level -= min(amount, self.capacity)


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    param: Optional[str] = None
    code: Optional[str] = None
    retry_after_s: Optional[int] = None
    reason: str = "validation"


class RateLimiter:
    """Both buckets of every key seen by this router replica (each router replica limits on its own)."""

    def __init__(self, requests_per_minute: Optional[int], tokens_per_minute: Optional[int],
                 now: Callable[[], float] = time.monotonic, max_keys: int = 100_000):
        self.rpm, self.tpm, self.now, self.max_keys = requests_per_minute, tokens_per_minute, now, max_keys
        self.buckets: dict[str, tuple[Optional[TokenBucket], Optional[TokenBucket]]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def admit(self, key_id: str, tokens: int) -> Optional[Refusal]:
        if not self.enabled:
            return None
        if key_id not in self.buckets:
            if len(self.buckets) >= self.max_keys:  # bounded memory even with many distinct keys
                self.buckets.pop(next(iter(self.buckets)))
            self.buckets[key_id] = (
                TokenBucket(self.rpm, self.now) if self.rpm else None,
                TokenBucket(self.tpm, self.now) if self.tpm else None,
            )
        requests, token_bucket = self.buckets[key_id]
        waits = [(requests.wait_s(1) if requests else 0.0, "requests", self.rpm),
                 (token_bucket.wait_s(tokens) if token_bucket else 0.0, "tokens", self.tpm)]
        wait, what, limit = max(waits)
        if wait > 0:
            return Refusal(429, f"Rate limit reached for {what} per minute (limit {limit}) on this key; "
                           f"retry in {math.ceil(wait)}s.", code="rate_limit_exceeded",
                           retry_after_s=math.ceil(wait), reason="rate_limit")
        if requests:
            requests.take(1)
        if token_bucket:
            token_bucket.take(tokens)
        return None


def _int_field(payload: dict[str, Any], name: str) -> Optional[int]:
    value = payload.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_sizes(payload: dict[str, Any], max_tokens: Optional[int], max_n: int) -> Optional[Refusal]:
    """`max_tokens`/`max_completion_tokens` and `n` within the configured limits (types are the engine's
    to validate: a wrong type gets its 400 there)."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = _int_field(payload, name)
        if max_tokens is not None and value is not None and value > max_tokens:
            return Refusal(400, f"{name} is {value}; this server allows at most {max_tokens}.", param=name,
                           code="max_tokens_too_large")
    n = _int_field(payload, "n")
    if n is not None and n > max_n:
        return Refusal(400, f"n is {n}; this server allows at most {max_n} choices per request.", param="n",
                       code="n_too_large")
    return None


def requested_tokens(payload: dict[str, Any], prompt_chars: int, chars_per_token: float, context: int) -> int:
    """What a request may cost in tokens, counted before it runs: prompt estimate + completion budget x n."""
    wanted = _int_field(payload, "max_completion_tokens") or _int_field(payload, "max_tokens") or context
    n = max(1, _int_field(payload, "n") or 1)
    return int(prompt_chars / chars_per_token) + max(0, wanted) * n
