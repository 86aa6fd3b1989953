"""Fair share between API keys (server/fairness.py): pure logic, no Ray, no engine."""

import pytest

from mistral_ray.server.auth import ApiKeys, Tenant, tenant_of
from mistral_ray.server.fairness import BAND, FairShare

TIERS = {"interactive": 0, "standard": 1, "batch": 2}


def tenant(key_id, tier="standard", weight=1.0):
    return Tenant(key_id, tier, TIERS[tier], weight)


def test_below_the_soft_limit_everyone_is_admitted():
    fair = FairShare(capacity=16, reserve=0.125)
    assert fair.soft == 14
    a = tenant("a")
    assert not fair.refuses(a, [a] * 13)


def test_from_the_soft_limit_the_heaviest_key_is_refused_and_a_light_one_admitted():
    fair = FairShare(capacity=16, reserve=0.125)
    a, b = tenant("a"), tenant("b")
    assert fair.refuses(a, [a] * 14)  # alone and at the soft limit: the reserve is not its
    assert not fair.refuses(b, [a] * 14)
    assert not fair.refuses(b, [a] * 14 + [b])  # b holds 2 after this one, a 14
    assert fair.refuses(a, [a] * 7 + [b] * 7)  # a tie after a's next: a would be heavier than b
    assert not fair.refuses(a, [a] * 6 + [b] * 8)


def test_weight_and_tier_decide_who_is_heaviest():
    fair = FairShare(capacity=10, reserve=0.2)
    big, small = tenant("big", weight=4), tenant("small")
    # big holds 6 (1.5 per weight), small 2: small's next makes 3 per weight, heavier than big
    assert fair.refuses(small, [big] * 6 + [small] * 2)
    assert not fair.refuses(big, [big] * 6 + [small] * 2)
    # a lower tier is heavier whatever it holds: the interactive key is admitted, the batch key refused
    batch, live = tenant("batch", "batch"), tenant("live", "interactive")
    assert not fair.refuses(live, [live] * 7 + [batch])
    assert fair.refuses(batch, [live] * 7 + [batch])


def test_no_reserve_means_no_refusal_before_the_bound():
    fair = FairShare(capacity=8, reserve=0)
    a = tenant("a")
    assert fair.soft == 8 and not fair.refuses(a, [a] * 7)


def test_start_tags_interleave_keys_by_weight_and_save_no_credit():
    fair = FairShare(capacity=64, reserve=0.125)
    a, b, heavy = tenant("a"), tenant("b"), tenant("heavy", weight=2)
    held: list[float] = []  # the start tags of the requests the replica holds

    def admit(who, tokens=100):
        tag = fair.tag(who, tokens, held)
        held.append(tag)
        return tag

    assert [admit(a) for _ in range(4)] == [0, 100, 200, 300]  # a flood runs ahead of the clock
    assert admit(b) == 0  # a newcomer starts at the oldest request held: ahead of a's backlog
    assert [admit(heavy) for _ in range(3)] == [0, 50, 100]  # weight 2: twice the share
    held[:] = [200, 300]  # everything else finished; a's last two are held
    assert admit(b) == 200  # b's idle time saved it nothing: it starts at the clock, level with a's oldest
    assert admit(a) == 400
    held.clear()  # an idle replica: nobody carries a debt into what comes next
    assert admit(b) == admit(a) == 500 and admit(a) == 600
    assert fair.clock == 500


def test_what_a_request_did_not_use_comes_back_but_not_behind_the_clock():
    fair = FairShare(capacity=64, reserve=0.125)
    a = tenant("a")
    assert fair.tag(a, 2000) == 0 and fair.finish["a"] == 2000  # no max_tokens: charged the whole context
    fair.unused(a, 1900)  # it used 100
    assert fair.finish["a"] == 100
    fair.tag(tenant("b"), 10, [500.0])  # the clock moves on to 500
    fair.unused(a, 1000)
    assert fair.finish["a"] == 500


def test_a_reserve_as_large_as_the_replica_still_admits_one():
    a, b = tenant("a"), tenant("b")
    for capacity, reserve in ((1, 0.125), (8, 0.9)):
        fair = FairShare(capacity, reserve)
        assert fair.soft == 1 and not fair.refuses(a, []) and fair.refuses(a, [a])
    assert not FairShare(8, 0.9).refuses(b, [a, a])


def test_priority_orders_tiers_first_then_tags():
    live, batch = tenant("live", "interactive"), tenant("batch", "batch")
    assert FairShare.priority(live, 10 ** 9) < FairShare.priority(batch, 0)
    assert FairShare.priority(batch, 5) == 2 * BAND + 5
    assert FairShare.priority(live, 10 ** 20) == BAND - 1  # a tag never reaches the next band


def test_key_file_attributes():
    keys = ApiKeys(["a:sk-a tier=interactive weight=2.5 rpm=60 tpm=1000", "b:sk-b", "a:sk-a2 tier=interactive "
                    "weight=2.5 rpm=60 tpm=1000"], TIERS, "standard")
    assert keys.tenants["a"] == Tenant("a", "interactive", 0, 2.5, 60, 1000)
    assert keys.tenants["b"] == Tenant("b", "standard", 1)
    assert keys.identify("Bearer sk-a2") == "a" and keys.identify("Bearer sk-a") == "a"
    assert keys.identify("Bearer sk-a tier=interactive") is None  # the attributes are not the key
    assert keys.tenants["a"].limited == (60, 1000) and keys.tenants["b"].limited is None
    assert keys.ids == ("a", "b")


@pytest.mark.parametrize("attributes, message", [
    (["tier=gold"], "tier 'gold'"), (["weight=0"], "weight"), (["weight=-1"], "weight"), (["weight=nan"], "weight"),
    (["weight=1e-320"], "weight"), (["weight=inf"], "weight"), (["rpm=1.5"], "rpm"), (["colour=red"], "'colour'"),
    (["tier=batch", "tier=batch"], "'tier'"), (["weight"], "name=value"),
])
def test_bad_attributes_name_the_key_id_not_the_key(attributes, message):
    with pytest.raises(ValueError) as err:
        tenant_of("team-x", attributes, TIERS, "standard")
    assert "team-x" in str(err.value) and message in str(err.value)


def test_a_space_in_a_key_is_refused_without_showing_the_rest():
    with pytest.raises(ValueError) as err:
        ApiKeys(["a:sk-abc sk-def"], TIERS, "standard")
    assert "sk-def" not in str(err.value) and "not shown" in str(err.value)


def test_a_key_id_on_two_lines_must_say_the_same():
    with pytest.raises(ValueError, match="different attributes"):
        ApiKeys(["a:sk-1 tier=batch", "a:sk-2"], TIERS, "standard")
