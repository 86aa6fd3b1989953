"""kv_aware's replica <-> router channel on loopback ZMQ, without Ray or vllm: the replica publishes its
engine's step counts and the gate's admissions, a router's feed reads them; a router's prompt ids are staged
at the replica, taken once, and bounded."""

import asyncio
import time

from mistral_ray.routing.hint import RouteHint, hint_from_body, sendable
from mistral_ray.routing.kv_feed import EngineLoad, KVFeed
from mistral_ray.routing.prompts import PromptSender, decode_ids, encode_ids
from mistral_ray.server.link import RouterLink, Staged
from mistral_ray.server.load import Inflight, engine_load


def test_engine_counts_are_bounded_by_what_the_gate_admitted():
    assert engine_load(3, 2, 7) == (3, 2, 2)  # 2 admitted, not yet in the engine's last step
    assert engine_load(3, 2, 5) == (3, 2, 0)
    assert engine_load(1, 0, 0) == (0, 0, 0)  # an abort the engine had no step to report: nothing is there
    assert engine_load(4, 3, 5) == (4, 1, 0)  # a request finished since the engine's step


def test_ids_round_trip_and_staging_is_bounded():
    assert decode_ids(encode_ids([0, 1, 32767, 2**32 - 1])) == [0, 1, 32767, 2**32 - 1]
    staged = Staged(max_entries=2, max_bytes=64, ttl_s=10)
    staged.put(b"a", encode_ids([1, 2]), now=0)
    staged.put(b"b", encode_ids([3]), now=1)
    staged.put(b"c", encode_ids([4]), now=2)  # beyond 2 entries: the oldest goes
    assert staged.take(b"a") is None and staged.take(b"b") == [3]
    assert staged.take(b"b") is None  # taken once
    staged.put(b"d", encode_ids(range(20)), now=3)  # 80 bytes: more than all of staging holds
    staged.put(b"x" * 65, encode_ids([1]), now=3)  # not a key of ours
    staged.put(b"e", b"\x01\x02\x03", now=3)  # not whole ids
    assert len(staged) == 1
    staged.put(b"f", encode_ids([5]), now=20)  # c is older than the TTL
    assert staged.take(b"c") is None and staged.take(b"f") == [5]


def test_a_plain_chat_is_sendable_anything_the_renderer_reads_is_not():
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
            "temperature": 0, "stream_options": {"include_usage": True}, "user": "u", "tools": None}
    assert sendable(chat)
    for field, value in [("tools", [{"type": "function"}]), ("chat_template", "{{ x }}"), ("echo", True),
                         ("chat_template_kwargs", {"a": 1}), ("documents", [{}]), ("reasoning_effort", "low"),
                         ("response_format", {"type": "json_object"}), ("mm_processor_kwargs", {}),
                         ("truncate_prompt_tokens", 5), ("cache_salt", "s")]:
        assert not sendable({**chat, field: value}), field
    tokens = lambda route, payload: (1, 2, 3)  # noqa: E731
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    assert hint_from_body(body, None, 64, 8, tokenize=tokens).sendable
    assert not hint_from_body(b'{"prompt": "hi"}', None, 64, 8, tokenize=tokens).sendable  # chats only
    assert not hint_from_body(body, None, 64, 8).sendable  # no ids: nothing to send


def test_the_replica_publishes_its_load_and_a_routers_feed_reads_it():
    feed = KVFeed(max_blocks=100)

    async def run():
        link = RouterLink("127.0.0.1", "replica-a", heartbeat_s=0.2)
        inflight = Inflight(64, 1000, max_ongoing=8)
        link.start(inflight)
        try:
            assert link.endpoints["load"].startswith("tcp://127.0.0.1:")
            feed.track("a", {"pub": "tcp://127.0.0.1:9", "topic": "replica-a", "load": link.endpoints["load"]})
            await _async_wait(lambda: feed.load("a") is not None)  # the heartbeat reaches a new router
            inflight.arrived("router-1")
            inflight.reserve(100, width=2)
            inflight.reserve(100)
            await _async_wait(lambda: feed.load("a").pending == 3)  # admitted, not yet in an engine step
            assert feed.load("a").arrivals == {"router-1": 1}
            link.engine_step(2, 1, 0.25)  # the engine's step: 2 running, 1 waiting
            await _async_wait(lambda: feed.load("a").running == 2)
            load = feed.load("a")
            assert (load.running, load.waiting, load.pending, load.kv_usage, load.ongoing) == (2, 1, 0, 0.25, 3)
            for seq in list(inflight.sequences):
                inflight.remove(seq)
            await _async_wait(lambda: feed.load("a").ongoing == 0)  # the engine's stale count is bounded
            seen = feed.load_reports
            await _async_wait(lambda: feed.load_reports > seen)  # heartbeats while idle
            feed.forget("a")
            assert feed.load("a") is None
        finally:
            link.close()

    try:
        asyncio.run(run())
    finally:
        feed.close()


async def _async_wait(check, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.02)


def test_a_routers_prompt_ids_are_staged_at_the_replica_and_taken_once():
    sender = PromptSender()

    async def run():
        link = RouterLink("127.0.0.1", "replica-a")
        link.start(Inflight(64, 1000, max_ongoing=8))
        try:
            endpoint = link.endpoints["prompts"]
            key = None
            deadline = time.monotonic() + 5
            while key is None:  # the first send finds no connection yet (dropped, not queued)
                assert time.monotonic() < deadline
                key = sender.send(endpoint, [5, 6, 7])
                await asyncio.sleep(0.02)
            assert await link.prompt_ids(key.encode()) == [5, 6, 7]  # waited for, if still on its way
            assert await link.prompt_ids(key.encode()) is None
            started = time.monotonic()
            assert await link.prompt_ids(b"0" * 32) is None  # a key nobody staged: not waited for long
            assert time.monotonic() - started < 0.5
        finally:
            link.close()

    try:
        asyncio.run(run())
    finally:
        sender.close()
    assert PromptSender().send("tcp://127.0.0.1:1", [1]) is None  # nobody there: not sent, never waits


def test_a_pick_counts_until_the_engine_snapshot_shows_it_arrived():
    from tests.unit.test_request_router import first_choices, replica, router

    r = router("kv_aware")
    stats = {"pub": "tcp://127.0.0.1:9", "topic": "t", "load": "tcp://127.0.0.1:9"}
    a, b = replica("a", running=30), replica("b", running=30)  # Serve's stale report: both busy
    for rep in (a, b):
        rep.routing_stats["kv_events"] = {**stats, "topic": rep.replica_id.unique_id}
    try:
        r.feed.loads = {"a": EngineLoad(1, 0, 0, 0.1, {"router-1": 0}), "b": EngineLoad(4, 0, 0, 0.1, {})}
        r.feed._sources = {"a": {}, "b": {}}
        r.feed.track = lambda *args: None  # no thread: the snapshots are given above
        pick = RouteHint(picker="router-1")
        assert first_choices(r, [a, b], 3, pick) == {"a": 3}  # 1 + 3 picks in flight = b's 4
        r.feed.loads["a"] = EngineLoad(4, 0, 0, 0.9, {"router-1": 3})  # they arrived: counted once
        assert first_choices(r, [a, b], 2, pick) == {"a": 1, "b": 1}
        assert r._load(a, "router-1").kv_usage == 0.9  # the engine's KV use, not the gate's estimate
    finally:
        r.feed.close()
