"""Admission limits checked before a request costs an engine anything. Pure logic: no Ray, no I/O.

Per API key, two token buckets (requests/min and tokens/min, OpenAI's RPM/TPM): a bucket holds up to one
minute's allowance and refills continuously, so short bursts pass and sustained excess gets 429 with the
seconds until enough has refilled. Tokens are counted at admission as OpenAI does: the prompt's estimated
tokens plus the completion tokens the engine may produce (asked for, or the limit the engine applies when
absent); a request the engine refuses before generating (a 4xx of its own) is given its tokens back.
Size limits (`max_tokens`, `n`, prompts per batch) give 400 with the parameter named.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from typing import Callable, Optional

from mistral_ray.config import LimitsConfig
from mistral_ray.server.errors import Refused
from mistral_ray.server.generation import Generation


class TokenBucket:
    def __init__(self, per_minute: float, now: Callable[[], float]):
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

    def take(self, amount: float) -> float:
        """Take `amount` (at most a bucket); returns what was taken, for a refund."""
        taken = min(amount, self.capacity)
        self.level -= taken
        return taken

    def give_back(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)


class RateLimiter:
    """Both buckets of every key seen (the QuotaBank holds one for the whole application)."""

    def __init__(self, requests_per_minute: Optional[int], tokens_per_minute: Optional[int], max_keys: int,
                 now: Callable[[], float] = time.monotonic):
        self.rpm, self.tpm, self.now, self.max_keys = requests_per_minute, tokens_per_minute, now, max_keys
        self.buckets: OrderedDict[str, tuple[Optional[TokenBucket], Optional[TokenBucket]]] = OrderedDict()
        self.lock = threading.Lock()  # check and take are one step, whichever thread calls

    def _buckets(self, key_id: str, rpm: Optional[int], tpm: Optional[int]):
        held = self.buckets.get(key_id)
        if held is None:
            while len(self.buckets) >= self.max_keys:  # bounded memory even with many distinct keys
                self.buckets.popitem(last=False)
            held = (None, None)
        if tuple(b.capacity if b else None for b in held) != (rpm, tpm):
            # the key's limits changed (a key file rolled out): what it used stays used
            held = tuple(_resized(b, limit, self.now) for b, limit in zip(held, (rpm, tpm)))
            self.buckets[key_id] = held
        self.buckets.move_to_end(key_id)
        return held

    def admit(self, key_id: str, tokens: int, own: Optional[tuple[Optional[int], Optional[int]]] = None
              ) -> tuple[float, float]:
        """Charge one request and `tokens`, or raise Refused(429). Returns the charge (requests, tokens).
        `own`: the key's own (rpm, tpm), each replacing the default when set."""
        with self.lock:
            return self._admit(key_id, tokens, own)

    def _admit(self, key_id: str, tokens: int, own: Optional[tuple[Optional[int], Optional[int]]]
               ) -> tuple[float, float]:
        rpm, tpm = own or (None, None)
        rpm, tpm = rpm or self.rpm, tpm or self.tpm
        requests, token_bucket = self._buckets(key_id, rpm, tpm)
        waits = [(requests.wait_s(1) if requests else 0.0, "requests", rpm),
                 (token_bucket.wait_s(tokens) if token_bucket else 0.0, "tokens", tpm)]
        wait, what, limit = max(waits)
        if wait > 0:
            raise Refused(429, f"Rate limit reached for {what} per minute (limit {limit}) on this key; "
                          f"retry in {math.ceil(wait)}s.", code="rate_limit_exceeded",
                          retry_after_s=math.ceil(wait), reason="rate_limit")
        return (requests.take(1) if requests else 0.0, token_bucket.take(tokens) if token_bucket else 0.0)

    def refund(self, key_id: str, charge: tuple[float, float]) -> None:
        """Give back (part of) a charge the engine never used (it refused the request before generating)."""
        with self.lock:
            for bucket, amount in zip(self.buckets.get(key_id, ()), charge):
                if bucket is not None and amount:
                    bucket.give_back(amount)


def _resized(bucket: Optional[TokenBucket], per_minute: Optional[int], now) -> Optional[TokenBucket]:
    if not per_minute:
        return None
    fresh = TokenBucket(per_minute, now)
    if bucket is not None:
        bucket.wait_s(0)  # refill to now
        fresh.level = max(0.0, fresh.capacity - (bucket.capacity - bucket.level))
    return fresh


def check_sizes(request: Generation, limits: LimitsConfig) -> None:
    """`n`, the completion tokens asked for and the prompts of a batch within the configured limits, judged
    on the request as the engine reads it (a `"5"` is 5)."""
    cap = limits.max_tokens
    if cap is not None and request.max_tokens is not None and request.max_tokens > cap:
        name = request.max_tokens_param
        raise Refused(400, f"{name} is {request.max_tokens}; this server allows at most {cap}.", param=name,
                      code="max_tokens_too_large")
    if request.n > limits.max_n:
        raise Refused(400, f"n is {request.n}; this server allows at most {limits.max_n} choices per request.",
                      param="n", code="n_too_large")
    if request.prompts > limits.max_batch_prompts:
        raise Refused(400, f"the request has {request.prompts} prompts; this server allows at most "
                      f"{limits.max_batch_prompts} per request.", param="prompt", code="too_many_prompts")


def requested_tokens(request: Generation, chars_per_token: float, limit: Optional[int], context: int) -> int:
    """What a request may cost in tokens, counted before it runs: every prompt's estimate plus the
    completion budget of each of its n x prompts sequences."""
    sequences = request.n * max(1, request.prompts)
    return request.prompt_tokens(chars_per_token) + request.completion_budget(limit, context) * sequences
