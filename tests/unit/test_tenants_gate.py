"""Tenants at the replica's gate (real gate, vLLM's request models, a stand-in engine app): the priority the
engine runs a request with comes from its key, a client's own is refused, a flooding key is refused first,
and a key's own rate limits hold."""

import asyncio

from mistral_ray.config import parse_service
from mistral_ray.server.fairness import BAND
from mistral_ray.server.load import Sequence
from mistral_ray.server.replica import LLMServer
from tests.unit.test_gate import Bank, FakeEngine, Recorded, call, openai_error

KEYS = {"hi": "sk-hi-0001 tier=interactive", "lo": "sk-lo-0002 tier=batch", "a": "sk-a-0003",
        "b": "sk-b-0004 weight=2", "capped": "sk-capped-0005 rpm=1"}


def tenants_server(tmp_path, bank=None, keys=KEYS, **sections) -> LLMServer:
    path = tmp_path / "keys"
    path.write_text("".join(f"{kid}:{line}\n" for kid, line in keys.items()))
    args = {"router": {"api_keys": {"enabled": True, "file": str(path)}}, **sections}
    engine = FakeEngine()

    async def factory(cfg):
        return engine

    s = LLMServer.__new__(LLMServer)
    asyncio.run(s.__init__(parse_service(args), bank, engine_factory=factory))
    s.metrics = Recorded()
    return s


def post(s, key, **body):
    return call(s, "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 4, **body},
                headers={"authorization": f"Bearer {KEYS[key].split()[0]}"})


def test_the_engine_priority_is_the_keys_tier_band_plus_its_fair_order(tmp_path):
    s = tenants_server(tmp_path)
    hi, lo, a = (post(s, k).json()["priority"] for k in ("hi", "lo", "a"))
    assert 0 <= hi < BAND <= a < 2 * BAND <= lo < 3 * BAND
    # a's second request starts where its first finished (its prompt and completion tokens later)
    assert post(s, "a").json()["priority"] > a


def test_fcfs_engine_gets_priority_zero_and_a_single_key_no_fair_order(tmp_path):
    s = tenants_server(tmp_path, engine={"scheduling_policy": "fcfs"})
    assert {post(s, k).json()["priority"] for k in ("hi", "lo", "a")} == {0}
    solo = tenants_server(tmp_path, keys={"lo": KEYS["lo"]})
    assert solo.checks.fair is None
    assert [post(solo, "lo").json()["priority"] for _ in range(2)] == [2 * BAND] * 2  # the tier's band only


def test_a_client_cannot_set_its_own_priority(tmp_path):
    s = tenants_server(tmp_path)
    for value in (-1, 0, "5"):
        r = post(s, "lo", priority=value)
        err = openai_error(r)
        assert r.status_code == 400 and err["param"] == "priority" and err["code"] == "unsupported_field"
    r = post(s, "lo", priority=None)  # vLLM's request model takes no null either
    assert r.status_code == 400 and openai_error(r)["param"] == "priority"
    r = call(s, "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "priority": -9},
             headers={"authorization": f"Bearer {KEYS['lo'].split()[0]}"})
    assert r.status_code == 400 and openai_error(r)["param"] == "priority"
    assert ("reject", "completions", "validation") in s.metrics.calls


def test_near_the_bound_the_heaviest_key_gets_503_and_a_light_key_gets_in(tmp_path):
    s = tenants_server(tmp_path, scaling={"max_ongoing_requests": 8})  # reserve 0.125: 1 request
    a = s.checks.tenant("a")
    for _ in range(7):
        s.load.sequences.add(Sequence(10, 1, a))
    r = post(s, "a")
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and openai_error(r)["code"] == "overloaded"
    assert "largest share" in openai_error(r)["message"]
    assert ("reject", "completions", "fair_share") in s.metrics.calls
    assert post(s, "b").status_code == 200  # the reserve is b's
    s.load.sequences.add(Sequence(10, 1, s.checks.tenant("b")))
    assert post(s, "hi").status_code == 503  # the bound itself holds for everyone
    assert [c[2] for c in s.metrics.calls if c[0] == "reject"] == ["fair_share", "overload"]


def test_per_tier_metrics_count_admissions_refusals_and_waits(tmp_path):
    s = tenants_server(tmp_path, scaling={"max_ongoing_requests": 8})
    seen = []
    s.metrics.tier = lambda tier, outcome: seen.append((tier, outcome))
    s.metrics.tier_waited = lambda tier, queued, ttft: seen.append((tier, "waited", ttft is not None))
    assert post(s, "hi").status_code == 200 and post(s, "lo", stream=True).status_code == 200
    a = s.checks.tenant("a")
    for _ in range(7):
        s.load.sequences.add(Sequence(10, 1, a))
    assert post(s, "a").status_code == 503
    assert seen == [("interactive", "admitted"), ("interactive", "waited", False),  # unary: no TTFT
                    ("batch", "admitted"), ("batch", "waited", True), ("standard", "fair_share")]


def test_a_keys_own_rate_limit_holds_and_other_keys_do_not_ask_the_bank(tmp_path):
    bank = Bank(max_keys=10)  # the application sets no limit: only `capped` has one (rpm=1)
    s = tenants_server(tmp_path, bank=bank)
    assert post(s, "capped").status_code == 200
    r = post(s, "capped")
    assert r.status_code == 429 and openai_error(r)["code"] == "rate_limit_exceeded" and "limit 1" in r.text
    for _ in range(3):
        assert post(s, "a").status_code == 200
    assert [c[1] for c in bank.calls if c[0] == "admit"] == ["capped", "capped"]


def test_a_continuation_goes_on_at_the_clock_and_is_not_charged_again(tmp_path):
    s = tenants_server(tmp_path)
    a = s.checks.tenant("a")
    for _ in range(3):
        assert post(s, "a").status_code == 200
    before = dict(s.checks.fair.finish)
    seq = Sequence(10, 1, a)
    ticket = s.checks._ticket(a, seq, 500, continuation=True)
    assert s.checks.fair.finish == before  # a migrated stream was charged where it began
    assert seq.tag == s.checks.fair.clock <= before["a"] and ticket.priority == BAND + int(seq.tag)
