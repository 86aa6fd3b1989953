"""The routing policies' choices (pure logic, no Ray): load balance, prefix affinity, sessions, overload."""

import math
import random
from collections import Counter

import pytest

from mistral_ray.routing.hint import RouteHint, hint_from_body, is_follow_up, prefix_blocks, prompt_text
from mistral_ray.routing.policies import Load, LoadAverage, PrefixIndex, kv_usage, make_policy, sequence_kv_tokens


def policy(name, **kw):
    return make_policy(name, imbalance=kw.pop("imbalance", 4), imbalance_ratio=kw.pop("imbalance_ratio", 1.0),
                       kv_limit=kw.pop("kv_limit", 0.9),
                       index_blocks=kw.pop("index_blocks", 1000), max_sessions=kw.pop("max_sessions", 100),
                       rng=random.Random(0))


def hint(text, **kw):
    return RouteHint(prefix=prefix_blocks(text, 8, 64), prompt_chars=len(text), **kw)


IDLE = [Load("a", 0), Load("b", 0), Load("c", 0)]


def test_sliding_window_caps_each_sequence_kv_at_the_window():
    assert sequence_kv_tokens(100, 4096) == 100
    assert sequence_kv_tokens(30_000, 4096) == 4096
    assert sequence_kv_tokens(30_000, None) == 30_000  # v0.2/v0.3: no window, full length
    # Three sequences on a 16k-token cache: 1000 + 4096 + 4096 with W=4096, not 1000 + 9000 + 30000.
    assert kv_usage([1000, 9000, 30_000], 4096, 16_384) == pytest.approx(9192 / 16_384)
    assert kv_usage([1000, 9000, 30_000], None, 16_384) == pytest.approx(40_000 / 16_384)
    assert kv_usage([5], 4096, 0) == 0.0


def test_prefix_blocks_are_chained_so_equal_digests_mean_equal_prefixes():
    a = prefix_blocks("x" * 8 + "shared!!" + "tail-one", 8, 64)
    b = prefix_blocks("y" * 8 + "shared!!" + "tail-one", 8, 64)
    c = prefix_blocks("x" * 8 + "shared!!" + "tail-two", 8, 64)
    assert len(a) == 3 and a[1] != b[1]  # same block text after a different first block: different digest
    assert a[:2] == c[:2] and a[2] != c[2]
    assert prefix_blocks("short", 8, 64) == ()  # partial blocks are not cached by engines either
    assert len(prefix_blocks("z" * 800, 8, 10)) == 10


def test_prompt_text_keys_chat_by_role_and_content():
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert prompt_text("chat", chat) == "system\x00S\x00user\x00hi\x00"
    assert prompt_text("completions", {"prompt": "abc"}) == "abc"
    assert prompt_text("completions", {"prompt": [1, 2]}) == "1 2 "
    assert prompt_text("chat", {"messages": "not a list"}) == ""
    responses = {"instructions": "Be brief. ", "input": [{"role": "user", "content": "hi"}]}
    assert prompt_text("responses", responses) == "Be brief. hi"


def test_hint_from_the_body_haproxy_forwards():
    chat = b'{"messages": [{"role": "user", "content": "' + b"w" * 64 + b'"}], "user": "bob"}'
    h = hint_from_body(chat, None, 8, 64, picker="r1")
    assert len(h.prefix) == 8 and h.session == "bob" and not h.follow_up and h.picker == "r1"
    assert hint_from_body(chat, "alice", 8, 64).session == "alice"  # the header wins over the body
    # Truncated, unparsable or keyless bodies: no prefix, so the policy goes by load (and session header).
    for body in [chat[:30], b"", b"[1]", b'{"model": "m"}']:
        h = hint_from_body(body, "s", 8, 64)
        assert h.prefix == () and h.session == "s"
    completion = hint_from_body(b'{"prompt": "' + b"p" * 16 + b'"}', None, 8, 64)
    assert len(completion.prefix) == 2 and completion.follow_up


def test_pow2_prefers_the_less_loaded_of_two_and_balances_uniform_load():
    p = policy("pow2")
    assert p.rank(None, [Load("a", 9), Load("b", 2)]) == [["b"], ["a"]]
    # Serving 3000 requests on 3 replicas whose load is what they hold: counts within 20 % of each other.
    held = Counter({"a": 0, "b": 0, "c": 0})
    sent = Counter()
    rng = random.Random(1)
    for _ in range(3000):
        first = p.rank(None, [Load(r, held[r]) for r in held])[0][0]
        held[first] += 1
        sent[first] += 1
        for r in held:  # each replica finishes some of its work
            held[r] -= sum(rng.random() < 0.3 for _ in range(held[r]))
    assert max(sent.values()) <= 1.2 * min(sent.values())


def test_pow2_avoids_a_full_kv_cache_and_breaks_ties_at_random():
    p = policy("pow2")  # kv_limit 0.9
    assert p.rank(None, [Load("a", 0, kv_usage=0.95), Load("b", 5, kv_usage=0.2)])[0][0] == "b"
    firsts = Counter(p.rank(None, [Load("a", 1, kv_usage=0.7), Load("b", 1, kv_usage=0.2)])[0][0]
                     for _ in range(400))
    assert 150 < firsts["a"] < 250  # a stale KV report does not steer every tie the same way


def test_prefix_affinity_sends_a_conversation_back_to_the_replica_holding_its_prefix():
    p = policy("prefix_affinity")
    system = "You are a helpful assistant. " * 4
    first = hint(system + "user: hello")
    home = p.rank(first, IDLE)[0][0]
    p.routed(first, home)
    # The next turn resends the conversation: its longest cached prefix is at `home`.
    follow_up = hint(system + "user: hello assistant: hi! user: how are you?")
    for _ in range(20):
        ranks = p.rank(follow_up, IDLE)
        assert ranks[0] == [home]
        assert [home] not in ranks[1:]  # if Serve finds home full, it falls back to the others


def test_prefix_affinity_picks_the_longest_match():
    p = policy("prefix_affinity")
    base = "A" * 64
    p.routed(hint(base[:16]), "a")  # 2 blocks at a
    p.routed(hint(base), "b")  # 8 blocks at b
    assert p.rank(hint(base + "more"), IDLE)[0] == ["b"]


def test_prefix_affinity_falls_back_to_pow2_when_its_favourite_is_overloaded():
    p = policy("prefix_affinity", imbalance=4)
    h = hint("B" * 64)
    p.routed(h, "a")
    assert p.rank(h, [Load("a", 4), Load("b", 0)])[0] == ["a"]  # within the imbalance: stay
    assert p.rank(h, [Load("a", 5), Load("b", 0)]) == [["b"], ["a"]]  # beyond it: least loaded first
    assert p.rank(h, [Load("a", 0, kv_usage=0.95), Load("b", 0)])[0][0] == "b"  # KV nearly full


def test_load_average_rises_at_once_and_falls_over_its_window():
    avg = LoadAverage(window_s=1.0)
    assert avg.update("a", 16, now=0.0) == 16  # first sight: the load itself
    assert avg.update("a", 0, now=0.1) == pytest.approx(16 * math.exp(-0.1))  # a batch ended: still ~14
    assert avg.update("a", 0, now=5.0) < 0.2  # seconds later: the new level
    assert avg.update("a", 12, now=5.0) == 12  # a rise counts at once (requests that are there)
    avg.forget("a")
    assert avg.update("a", 7, now=6.0) == 7
    assert LoadAverage(window_s=0).update("b", 3, now=0.0) == 3 and LoadAverage(0).update("b", 0, 9.0) == 0


def test_overload_is_judged_on_the_averaged_loads():
    p = policy("prefix_affinity", imbalance=8)
    h = hint("E" * 64)
    p.routed(h, "a")
    # b's batch of answers just ended (1 now, 12 on average), a holds the prefix with 18: not overloaded.
    assert p.decide(h, [Load("a", 18, average=15.0), Load("b", 1, average=12.0)]).reason == "prefix"
    # Without averages the moment decides, as before.
    assert p.decide(h, [Load("a", 18), Load("b", 1)]).reason == "overloaded"
    # A sustained gap still moves the request.
    decision = p.decide(h, [Load("a", 12, average=20.0), Load("b", 4, average=5.0)])
    assert decision.reason == "overloaded" and decision.ranks[0] == ["b"]
    s = policy("session", imbalance=8)
    s.routed(RouteHint(session="x"), "a")
    settled = [Load("a", 18, average=15.0), Load("b", 1, average=12.0)]
    assert s.decide(RouteHint(session="x"), settled).reason == "session"


def test_prefix_affinity_spreads_unseen_prefixes_by_load():
    p = policy("prefix_affinity")
    assert p.rank(hint("C" * 64), [Load("a", 3), Load("b", 1)]) == [["b"], ["a"]]
    assert p.rank(RouteHint(), [Load("a", 3), Load("b", 1)]) == [["b"], ["a"]]  # prompt shorter than a block


def test_prefix_affinity_spreads_new_conversations_that_share_only_a_system_prompt():
    p = policy("prefix_affinity")
    system = "S" * 64
    p.routed(hint(system + "first conversation"), "a")  # `a` holds the shared system prompt
    new = hint(system + "a new conversation", follow_up=False)
    firsts = Counter(p.rank(new, [Load("a", 1), Load("b", 1)])[0][0] for _ in range(200))
    assert min(firsts.values()) > 60, firsts  # by load, ties at random: not all to `a`
    assert p.rank(new, [Load("a", 2), Load("b", 0)])[0] == ["b"]
    # Its next turn (with the answer) follows its own cached prefix, even against the load.
    follow_up = hint(system + "first conversation" + " answer, next question")
    assert p.rank(follow_up, [Load("a", 2), Load("b", 0)])[0] == ["a"]


def test_follow_ups_are_chats_with_an_earlier_answer():
    system, user = {"role": "system", "content": "s"}, {"role": "user", "content": "u"}
    assert not is_follow_up("chat", {"messages": [system, user]})
    assert is_follow_up("chat", {"messages": [system, user, {"role": "assistant", "content": "a"}, user]})
    assert not is_follow_up("chat", {"messages": None})
    assert is_follow_up("completions", {"prompt": "p"})  # no turns to tell: routed by prefix


def test_prefix_index_forgets_least_recent_blocks_and_dead_replicas():
    index = PrefixIndex(max_blocks_per_replica=4)
    old, new = prefix_blocks("o" * 32, 8, 64), prefix_blocks("n" * 32, 8, 64)
    index.insert("a", old)
    index.insert("a", new)
    assert index.match("a", old) == 0 and index.match("a", new) == 4
    index.forget("a")
    assert index.match("a", new) == 0


def test_decisions_say_why():
    p = policy("prefix_affinity", imbalance=1)
    h = hint("D" * 64)
    assert p.decide(h, IDLE).reason == "new_prefix"
    p.routed(h, "a")
    assert p.decide(h, IDLE).reason == "prefix"
    assert p.decide(h, [Load("a", 5), Load("b", 0)]).reason == "overloaded"
    assert p.decide(None, IDLE).reason == "load"
    s = policy("session")
    s.routed(RouteHint(session="x"), "a")
    assert s.decide(RouteHint(session="x"), IDLE).reason == "session"


def test_session_table_is_bounded():
    p = policy("session", max_sessions=2)
    for name in "xyz":
        p.routed(RouteHint(session=name), "a")
    assert list(p.sessions) == ["y", "z"]


def test_session_sticks_and_moves_on_overload():
    p = policy("session", imbalance=2)
    h = RouteHint(session="alice")
    home = p.rank(h, IDLE)[0][0]
    p.routed(h, home)
    loads = [Load(r, 2 if r == home else 0) for r in "abc"]
    assert p.rank(h, loads)[0] == [home]
    loads = [Load(r, 3 if r == home else 0) for r in "abc"]
    moved = p.rank(h, loads)[0][0]
    assert moved != home
    p.routed(h, moved)
    assert p.rank(h, IDLE)[0] == [moved]  # the session's KV now lives there
    p.forget(moved)
    assert p.sessions == {}
    assert p.rank(RouteHint(), [Load("a", 1), Load("b", 0)]) == [["b"], ["a"]]  # no session: pow2


def test_overload_needs_both_the_gap_and_the_ratio():
    p = policy("prefix_affinity", imbalance=8, imbalance_ratio=1.5)
    h = hint("F" * 64)
    p.routed(h, "a")
    # Two busy replicas 10 apart: a's load is 1.4x b's, the prefix is worth more than the gap. Stays.
    assert p.decide(h, [Load("a", 35, average=35.0), Load("b", 25, average=25.0)]).reason == "prefix"
    # The same gap against a nearly idle replica: moves.
    assert p.decide(h, [Load("a", 12, average=12.0), Load("b", 2, average=2.0)]).reason == "overloaded"
    # 2x the load but within the gap: stays.
    assert p.decide(h, [Load("a", 8, average=8.0), Load("b", 4, average=4.0)]).reason == "prefix"
    # KV nearly full moves it whatever the loads.
    assert p.decide(h, [Load("a", 1, kv_usage=0.95), Load("b", 1)]).reason == "overloaded"


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown routing policy 'random'"):
        make_policy("random", imbalance=1, imbalance_ratio=1.0, kv_limit=0.9, index_blocks=1, max_sessions=1)


def test_hint_from_any_body_never_fails():
    """HAProxy hands the router bodies no check has seen: whatever they hold, routing goes on (by load)."""
    import json

    from hypothesis import given, settings
    from hypothesis import strategies as st

    values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                          lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                          max_leaves=20)
    keys = st.sampled_from(["messages", "prompt", "input", "instructions", "user", "content", "role", "text"])
    bodies = st.dictionaries(keys, values, max_size=4).map(lambda d: json.dumps(d).encode()) | st.binary(max_size=80)

    @settings(max_examples=400, deadline=None, derandomize=True, database=None)
    @given(body=bodies)
    def check(body):
        h = hint_from_body(body, "s", 8, 64, picker="p")
        assert h.session == "s" and h.picker == "p"  # the header's session and the picker always survive

    check()
    deep = b'{"messages": [{"role": "user", "content": ' + b"[" * 5000 + b"]" * 5000 + b"}]}"
    assert hint_from_body(deep, None, 8, 64).prefix == ()
