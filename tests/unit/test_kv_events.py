"""The per-replica index fed with batches as vLLM's publisher encodes them (its own classes and encoder),
and a live feed from vLLM's ZmqEventPublisher on loopback: gaps replayed, resets counted, bounded."""

import time

import msgspec
import pytest

from mistral_ray.routing.kv_cache import Group
from mistral_ray.routing.kv_events import ReplicaIndex, decode, key


def _stored(hashes, parent=None, window=64, block=32, group=0):
    from vllm.distributed.kv_events import BlockStored

    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=list(range(block * len(hashes))),
                       block_size=block, lora_id=None, medium="GPU", lora_name=None, group_idx=group,
                       kv_cache_spec_kind="sliding_window" if window else "full_attention",
                       kv_cache_spec_sliding_window=window)


def _batch(*events):
    from vllm.distributed.kv_events import KVEventBatch

    return msgspec.msgpack.Encoder().encode(KVEventBatch(ts=time.time(), events=list(events)))


def test_stored_removed_cleared():
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved

    index = ReplicaIndex(max_blocks=100)
    assert index.receive(0, _batch(_stored([b"a" * 32, b"b" * 32]))) is None
    assert index.groups == {0: Group(32, 64)}
    assert index.cached(0)(b"a" * 32) and index.cached(0)(b"b" * 32)
    index.receive(1, _batch(BlockRemoved(block_hashes=[b"a" * 32], medium="GPU", group_idx=0)))
    assert not index.cached(0)(b"a" * 32) and index.cached(0)(b"b" * 32)
    index.receive(2, _batch(AllBlocksCleared()))
    assert index.size() == 0 and index.resets == 0


def test_int_hashes_and_full_attention():
    index = ReplicaIndex(max_blocks=100)
    index.receive(0, _batch(_stored([12345], window=None, block=16)))
    assert index.groups == {0: Group(16, None)}
    assert index.cached(0)(12345) and key(12345) == 12345
    assert key(b"\x00" * 24 + (12345).to_bytes(8, "big")) == 12345  # the low 64 bits, as vLLM's int hashes


def test_a_gap_asks_for_a_replay_and_a_lost_history_resets():
    index = ReplicaIndex(max_blocks=100)
    assert index.receive(3, _batch(_stored([b"x"]))) == 0  # an engine counts from 0: 0..2 were missed
    assert index.size() == 0
    index.replayed([(s, _batch(_stored([bytes([s])]))) for s in range(4)], 0)
    assert index.seq == 3 and index.size() == 4 and index.resets == 0
    assert index.receive(2, _batch(_stored([b"dup"]))) is None and index.size() == 4  # a duplicate
    assert index.receive(6, _batch(_stored([b"late"]))) == 4
    index.replayed([(5, _batch(_stored([b"five"]))), (6, _batch(_stored([b"six"])))], 4)  # 4 is gone
    assert index.resets == 1 and index.size() == 2 and index.seq == 6


def test_a_hash_held_twice_survives_one_removal():
    from vllm.distributed.kv_events import BlockRemoved

    index = ReplicaIndex(max_blocks=10)
    index.receive(0, _batch(_stored([b"same"]), _stored([b"same"])))  # two requests computed it at once
    index.receive(1, _batch(BlockRemoved(block_hashes=[b"same"], medium="GPU", group_idx=0)))
    assert index.cached(0)(b"same")
    index.receive(2, _batch(BlockRemoved(block_hashes=[b"same"], medium="GPU", group_idx=0)))
    assert not index.cached(0)(b"same")


def test_a_replay_with_a_hole_asks_again():
    index = ReplicaIndex(max_blocks=10)
    again = index.replayed([(0, _batch(_stored([b"0"]))), (2, _batch(_stored([b"2"])))], 0)
    assert again == 1 and index.seq == 0 and index.cached(0)(b"0") and not index.cached(0)(b"2")


def test_bounded():
    index = ReplicaIndex(max_blocks=3)
    index.receive(0, _batch(_stored([b"1", b"2", b"3"])))
    assert index.size() == 3
    index.receive(1, _batch(_stored([b"4"])))  # more than the engine can hold: removals were lost
    assert index.size() == 0 and index.resets == 1


def test_other_media_are_not_the_engines_cache():
    from vllm.distributed.kv_events import BlockStored

    index = ReplicaIndex(max_blocks=10)
    index.receive(0, _batch(BlockStored(block_hashes=[b"c"], parent_block_hash=None, token_ids=[1] * 16,
                                        block_size=16, lora_id=None, medium="CPU", lora_name=None)))
    assert index.size() == 0


def test_decode_is_the_published_shape():
    events = decode(_batch(_stored([b"h"])))
    assert events[0]["type"] == "BlockStored" and events[0]["kv_cache_spec_sliding_window"] == 64


def _wait(condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_live_feed_from_vllms_publisher(monkeypatch):
    """vLLM's own ZMQ publisher on loopback: the feed replays what was published before it joined, follows
    what comes after, and forgets a replica."""
    from vllm.distributed.kv_events import KVEventBatch, ZmqEventPublisher

    from mistral_ray.routing.kv_feed import KVFeed

    # As our engines start it: tcp://*:0 binds the node's address (VLLM_HOST_IP) on a free port.
    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")
    pub = ZmqEventPublisher(0, endpoint="tcp://*:0", replay_endpoint="tcp://*:0", topic="replica-a")
    feed = KVFeed(max_blocks=1000)
    try:
        cfg = pub.get_publisher_config()
        pub.publish(KVEventBatch(ts=time.time(), events=[_stored([b"early"])]))
        time.sleep(0.3)  # published before anyone listens: only the replay has it
        assert cfg.endpoint.startswith("tcp://127.0.0.1:") and cfg.replay_endpoint.startswith("tcp://127.0.0.1:")
        feed.track("a", {"pub": cfg.endpoint, "replay": cfg.replay_endpoint, "topic": "replica-a"})
        assert _wait(lambda: feed.ready("a") is not None and feed.ready("a").cached(0)(b"early"))
        time.sleep(0.3)
        pub.publish(KVEventBatch(ts=time.time(), events=[_stored([b"later"])]))
        assert _wait(lambda: feed.ready("a").cached(0)(b"later"))
        assert feed.ready("a").resets == 0
        feed.forget("a")
        assert feed.ready("a") is None
    finally:
        feed.close()
        pub.shutdown()
