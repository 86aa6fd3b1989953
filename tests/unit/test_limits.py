"""Admission limits: token buckets per key (429 + Retry-After), size limits (400), token accounting."""

import pytest

from mistral_ray.server.errors import Refused
from mistral_ray.server.limits import RateLimiter, TokenBucket, check_sizes, requested_tokens


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_bucket_allows_a_minutes_burst_then_refills_continuously():
    clock = Clock()
    b = TokenBucket(60, clock)  # 1 per second
    for _ in range(60):
        assert b.wait_s(1) == 0
        b.take(1)
    assert b.wait_s(1) == pytest.approx(1.0)
    clock.t += 0.5
    assert b.wait_s(1) == pytest.approx(0.5)
    clock.t += 30
    assert b.wait_s(30) == 0  # refilled 30.5, capped at the minute's allowance
    clock.t += 1000
    assert b.level <= 60 and b.wait_s(61) == 0  # one oversized request waits for a full bucket, no longer


def refused(call) -> Refused:
    with pytest.raises(Refused) as exc:
        call()
    return exc.value


def test_rate_limiter_is_per_key_and_says_when_to_retry():
    clock = Clock()
    rl = RateLimiter(requests_per_minute=2, tokens_per_minute=None, max_keys=10, now=clock)
    assert rl.admit("a", 10) == (1, 0) and rl.admit("a", 10) == (1, 0)
    refusal = refused(lambda: rl.admit("a", 10))
    assert refusal.status == 429 and refusal.retry_after_s == 30 and refusal.reason == "rate_limit"
    assert "requests per minute" in refusal.message and refusal.code == "rate_limit_exceeded"
    rl.admit("b", 10)  # another key has its own bucket
    clock.t += 30
    rl.admit("a", 10)


def test_token_limit_counts_prompt_and_requested_completion():
    clock = Clock()
    rl = RateLimiter(requests_per_minute=None, tokens_per_minute=600, max_keys=10, now=clock)
    assert rl.admit("k", 500) == (0, 500)
    refusal = refused(lambda: rl.admit("k", 200))  # 100 left, 100 short at 10 tokens/s
    assert refusal.retry_after_s == 10 and "tokens per minute" in refusal.message
    assert rl.buckets["k"][1].level == 100  # a refused request takes nothing


def test_a_refund_gives_back_what_was_charged_and_no_more():
    clock = Clock()
    rl = RateLimiter(requests_per_minute=3, tokens_per_minute=600, max_keys=10, now=clock)
    charge = rl.admit("k", 500)
    refused(lambda: rl.admit("k", 200))
    rl.refund("k", charge)  # the engine refused that request before generating
    assert rl.buckets["k"][0].level == 3 and rl.buckets["k"][1].level == 600  # capped at a full bucket
    rl.admit("k", 200)
    rl.refund("unknown-key", (1, 100))  # nothing to give back to: no error, no new key


def test_rate_limiter_memory_is_bounded():
    rl = RateLimiter(10, None, max_keys=3)
    for key in "abcdef":
        rl.admit(key, 1)
    assert len(rl.buckets) == 3 and list(rl.buckets) == ["d", "e", "f"]


def test_requested_tokens():
    assert requested_tokens({"max_tokens": 100}, 400, 4.0, 2048) == 200
    assert requested_tokens({"max_tokens": 10, "n": 3}, 0, 4.0, 2048) == 30
    assert requested_tokens({}, 40, 4.0, 2048) == 2058  # no max_tokens: the context is the budget
    assert requested_tokens({"max_tokens": "x", "n": True}, 0, 4.0, 50) == 50  # wrong types: engine's 400


@pytest.mark.parametrize("payload, param", [
    ({"max_tokens": 101}, "max_tokens"),
    ({"max_completion_tokens": 1000}, "max_completion_tokens"),
    ({"max_output_tokens": 1000}, "max_output_tokens"),
    ({"n": 9}, "n"),
])
def test_size_limits_name_the_parameter(payload, param):
    refusal = refused(lambda: check_sizes(payload, max_tokens=100, max_n=8))
    assert refusal.status == 400 and refusal.param == param and str(payload[param]) in refusal.message


def test_sizes_within_limits_or_of_wrong_type_pass_to_the_engine():
    check_sizes({"max_tokens": 100, "n": 8}, 100, 8)
    check_sizes({"max_tokens": 10**30, "n": 10**30}, None, 10**31)
    check_sizes({"max_tokens": "lots", "n": [1]}, 100, 8)
