"""Tenants on the real engine: a key's tier reaches vLLM's priority scheduler (a client cannot raise its own),
keys of one tier share a busy engine fairly, and a key that floods a replica is refused before a light one.

One replica whose engine runs one sequence at a time: every other admitted request waits in the engine's
queue, so the order in which first tokens come is the order the scheduler chose.
"""

import json
import threading
import time

import httpx
import pytest

from tests.integration.conftest import keyed_app

pytestmark = pytest.mark.integration

NAME = "tenants"
KEYS = {"hi": "sk-tenant-hi-000001", "lo": "sk-tenant-lo-000002", "a": "sk-tenant-a-0000003",
        "b": "sk-tenant-b-0000004"}
ATTRIBUTES = {"hi": "tier=interactive", "lo": "tier=batch"}  # a and b: the default tier, weight 1
MAX_ONGOING = 12  # reserve 0.125: the heaviest key is refused from 10 on


@pytest.fixture(scope="module")
def tenants(app, tmp_path_factory):
    sections = {"engine": {"max_num_seqs": 1}, "scaling": {"min_replicas": 1, "max_replicas": 1,
                                                           "max_ongoing_requests": MAX_ONGOING}}
    with keyed_app(app, NAME, KEYS, tmp_path_factory.mktemp("keys"), attributes=ATTRIBUTES,
                   sections=sections) as served:
        yield served


def stream(url: str, model: str, key: str, tokens: int, firsts: dict, label: str, headers=None, statuses=None):
    """A streamed completion; `firsts[label]` gets the time its first token came (None if refused)."""
    body = {"model": model, "prompt": f"{label} once upon a time", "max_tokens": tokens, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEYS[key]}", **(headers or {})}) as r:
        if statuses is not None:
            statuses[label] = r.status_code
        if r.status_code != 200:
            r.read()
            firsts[label] = None
            return
        for line in r.iter_lines():
            if line.startswith("data: {") and label not in firsts:
                firsts[label] = time.monotonic()


def launch(*args, **kwargs) -> threading.Thread:
    t = threading.Thread(target=stream, args=args, kwargs=kwargs, daemon=True)
    t.start()
    return t


def wait_for_one(firsts: dict, prefix: str, timeout_s: float = 60) -> None:
    """Until one of the requests labelled `prefix...` has its first token (the one the engine runs)."""
    deadline = time.monotonic() + timeout_s
    while not any(k.startswith(prefix) for k in firsts) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(k.startswith(prefix) for k in firsts), f"no {prefix} request started"


def overtakes(url, model, queue_key, queue_tokens, queued_at_least, late_key, **queue_kw) -> None:
    """Six streams of `queue_key` (one runs, the engine is one sequence wide: the others wait), then one of
    `late_key`: it runs next, after the one running or after one more if that one ended while the late one
    was on its way."""
    firsts: dict = {}
    early = [launch(url, model, queue_key, queue_tokens, firsts, f"{queue_key}{i}", **queue_kw) for i in range(6)]
    wait_for_one(firsts, queue_key)
    time.sleep(0.3)
    queued = [f"{queue_key}{i}" for i in range(6) if f"{queue_key}{i}" not in firsts]
    assert len(queued) >= queued_at_least, firsts
    late = launch(url, model, late_key, 8, firsts, late_key)
    for t in [*early, late]:
        t.join(180)
    assert firsts[late_key] is not None and all(firsts[q] is not None for q in queued)
    behind = [q for q in queued if firsts[late_key] < firsts[q]]
    assert len(behind) >= len(queued) - 1, {k: round(v, 2) for k, v in firsts.items()}


def test_a_higher_tier_runs_before_a_lower_tiers_waiting_requests(tenants):
    # The batch key asks for the highest priority vLLM knows, by its header: the gate's priority wins.
    overtakes(*tenants, "lo", 200, 4, "hi", headers={"X-Vllm-Priority": "-1000000"})


def test_a_light_key_goes_ahead_of_a_heavy_keys_backlog(tenants):
    # b's start tag is the clock (the oldest of a's held); a's waiting ones start later, one request's tokens
    # apart each.
    overtakes(*tenants, "a", 200, 4, "b")


def test_a_client_set_priority_is_refused(tenants):
    url, model = tenants
    for route, body in [("completions", {"prompt": "x"}), ("chat/completions",
                                                           {"messages": [{"role": "user", "content": "x"}]})]:
        for value in (-5, 0, "1"):
            r = httpx.post(f"{url}/v1/{route}", json={"model": model, "max_tokens": 2, "priority": value, **body},
                           headers={"Authorization": f"Bearer {KEYS['b']}"}, timeout=60)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "priority" and err["code"] == "unsupported_field", err


def test_a_flooding_key_is_refused_before_a_light_one(tenants):
    url, model = tenants
    firsts, statuses = {}, {}
    time.sleep(1)  # the earlier tests' last slots are given back after their last byte went out
    flood = [launch(url, model, "a", 200, firsts, f"a{i}", statuses=statuses) for i in range(MAX_ONGOING + 2)]
    deadline = time.monotonic() + 60
    while len(statuses) < MAX_ONGOING + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    codes = sorted(statuses.values())
    # 10 admitted (max_ongoing_requests minus the reserve of 2), the rest refused with 503 at once
    assert codes == [200] * (MAX_ONGOING - 2) + [503] * 4, codes
    light = [launch(url, model, "b", 4, firsts, f"b{i}", statuses=statuses) for i in range(2)]
    for t in [*flood, *light]:
        t.join(180)
    assert statuses["b0"] == 200 and statuses["b1"] == 200, statuses
    assert firsts["b0"] is not None and firsts["b1"] is not None
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1},
                   headers={"Authorization": f"Bearer {KEYS['a']}"}, timeout=60)
    assert r.status_code == 200  # the flood is over: the key is served again
    assert json.loads(r.text)["usage"]["completion_tokens"] == 1
