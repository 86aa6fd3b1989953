"""Adapter affinity (pure): an adapter's requests go to replicas holding it, a hot adapter spreads in
proportion to its share of the traffic, base requests and apps without adapters route as before."""

import json
import random

from mistral_ray.routing.adapter_policy import AdapterAffinity, DecayingCounts
from mistral_ray.routing.hint import RouteHint, hint_from_body
from mistral_ray.routing.policies import Load, make_policy
from mistral_ray.server.load import Inflight


SERVED = frozenset({"ft-1", "ft-2", "hot", *(f"cold-{k}" for k in range(10))})


def L(replica, ongoing, adapters=frozenset(), active=frozenset()):  # noqa: N802 (a replica serving every adapter)
    return Load(replica, ongoing, adapters=frozenset(adapters), served=SERVED, active=frozenset(active))


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def policy(inner="pow2", spread=1.0, clock=None, slots=2):
    base = make_policy(inner, imbalance=4, imbalance_ratio=1.5, kv_limit=0.95, index_blocks=64, max_sessions=8,
                       rng=random.Random(0))
    return AdapterAffinity(base, spread, window_s=30, placed_s=2, slots=slots, fresh_s=1, clock=clock or Clock())


def route(p, adapter, loads):
    hint = RouteHint(adapter=adapter)
    first = p.decide(hint, loads).ranks[0][0]
    p.routed(hint, first)
    return first


def test_an_adapter_goes_to_the_replica_holding_it():
    p = policy()
    for _ in range(9):  # base traffic: the adapter is a small share
        p.routed(RouteHint(), "a")
    loads = [L("a", 3), L("b", 1, {"ft-1"})]
    assert {route(p, "ft-1", loads) for _ in range(5)} == {"b"}
    assert p.decide(RouteHint(adapter="ft-1"), loads).reason == "adapter"


def test_a_new_adapter_goes_to_the_least_loaded_and_stays_there_before_reports_show_it():
    clock = Clock()
    p = policy(clock=clock)
    for _ in range(9):
        p.routed(RouteHint(), "a")
    loads = [L("a", 3), L("b", 1), L("c", 2)]
    assert p.decide(RouteHint(adapter="ft-2"), loads).reason == "adapter_new"
    assert route(p, "ft-2", loads) == "b"
    later = [L("a", 3), L("b", 3), L("c", 0)]  # b got busier; its report does not list ft-2 yet
    clock.now += 1
    assert route(p, "ft-2", later) == "b"
    clock.now += 5  # the pick is old and b never reported ft-2 (its engine let it go): a new home
    assert route(p, "ft-2", later) == "c"


def test_an_adapter_joins_the_batch_it_runs_in_and_a_new_one_takes_a_free_slot():
    """max_loras 2: b runs ft-1 and ft-2 (slots full), a runs ft-3 (one slot free)."""
    clock = Clock()
    p = policy(clock=clock)
    for _ in range(20):
        p.routed(RouteHint(), "a")
    loads = [L("a", 2, active={"ft-3"}), L("b", 3, active={"ft-1", "ft-2"})]
    assert route(p, "ft-1", loads) == "b"  # no new slot taken, though b is busier (within the imbalance)
    assert p.decide(RouteHint(adapter="ft-9x"), loads).reason == "load"  # not served: the policy alone
    clock.now += 5
    busy_a = [L("a", 3, active={"ft-3"}), L("b", 2, active={"ft-1", "ft-2"})]
    assert route(p, "hot", busy_a) == "a"  # b is less loaded, but a request there would wait for a slot
    assert route(p, "hot", busy_a) == "a"  # a now runs it (picked within fresh_s)


def test_a_hot_adapter_spreads_with_its_share_and_a_cold_one_does_not():
    p = policy()
    loads = [L(r, 0) for r in "abcd"]
    hot = {route(p, "hot", [L(l.replica, l.ongoing) for l in loads]) for _ in range(40)}
    assert len(hot) == 4  # all of the traffic: every replica may hold it
    p = policy()
    held = {}
    for i in range(200):
        adapter = "hot" if i % 2 else f"cold-{i % 10}"
        loads = [L(r, 0, (a for a, rs in held.items() if r in rs)) for r in "abcd"]
        held.setdefault(adapter, set()).add(route(p, adapter, loads))
    assert len(held["hot"]) == 2  # half the traffic, 4 replicas: 2 hold it
    assert all(len(held[f"cold-{k}"]) == 1 for k in (0, 2, 4, 6, 8))  # 10 % each: one replica each


def test_a_cooling_adapter_drains_from_the_replicas_beyond_its_share():
    p = policy()
    for _ in range(30):
        p.routed(RouteHint(), "a")  # ft-1 is a small share now
    loads = [L("a", 2, active={"ft-1"}), L("b", 2, active={"ft-1"})]
    assert len({route(p, "ft-1", loads) for _ in range(10)}) == 1  # one of them, the same one each time


def test_an_overloaded_holder_gives_way():
    p = policy()
    for _ in range(9):
        p.routed(RouteHint(), "a")
    loads = [L("a", 20, {"ft-1"}), L("b", 1)]
    decision = p.decide(RouteHint(adapter="ft-1"), loads)
    assert decision.ranks[0] == ["b"] and decision.reason == "adapter_new"  # runs on no replica with room


def test_base_requests_and_the_inner_policy_are_untouched():
    loads = [L("a", 5), L("b", 1, {"ft-1"})]
    wrapped, plain = policy(), make_policy("pow2", imbalance=4, imbalance_ratio=1.5, kv_limit=0.95,
                                           index_blocks=64, max_sessions=8, rng=random.Random(0))
    assert wrapped.decide(RouteHint(), loads).ranks == plain.decide(RouteHint(), loads).ranks == [["b"], ["a"]]
    assert wrapped.decide(None, loads).reason == "load"


def test_the_hint_names_the_adapter_only_when_the_app_serves_adapters():
    body = json.dumps({"model": "ft-1", "prompt": "x" * 200}).encode()
    assert hint_from_body(body, None, 64, 8).adapter is None  # no LoRA: exactly as before
    with_lora = hint_from_body(body, None, 64, 8, base_model="tiny-mistral")
    base = hint_from_body(json.dumps({"model": "tiny-mistral", "prompt": "x" * 200}).encode(), None, 64, 8,
                          base_model="tiny-mistral")
    assert with_lora.adapter == "ft-1" and base.adapter is None
    assert with_lora.prefix and base.prefix and not set(with_lora.prefix) & set(base.prefix)  # its own KV
    assert hint_from_body(body, None, 64, 8, tokenize=lambda r, p: (1, 2), base_model="tiny-mistral").tokens == ()


def test_the_replica_reports_its_recent_adapters_least_recently_used_out():
    load = Inflight(64, 1000, 8)
    load.used("ft-1")
    assert "adapters" not in load.routing_stats()  # no LoRA: nothing reported
    load.adapter_slots = 2
    used = [load.used(name) for name in ("ft-1", "ft-2", "ft-1", "ft-3")]
    assert used == [(True, []), (True, []), (False, []), (True, ["ft-2"])]  # loads and evictions, as counted
    assert load.routing_stats()["adapters"] == ["ft-1", "ft-3"]
    assert load.serve_adapters({"ft-3"}) == ["ft-1"]
    assert load.routing_stats()["served_adapters"] == ["ft-3"]
    assert load.routing_stats()["adapters"] == ["ft-3"]


def test_a_made_up_adapter_name_goes_by_the_policy_and_is_not_remembered():
    p = policy()
    loads = [L("a", 3), L("b", 1, {"ft-1"})]
    for i in range(1000):
        hint = RouteHint(adapter=f"junk-{i}")
        assert p.decide(hint, loads).reason == "load"
        p.routed(hint, "b")
    assert not p.placed and set(p.traffic.counts) == {None}


def test_decaying_counts_follow_the_mix():
    counts = DecayingCounts(10)
    for _ in range(10):
        counts.add("a", 0)
    assert counts.share("a", 0) == 1.0
    for _ in range(10):
        counts.add("b", 30)  # a's requests are three windows old
    assert counts.share("b", 30) > 0.9
    counts.add("a", 10_000)  # a thousand windows on: rescaled, no overflow, the old weights gone
    assert counts.share("a", 10_000) == 1.0
