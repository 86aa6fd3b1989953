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


def test_a_keys_own_limits_replace_the_defaults_for_that_key_only():
    clock = Clock()
    rl = RateLimiter(requests_per_minute=2, tokens_per_minute=None, max_keys=10, now=clock)
    for _ in range(5):
        rl.admit("big", 10, own=(5, None))  # its key file line says rpm=5
    assert refused(lambda: rl.admit("big", 10, own=(5, None))).retry_after_s == 12
    rl.admit("small", 10), rl.admit("small", 10)
    assert refused(lambda: rl.admit("small", 10)).retry_after_s == 30  # the default, 2/min
    # a key with only its own tokens limit keeps the default requests limit beside it
    rl.admit("tokens", 900, own=(None, 1000))
    refusal = refused(lambda: rl.admit("tokens", 200, own=(None, 1000)))
    assert "tokens per minute (limit 1000)" in refusal.message
    # the key file rolled out with a higher limit: what it used stays used (no fresh bucket to bypass it)
    rl.admit("small", 10, own=(4, None))
    rl.admit("small", 10, own=(4, None))
    assert refused(lambda: rl.admit("small", 10, own=(4, None))).status == 429
    assert refused(lambda: rl.admit("small", 10)).status == 429  # and back: no fresh bucket either way
    unlimited = RateLimiter(None, None, max_keys=10, now=clock)
    for _ in range(3):
        unlimited.admit("own", 1, own=(3, None))
    assert refused(lambda: unlimited.admit("own", 1, own=(3, None))).status == 429


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


CHAT = {"messages": [{"role": "user", "content": "x" * 400}]}


def limits(**kw):
    from mistral_ray.config import LimitsConfig

    return LimitsConfig(**kw)


def test_requested_tokens_count_every_prompt_and_choice():
    # "user\0" + the content + "\0": 406 characters, 101 tokens at 4 characters a token
    assert requested_tokens(read("chat", {**CHAT, "max_tokens": 100}), 4.0, None, 2048) == 101 + 100
    assert requested_tokens(read("chat", {**CHAT, "max_tokens": 10, "n": 3}), 4.0, None, 2048) == 101 + 30
    assert requested_tokens(read("chat", CHAT), 4.0, None, 2048) == 101 + 2048  # no max_tokens, no cap: the context
    assert requested_tokens(read("chat", CHAT), 4.0, 32, 2048) == 101 + 32  # no max_tokens: the engine's cap
    assert requested_tokens(read("completions", {"prompt": "x" * 40}), 4.0, None, 2048) == 26  # vLLM's default 16
    # A batch: every prompt's tokens (token ids exactly) and n x prompts sequences of the budget.
    batch = read("completions", {"prompt": ["x" * 40, "y" * 80], "max_tokens": 5, "n": 2})
    assert requested_tokens(batch, 4.0, None, 2048) == 10 + 20 + 5 * 4
    ids = read("completions", {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 1})
    assert ids.prompt_tokens(4.0) == 5 and requested_tokens(ids, 4.0, None, 2048) == 5 + 2


@pytest.mark.parametrize("route, payload, param", [
    ("completions", {"prompt": "x", "max_tokens": 101}, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": "101"}, "max_tokens"),  # vLLM reads "101" as 101
    ("completions", {"prompt": "x", "max_tokens": 101.0}, "max_tokens"),
    ("chat", {**CHAT, "max_completion_tokens": 1000}, "max_completion_tokens"),
    ("chat", {**CHAT, "max_tokens": "1000"}, "max_tokens"),
    ("responses", {"input": "x", "max_output_tokens": 1000}, "max_output_tokens"),
    ("messages", {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "500"}, "max_tokens"),
    ("chat", {**CHAT, "n": "9"}, "n"),
    ("completions", {"prompt": "x", "n": 9.0}, "n"),
    ("completions", {"prompt": ["a"] * 33}, "prompt"),
])
def test_size_limits_judge_the_request_as_the_engine_reads_it(route, payload, param):
    refusal = refused(lambda: check_sizes(read(route, payload), limits(max_tokens=100, max_n=8)))
    assert refusal.status == 400 and refusal.param == param


def test_sizes_within_limits_pass():
    check_sizes(read("chat", {**CHAT, "max_tokens": 100, "n": 8}), limits(max_tokens=100, max_n=8))
    # vLLM's chat takes max_completion_tokens over the deprecated max_tokens: that is what runs
    check_sizes(read("chat", {**CHAT, "max_tokens": 10**6, "max_completion_tokens": 5}), limits(max_tokens=100))
    check_sizes(read("completions", {"prompt": ["a"] * 32}), limits())


def read(route, payload):
    from mistral_ray.engine.requests import read as engine_read  # vLLM's own request models

    return engine_read(route, payload)


def test_the_bank_charges_a_retried_request_once():
    import asyncio

    from mistral_ray.server.quota import FREE, QuotaBank

    clock = Clock()
    bank = QuotaBank(limits(requests_per_minute=3), retries=1, remember_s=60, now=clock)
    admit = lambda key, rid: asyncio.run(bank.admit(key, 10, rid))  # noqa: E731
    first, _ = admit("k", "req-1")
    assert first == (1.0, 0.0) and admit("k", "req-1") == (FREE, None)  # HAProxy's retry: free
    assert admit("k", "req-1")[0] == (1.0, 0.0)  # a third time is no retry (router.retries 1): charged
    assert admit("other", "req-1")[0] == (1.0, 0.0)  # another key's id is its own
    assert admit("k", None)[0] == (1.0, 0.0) and admit("k", None)[1] is not None  # k's 3 used: 429
    clock.t += 61
    assert admit("k", "req-2")[0] == (1.0, 0.0) and "k\x00req-1" not in bank.charged  # forgotten after 60 s


def test_the_limiter_is_exact_under_threads():
    import sys
    import threading

    rl = RateLimiter(requests_per_minute=1000, tokens_per_minute=None, max_keys=10, now=lambda: 0.0)
    admitted = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch within check-then-take (without the lock: 1,118-1,653 of 3,200)

    def hammer():
        for _ in range(400):
            try:
                rl.admit("k", 1)
                admitted.append(1)
            except Refused:
                pass

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sys.setswitchinterval(interval)
    assert len(admitted) == 1000
