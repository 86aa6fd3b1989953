"""kv_aware's ranking on indexes built as the feed builds them, without Ray or engines."""

import random

from mistral_ray.routing.hint import RouteHint
from mistral_ray.routing.kv_cache import Group, block_hashes
from mistral_ray.routing.kv_events import ReplicaIndex, key
from mistral_ray.routing.kv_policy import KVAware
from mistral_ray.routing.policies import Load, PrefixIndex, make_policy

TOKENS = tuple(random.Random(3).randrange(900) for _ in range(330))  # 10 blocks of 32, and a rest
HASHES = block_hashes(TOKENS, 32)


class Feed:
    def __init__(self, held: dict[str, set[int]], window=64):
        self.indexes = {}
        for replica, blocks in held.items():
            index = ReplicaIndex(1000, groups={0: Group(32, window)}, seq=0)
            index.blocks[0] = {key(HASHES[i]) for i in blocks}
            self.indexes[replica] = index

    def ready(self, replica):
        return self.indexes.get(replica)

    def source(self, replica):
        return {}

    def forget(self, replica):
        self.indexes.pop(replica, None)


def _policy(feed, **kw):
    return KVAware(feed, PrefixIndex(100), imbalance=16, imbalance_ratio=1.5, kv_limit=0.95,
                   rng=random.Random(0), **kw)


def _loads(**ongoing):
    return [Load(r, n) for r, n in ongoing.items()]


def test_the_window_before_the_end_beats_an_old_prefix():
    # a: the first 4 blocks (a prefix-only router's favourite); b: the last 2 blocks before the end only
    feed = Feed({"a": {0, 1, 2, 3}, "b": {8, 9}})
    hint = RouteHint(tokens=TOKENS)
    decision = _policy(feed).decide(hint, _loads(a=0, b=0))
    assert decision.reason == "kv" and decision.ranks[0] == ["b"]
    assert hint.predicted == {"a": 4 * 32, "b": 10 * 32}


def test_full_attention_groups_take_the_prefix_rule():
    feed = Feed({"a": {0, 1, 2, 3}, "b": {8, 9}}, window=None)
    hint = RouteHint(tokens=TOKENS)
    assert _policy(feed).decide(hint, _loads(a=0, b=0)).ranks[0] == ["a"]
    assert hint.predicted == {"a": 128, "b": 0}


def test_nothing_reusable_goes_by_load():
    feed = Feed({"a": set(), "b": {5}})
    decision = _policy(feed).decide(RouteHint(tokens=TOKENS), _loads(a=3, b=0))
    assert decision.reason == "new_prefix" and decision.ranks[0] == ["b"]


def test_overloaded_holder_is_skipped():
    feed = Feed({"a": {8, 9}, "b": set()})
    decision = _policy(feed).decide(RouteHint(tokens=TOKENS), _loads(a=40, b=2))
    assert decision.reason == "overloaded" and decision.ranks[0] == ["b"]


def test_first_turns_by_load_but_still_predicted():
    feed = Feed({"a": {8, 9}, "b": set()})
    hint = RouteHint(tokens=TOKENS, follow_up=False)
    decision = _policy(feed).decide(hint, _loads(a=5, b=0))
    assert decision.reason == "load" and hint.predicted["a"] == 320


def test_without_tokens_or_indexes_it_is_prefix_affinity():
    empty = Feed({})
    assert _policy(empty).decide(RouteHint(tokens=TOKENS), _loads(a=0, b=1)).reason in ("load", "new_prefix")
    hint = RouteHint(prefix=(b"x",), follow_up=True)
    policy = _policy(Feed({"a": {8, 9}}))
    policy.routed(hint, "b")
    assert policy.decide(hint, _loads(a=0, b=0)).ranks[0] == ["b"]  # the text-prefix index decided


def test_forget_drops_the_index():
    feed = Feed({"a": {8, 9}})
    policy = _policy(feed)
    policy.forget("a")
    assert feed.ready("a") is None


def test_make_policy_builds_it():
    policy = make_policy("kv_aware", imbalance=1, imbalance_ratio=1.5, kv_limit=0.9, index_blocks=10,
                         max_sessions=10, feed=Feed({}))
    assert isinstance(policy, KVAware)
