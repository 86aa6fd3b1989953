"""The replica's stream contract and the router's own checks, with a fake engine (no Ray, no vllm).

Serving is proven for real in tests/integration; this pins the contract between the two layers.
"""

import asyncio
import json
import subprocess
import sys

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mistral_ray.config import ServiceConfig
from mistral_ray.protocol import Head
from mistral_ray.replica import LLMServer
from mistral_ray.router import errors
from mistral_ray.router.intake import parse as _parse, relay as _relay


class FakeEngine:
    async def handle(self, route, body, on_usage=None):
        req = json.loads(body)
        if req.get("boom"):
            raise RuntimeError("engine core died")
        if not req.get("stream"):
            return 200, json.dumps({"route": route})

        async def chunks():
            for i in range(3):
                yield f"data: {i}\n\n"

        return 200, chunks()

    def info(self):
        return {"num_kv_heads": 2, "sliding_window": 64, "num_kv_blocks": 4, "block_size": 32}

    async def check_health(self):
        return None

    def shutdown(self):
        pass


async def fake_factory(cfg):
    return FakeEngine()


async def replica() -> LLMServer:
    server = LLMServer.__new__(LLMServer)
    await server.__init__(ServiceConfig(), engine_factory=fake_factory)
    return server


async def collect(server, body: dict):
    return [item async for item in server.generate("chat", json.dumps(body).encode())]


def test_replica_yields_head_then_body():
    async def main():
        server = await replica()
        unary = await collect(server, {"stream": False})
        streamed = await collect(server, {"stream": True})
        failed = await collect(server, {"boom": True})
        return server, unary, streamed, failed

    server, unary, streamed, failed = asyncio.run(main())
    assert unary == [Head(200, server.replica_id, stream=False), '{"route": "chat"}']
    assert streamed[0] == Head(200, server.replica_id, stream=True)
    assert "".join(streamed[1:]) == "data: 0\n\ndata: 1\n\ndata: 2\n\n"  # maybe coalesced, never changed
    assert failed[0].status == 500 and "engine core died" in json.loads(failed[1])["error"]["message"]
    assert server.info()["replica_id"] == server.replica_id


def test_router_and_replica_do_not_import_vllm_or_torch():
    code = (
        "import sys, mistral_ray.app, mistral_ray.router.app, mistral_ray.replica, mistral_ray.cli;"
        "heavy = {'vllm', 'torch', 'transformers'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("body", [b"{bad", b"[1, 2]", b"\xff\xfe", b'"text"'])
def test_parse_rejects_non_objects(body):
    response = _parse(body)
    assert response.status_code == 400
    err = json.loads(response.body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


def test_relay_ends_a_broken_stream_with_an_error_event():
    async def broken():
        yield "data: 1\n\n"
        raise ConnectionError("replica died")

    async def main():
        return [c async for c in _relay(broken())]

    out = asyncio.run(main())
    assert out[0] == "data: 1\n\n"
    event = json.loads(out[1].split("\n\n")[0].removeprefix("data: "))
    assert event["error"]["type"] == "service_unavailable_error" and out[1].endswith("data: [DONE]\n\n")


def test_fastapi_errors_are_openai_shaped():
    app = FastAPI()
    errors.install(app)

    @app.get("/x/{n}")
    def x(n: int):
        return {"n": n}

    client = TestClient(app)
    for path, status in [("/nope", 404), ("/x/abc", 400)]:
        r = client.get(path)
        assert r.status_code == status
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert client.post("/x/1").status_code == 405


def test_metrics_switched_off_declare_nothing():
    from mistral_ray import metrics

    off = metrics.RouterMetrics("m", enabled=False)
    assert all(isinstance(getattr(off, n), metrics._Off) for n in ("requests", "in_flight", "ttft", "e2e", "rejected"))
    off.started("chat")
    off.finished("chat", 200, "k")
    off.reject("chat", "auth")
    assert off._in_flight == {"chat": 0}
    assert isinstance(metrics.TokenMetrics("m", enabled=False).tokens, metrics._Off)


def test_replica_reports_waiting_running_and_windowed_kv_while_streaming():
    from mistral_ray.routing import RouteHint

    async def go():
        server = await replica()
        assert server.load() == {"waiting": 0, "running": 0, "kv_usage": 0.0}
        long_prompt = server.generate("chat", b'{"stream": true}', RouteHint(prompt_chars=4000))  # ~1000 tokens
        short = server.generate("chat", b'{"stream": true}', RouteHint(prompt_chars=40))  # ~10 tokens
        await long_prompt.__anext__()  # the head: admitted, no token yet
        await short.__anext__()
        assert server.load()["waiting"] == 2
        await long_prompt.__anext__()  # first chunk: running
        stats = server.record_routing_stats()
        assert (stats["waiting"], stats["running"]) == (1, 1)
        # KV counts min(length, W=64) per sequence on 4 x 32 = 128 token slots: (64 + 10) / 128.
        assert stats["kv_usage"] == pytest.approx(74 / 128)
        assert server.record_autoscaling_stats() == stats
        await long_prompt.aclose()
        await short.aclose()
        assert server.load()["waiting"] + server.load()["running"] == 0

    asyncio.run(go())


def test_parse_refuses_deep_nesting_with_400():
    deep = b"[" * 100_000 + b"]" * 100_000
    resp = _parse(deep)
    assert resp.status_code == 400 and b"nested too deeply" in resp.body


def test_coalesce_sends_at_once_and_merges_only_what_piled_up():
    from mistral_ray.replica import coalesce

    async def engine(gaps, fail=False):
        for i, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            yield f"data: {i}\n\n"
        if fail:
            raise RuntimeError("engine died")

    async def consume(gaps, consumer_delay, fail=False):
        count = []
        items, stamps = [], []
        t0 = asyncio.get_running_loop().time()
        try:
            async for item in coalesce(engine(gaps, fail), lambda: count.append(1)):
                items.append(item)
                stamps.append(asyncio.get_running_loop().time() - t0)
                await asyncio.sleep(consumer_delay)  # the Ray hop
        except RuntimeError as exc:
            items.append(str(exc))
        return items, stamps, len(count)

    # A slow engine, a fast hop: one item per chunk, each sent as soon as it exists.
    items, stamps, n = asyncio.run(consume([0.02] * 4, 0))
    assert items == [f"data: {i}\n\n" for i in range(4)] and n == 4
    assert stamps[0] < 0.05
    # A fast engine, a slow hop: the first chunk alone and at once, then whatever piled up as one item.
    items, stamps, n = asyncio.run(consume([0] + [0.005] * 9, 0.1))
    assert items[0] == "data: 0\n\n" and stamps[0] < 0.05 and len(items) < 5
    assert "".join(items) == "".join(f"data: {i}\n\n" for i in range(10))
    # An engine failure arrives after the chunks before it.
    items, _, _ = asyncio.run(consume([0, 0], 0, fail=True))
    assert "".join(items[:-1]) == "data: 0\n\ndata: 1\n\n" and items[-1] == "engine died"


def test_coalesce_closing_early_cancels_the_engine_stream():
    from mistral_ray.replica import coalesce

    cancelled = []

    async def engine():
        try:
            for i in range(1000):
                await asyncio.sleep(0.01)
                yield f"data: {i}\n\n"
        except asyncio.CancelledError:
            cancelled.append(True)  # vLLM aborts the request here
            raise

    async def main():
        stream = coalesce(engine(), lambda: None)
        await stream.__anext__()
        await stream.aclose()  # the client went away

    asyncio.run(main())
    assert cancelled == [True]


def test_closing_the_replica_stream_cancels_the_engine_stream_at_once():
    cancelled = []

    class LongEngine(FakeEngine):
        async def handle(self, route, body, on_usage=None):
            async def chunks():
                try:
                    for i in range(10_000):
                        await asyncio.sleep(0.001)
                        yield f"data: {i}\n\n"
                except asyncio.CancelledError:
                    cancelled.append(True)  # where vLLM aborts the request
                    raise

            return 200, chunks()

    async def long_factory(cfg):
        return LongEngine()

    async def main():
        server = LLMServer.__new__(LLMServer)
        await server.__init__(ServiceConfig(), engine_factory=long_factory)
        stream = server.generate("completions", b'{"stream": true}')
        await stream.__anext__()  # head
        await stream.__anext__()  # first chunk
        await stream.aclose()  # Serve closes it when the client disconnects
        return server

    server = asyncio.run(main())
    assert cancelled == [True] and server.inflight == {}
