"""kv_aware's replica <-> router channel on loopback ZMQ, without Ray or vllm: the replica publishes its
engine's step counts and the gate's admissions, a router's feed reads them; a router's prompt ids are staged
at the replica, taken once, and bounded."""

import asyncio
import time

from mistral_ray.routing.hint import RouteHint, hint_from_body, sendable
from mistral_ray.routing.kv_feed import EngineLoad, KVFeed
from mistral_ray.routing.prompts import PromptSender, body_digest, decode_ids, encode_ids
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
    staged.put(b"a", b"da", encode_ids([1, 2]), now=0)
    staged.put(b"b", b"db", encode_ids([3]), now=1)
    staged.put(b"c", b"dc", encode_ids([4]), now=2)  # beyond 2 entries: the oldest goes
    assert staged.take(b"a", b"da") is None and staged.take(b"b", b"db") == [3]
    assert staged.take(b"b", b"db") is None  # taken once
    staged.put(b"d", b"dd", encode_ids(range(20)), now=3)  # 80 bytes: more than all of staging holds
    staged.put(b"x" * 65, b"dx", encode_ids([1]), now=3)  # not a key of ours
    staged.put(b"e", b"de", b"\x01\x02\x03", now=3)  # not whole ids
    assert len(staged) == 1
    staged.put(b"f", b"df", encode_ids([5]), now=20)  # c is older than the TTL
    assert staged.take(b"c", b"dc") is None and staged.take(b"f", b"df") == [5]
    staged.put(b"g", b"dg", encode_ids([6]), now=20)
    assert staged.take(b"g", b"another body's") is None and b"g" not in staged  # for its own body only


def test_a_plain_chat_is_sendable_anything_the_renderer_reads_is_not():
    chat = {"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
            "max_tokens": 5, "stream": True, "temperature": 0, "stream_options": {"include_usage": True},
            "user": "u", "tools": None, "add_generation_prompt": True, "add_special_tokens": False}
    assert sendable(chat)
    user = {"role": "user", "content": "hi"}
    for messages in ([{"role": "developer", "content": "d"}, user],  # vLLM may merge it into a system prompt
                     [user, {"role": "system", "content": "late"}],  # merged into the first by vLLM
                     [{"role": "system", "content": "x-anthropic-billing-header: cc\nrest"}, user],  # stripped
                     [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                     [{"role": "user", "content": "hi", "name": "n"}], [{"role": "tool", "content": "t"}], []):
        assert not sendable({**chat, "messages": messages}), messages
    for switch, value in [("add_generation_prompt", "false"), ("add_generation_prompt", False),
                          ("continue_final_message", True), ("add_special_tokens", "true"), ("add_special_tokens", 1)]:
        assert not sendable({**chat, switch: value}), (switch, value)  # vLLM reads "false" as False
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
                key = sender.send(endpoint, [5, 6, 7], body_digest(b"body"))
                await asyncio.sleep(0.02)
            assert await link.prompt_ids(key.encode(), body_digest(b"body")) == [5, 6, 7]  # waited for if on its way
            assert await link.prompt_ids(key.encode(), body_digest(b"body")) is None
            started = time.monotonic()
            assert await link.prompt_ids(b"0" * 32, body_digest(b"body")) is None  # nobody staged it: not waited long
            assert time.monotonic() - started < 0.5
        finally:
            link.close()

    try:
        asyncio.run(run())
    finally:
        sender.close()
    assert PromptSender().send("tcp://127.0.0.1:1", [1], b"d") is None  # nobody there: not sent, never waits


def test_a_pick_counts_until_the_engine_snapshot_shows_it_arrived():
    from tests.unit.test_request_router import first_choices, replica, router

    r = router("kv_aware")
    stats = {"pub": "tcp://127.0.0.1:9", "topic": "t", "load": "tcp://127.0.0.1:9"}
    a, b = replica("a", running=30), replica("b", running=30)  # Serve's stale report: both busy
    for rep in (a, b):
        rep.routing_stats["kv_events"] = {**stats, "topic": rep.replica_id.unique_id}
    try:
        now = time.monotonic()
        r.feed.loads = {"a": EngineLoad(1, 0, 0, 0.1, {"router-1": 0}, at=now), "b": EngineLoad(4, 0, 0, 0.1, {}, at=now)}
        r.feed._sources = {"a": {}, "b": {}}
        r.feed.track = lambda *args: None  # no thread: the snapshots are given above
        pick = RouteHint(picker="router-1")
        assert first_choices(r, [a, b], 3, pick) == {"a": 3}  # 1 + 3 picks in flight = b's 4
        r.feed.loads["a"] = EngineLoad(4, 0, 0, 0.9, {"router-1": 3}, at=now)  # they arrived: counted once
        assert first_choices(r, [a, b], 2, pick) == {"a": 1, "b": 1}
        assert r._load(a, "router-1").kv_usage == 0.9  # the engine's KV use, not the gate's estimate
        r.feed.loads["a"] = EngineLoad(0, 0, 0, 0.0, {"router-1": 5}, at=now - 10)  # a link that went quiet:
        assert r._load(a, "router-1").ongoing >= 30  # not idle for good; Serve's report again
    finally:
        r.feed.close()


def test_the_engines_step_stats_reach_the_listener_as_vllm_calls_its_loggers():
    import functools

    from vllm.v1.metrics.loggers import PerEngineStatLoggerAdapter
    from vllm.v1.metrics.stats import SchedulerStats

    from mistral_ray.engine.step_stats import StepStats

    seen = []
    # How vLLM's StatLoggerManager wraps a factory that is not a logger class: called (config, engine index).
    adapter = PerEngineStatLoggerAdapter(None, [0], functools.partial(StepStats, listener=lambda *a: seen.append(a)))
    adapter.record(SchedulerStats(num_running_reqs=3, num_waiting_reqs=1, num_skipped_waiting_reqs=1,
                                  kv_cache_usage=0.5), None, engine_idx=0)
    adapter.record(None, None, engine_idx=0)  # outputs without scheduler stats: nothing to pass on
    assert seen == [(3, 2, 0.5)]
    broken = PerEngineStatLoggerAdapter(None, [0], functools.partial(StepStats, listener=lambda *a: 1 / 0))
    broken.record(SchedulerStats(), None, engine_idx=0)  # never raises into vLLM's output handler


def test_a_router_sends_ids_only_to_engines_that_render_the_probe_as_it_does():
    from mistral_ray import tiny_model
    from mistral_ray.config import PROJECT_ROOT
    from mistral_ray.routing.hint import PROBE_CHAT
    from mistral_ray.routing.tokens import PromptTokens

    source = PROJECT_ROOT / ".state" / "models" / "tiny-mistral"
    tiny_model.ensure(str(source))
    tokens = PromptTokens(str(source))
    tokens._load()
    mine = list(tokens.of("chat", {"messages": list(PROBE_CHAT)}))
    assert tokens.agrees(mine)
    assert not tokens.agrees(mine[:-1] + [mine[-1] + 1]) and not tokens.agrees(None)
