"""The replica's gate around an engine's OpenAI app, with a fake engine (no Ray cluster, no vllm).

Serving is proven for real in tests/integration; this pins the gate's own contract: the checks and their
error bodies, the replica header, usage accounting, timeouts, engine faults, and the load it reports.
"""

import asyncio
import json
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mistral_ray.config import parse_service
from mistral_ray.metrics import RequestMetrics
from mistral_ray.routing.ingress import PICKER_HEADER
from mistral_ray.server.errors import REPLICA_HEADER
from mistral_ray.server.replica import LLMServer


def vllm_like_app(started: list, cancelled: list, adapters: tuple = ()) -> FastAPI:
    """The shapes vLLM's own app answers with: unary JSON with usage, SSE chunks with an optional usage
    chunk, vLLM's error body (its own `type`, an integer `code`), a slow request, and an exception."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if body.get("boom"):
            raise KeyError("engine bug")
        if body.get("vllm_error"):
            return JSONResponse({"error": {"message": "temperature must be >= 0", "type": "BadRequestError",
                                           "param": "temperature", "code": 400}}, status_code=400)
        if body.get("slow"):
            started.append(True)
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(True)  # where vLLM aborts the request in the engine
                raise
        if not body.get("stream"):
            from mistral_ray.server.fairness import TICKET  # what the engine's generate would run with

            ticket = TICKET.get()
            return {"choices": [{"text": "abc"}], "usage": {"prompt_tokens": 3, "total_tokens": 5,
                                                             "completion_tokens": 2},
                    "priority": ticket.priority if ticket else None}

        async def events():
            for i in range(3):
                yield f'data: {{"choices":[{{"text":"{i}"}}],"usage":null}}\n\n'
                await asyncio.sleep(0.01)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield ('data: {"choices":[],"usage":{"prompt_tokens":7,"total_tokens":10,"completion_tokens":3,'
                       '"prompt_tokens_details":{"cached_tokens":32}}}\n\n')
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):  # what vLLM's chat serving is handed: the ids the gate put in its scope
        from mistral_ray.server.generation import PROMPT_IDS_SCOPE

        return {"prompt_ids": request.scope.get(PROMPT_IDS_SCOPE), "usage": {"prompt_tokens": 1, "completion_tokens": 1}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "tiny-mistral", "object": "model"}] + [
            {"id": m, "object": "model", "root": f"/srv/adapters/{m}", "parent": "tiny-mistral"} for m in adapters]}

    for path in ("/invocations", "/v1/chat/completions/batch", "/inference/v1/generate", "/ping"):
        app.add_api_route(path, lambda: {"served": "by vLLM"}, methods=["GET", "POST"])  # vLLM has them too

    @app.websocket("/v1/realtime")
    async def realtime(ws):
        await ws.accept()
        await ws.send_text("generating")

    return app


class FakeEngine:
    def __init__(self, healthy=True):
        self.started, self.cancelled, self.healthy = [], [], healthy
        self.adapters = []

    def build_app(self):
        return vllm_like_app(self.started, self.cancelled, self.adapters)

    async def set_adapters(self, wanted):
        self.adapters[:] = sorted(wanted)
        return {"added": sorted(wanted), "removed": [], "failed": {}, "served": sorted(wanted)}

    def read_request(self, route, payload):
        from mistral_ray.engine.requests import read  # vLLM's own request models: the real reading

        return read(route, payload)

    def info(self):
        return {"num_kv_heads": 2, "sliding_window": 64, "num_kv_blocks": 4, "block_size": 32}

    async def check_health(self):
        if not self.healthy:
            raise RuntimeError("engine core died")

    def shutdown(self):
        pass


class Recorded(RequestMetrics):
    """The real metrics class, switched off, remembering what it was told."""

    def __init__(self):
        super().__init__("tiny-mistral", enabled=False)
        self.calls = []
        self.models = []  # the `model` label of each finished request (None: the base model's)

    def count_tokens(self, route, prompt, completion, model=None):
        self.calls.append(("tokens", route, prompt, completion))

    def reject(self, route, reason):
        super().reject(route, reason)
        self.calls.append(("reject", route, reason))

    def finished(self, route, status, key_id, model=None, counted=True):
        super().finished(route, status, key_id, model, counted)
        if counted:
            self.calls.append(("finished", route, status, key_id))
            self.models.append(model)

    def first_token(self, route, seconds, model=None):
        self.calls.append(("ttft", route))

    def completed(self, route, stream, seconds, model=None):
        self.calls.append(("e2e", route, stream))

    def kv_prediction(self, route, predicted, cached):
        self.calls.append(("kv", route, predicted, cached))


class Bank:
    """A QuotaBank behind a stand-in for its Serve handle: the replica calls `bank.<method>.remote(...)`."""

    def __init__(self, **limits):
        from mistral_ray.config import LimitsConfig
        from mistral_ray.server.quota import QuotaBank

        self.real = QuotaBank(LimitsConfig(**limits), now=lambda: 1000.0)  # frozen: no refill between checks
        self.calls, self.delay_s = [], 0.0

        async def admit(*args):
            self.calls.append(("admit", *args))
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return await self.real.admit(*args)

        def refund(*args):
            self.calls.append(("refund", *args))
            self.real.limiter.refund(*args)

        self.admit, self.refund = SimpleNamespace(remote=admit), SimpleNamespace(remote=refund)


async def server(engine=None, keys_file=None, bank=None, **router) -> LLMServer:
    args = {"router": {**router, "api_keys": {"enabled": True, "file": str(keys_file)}} if keys_file else router}
    engine = engine or FakeEngine()

    async def factory(cfg):
        return engine

    s = LLMServer.__new__(LLMServer)
    await s.__init__(parse_service(args), bank, engine_factory=factory)
    s.metrics = Recorded()
    s.engine_ref = engine
    return s


def call(s: LLMServer, method: str, path: str, **kw) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=s.gate())
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())


def openai_error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def test_unary_answer_carries_the_replica_header_and_counts_tokens():
    s = asyncio.run(server())
    r = call(s, "POST", "/v1/completions", json={"model": "tiny-mistral", "prompt": "hi"})
    assert r.status_code == 200 and r.headers[REPLICA_HEADER] == s.replica_id
    assert ("tokens", "completions", 3, 2) in s.metrics.calls
    assert ("finished", "completions", 200, "none") in s.metrics.calls


def test_adapters_the_replica_serves_are_admitted_and_labelled_others_are_404():
    s = asyncio.run(server())
    s.checks.models = frozenset({"tiny-mistral", "ft-1"})  # what reconfigure sets
    assert call(s, "POST", "/v1/completions", json={"model": "ft-1", "prompt": "hi"}).status_code == 200
    for model in ("ft-2", ["ft-1"], {"a": 1}):
        assert call(s, "POST", "/v1/completions", json={"model": model, "prompt": "hi"}).status_code == 404
    assert s.metrics.models == ["ft-1", None, None, None]  # refused names make no series


def test_an_adapter_with_an_allow_list_is_404_and_unlisted_for_other_keys(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("team-a:sk-aaaaaaaaaaaa\nteam-b:sk-bbbbbbbbbbbb\n")
    s = asyncio.run(server(keys_file=keys, engine=None))
    s.cfg = parse_service({"engine": {"lora": {}}, "router": {"api_keys": {"enabled": True, "file": str(keys)}}})
    asyncio.run(s.reconfigure({"adapters": {"a-only": {"source": "/a", "keys": ["team-a"]}, "shared": {"source": "/s"}}}))
    a, b = ({"authorization": f"Bearer sk-{c * 12}"} for c in "ab")
    body = {"model": "a-only", "prompt": "hi"}
    assert call(s, "POST", "/v1/completions", json=body, headers=a).status_code == 200
    r = call(s, "POST", "/v1/completions", json=body, headers=b)
    assert r.status_code == 404 and openai_error(r)["code"] == "model_not_found"  # as if it did not exist
    assert call(s, "POST", "/v1/completions", json={**body, "model": "shared"}, headers=b).status_code == 200
    listed = lambda h: [m["id"] for m in call(s, "GET", "/v1/models", headers=h).json()["data"]]  # noqa: E731
    assert listed(a) == ["tiny-mistral", "a-only", "shared"] and listed(b) == ["tiny-mistral", "shared"]
    r = call(s, "GET", "/v1/models", headers=b)
    assert int(r.headers["content-length"]) == len(r.content) and r.headers[REPLICA_HEADER] == s.replica_id
    assert "/srv/adapters" not in r.text  # an adapter's directory is the server's business


def test_ttft_is_observed_for_streamed_generation_only_and_unary_answers_get_their_latency():
    s = asyncio.run(server())
    assert call(s, "POST", "/v1/completions", json={"prompt": "hi"}).status_code == 200
    assert call(s, "POST", "/v1/completions", json={"prompt": "hi", "stream": True}).status_code == 200
    assert call(s, "GET", "/v1/models").status_code == 200
    timed = [c for c in s.metrics.calls if c[0] in ("ttft", "e2e")]
    assert timed == [("e2e", "completions", False), ("ttft", "completions"), ("e2e", "completions", True)]


def test_the_key_label_is_bounded_the_same_on_every_replica_and_can_be_off():
    # The first key_labels ids of the key file, whatever order requests come in: replicas agree.
    bounded = RequestMetrics("m", enabled=False, key_labels=2, key_ids=("a", "b", "c", "d"))
    assert [bounded.key_label(k) for k in ("c", "a", "d", "b", "none", "unknown")] == \
        ["other", "a", "other", "b", "none", "unknown"]
    off = RequestMetrics("m", enabled=False, key_labels=0, key_ids=("a",))
    assert off.key_label("a") == "all"


def test_stream_usage_is_counted_and_shown_only_when_asked_for():
    s = asyncio.run(server())
    body = {"model": "tiny-mistral", "prompt": "hi", "stream": True}
    hidden = call(s, "POST", "/v1/completions", json=body).text
    assert '"usage":{' not in hidden and hidden.count("data: ") == 4 and hidden.endswith("data: [DONE]\n\n")
    shown = call(s, "POST", "/v1/completions", json={**body, "stream_options": {"include_usage": True}}).text
    assert '"usage":{"prompt_tokens":7' in shown
    assert s.metrics.calls.count(("tokens", "completions", 7, 3)) == 2


@pytest.mark.parametrize("trusted", [True, False])
def test_kv_aware_prediction_is_compared_with_the_engines_count(monkeypatch, trusted):
    from mistral_ray.routing.ingress import PREDICTED_HEADER
    from mistral_ray.server import replica

    monkeypatch.setattr(replica, "haproxy_serves", lambda: trusted)  # HAProxy strips clients' router headers
    s = asyncio.run(server())
    body = {"model": "tiny-mistral", "prompt": "hi", "stream": True}
    for predicted in ("32", "0", "64"):
        call(s, "POST", "/v1/completions", json=body, headers={PREDICTED_HEADER: predicted})
    call(s, "POST", "/v1/completions", json=body)  # not predicted: nothing to compare
    kv = [c for c in s.metrics.calls if c[0] == "kv"]
    assert kv == ([("kv", "completions", 32, 32), ("kv", "completions", 0, 32), ("kv", "completions", 64, 32)]
                  if trusted else [])


@pytest.mark.parametrize("trusted", [True, False])
def test_a_routers_prompt_ids_reach_the_engine_only_from_behind_haproxy(monkeypatch, trusted):
    from mistral_ray.routing.ingress import PROMPT_HEADER
    from mistral_ray.server import replica

    monkeypatch.setattr(replica, "haproxy_serves", lambda: trusted)  # HAProxy strips clients' router headers
    s = asyncio.run(server())
    from mistral_ray.routing.prompts import body_digest

    chat = {"model": "tiny-mistral", "messages": [{"role": "user", "content": "hi"}]}
    sent = json.dumps(chat).encode()
    staged = {b"k1": (body_digest(sent), [7, 8, 9]), b"k2": (body_digest(b"another body"), [1])}

    async def take(key, digest):  # the link's rule: ids only for the body they were computed from
        entry = staged.pop(key, None)
        return entry[1] if entry is not None and entry[0] == digest else None

    s.link = SimpleNamespace(prompt_ids=take, close=lambda: None)
    forwarded = []
    s.metrics.prompt_forwarded = lambda route, used: forwarded.append((route, used))
    post = lambda key=None: call(s, "POST", "/v1/chat/completions", content=sent,  # noqa: E731
                                 headers={PROMPT_HEADER: key, "content-type": "application/json"} if key else
                                 {"content-type": "application/json"}).json()
    first, second, other, plain = post("k1"), post("k1"), post("k2"), post()
    assert first["prompt_ids"] == ([7, 8, 9] if trusted else None)
    assert second["prompt_ids"] is None and plain["prompt_ids"] is None  # taken once; none asked
    assert other["prompt_ids"] is None  # staged for another body
    assert forwarded == ([("chat", True), ("chat", False), ("chat", False)] if trusted else [])


@pytest.mark.parametrize("body, status, code, param", [
    (b"{bad", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_json", None),
    (b"\xff\xfe", 400, "invalid_json", None),
    (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", None),
    (b'{"model": "gpt-4", "prompt": "x"}', 404, "model_not_found", "model"),
    (b'{"prompt": null}', 400, None, "prompt"),
    (b'{"prompt": "x", "n": 9}', 400, "n_too_large", "n"),
    (b'{"prompt": "x", "vllm_error": true}', 400, None, "temperature"),
    (b'{"prompt": "x", "logprobs": {}}', 400, None, "logprobs"),  # vLLM's own validator (not pydantic's)
    # disaggregated serving's fields: they would replace the prompt or reach the engine's KV controls
    (b'{"prompt": "x", "kv_transfer_params": {"prompt_token_ids": [1, 2]}}', 400, "unsupported_field",
     "kv_transfer_params"),
    (b'{"prompt": "x", "vllm_xargs": {"kv_cache_report_mode": "full"}}', 400, "unsupported_field", "vllm_xargs"),
])
def test_refusals_are_openai_errors(body, status, code, param):
    s = asyncio.run(server())
    r = call(s, "POST", "/v1/completions", content=body)
    err = openai_error(r)
    assert r.status_code == status and err["code"] == code and err["param"] == param
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert r.headers[REPLICA_HEADER] == s.replica_id


def test_chat_shape_is_checked_before_the_engine():
    s = asyncio.run(server())
    for messages, param in [([], "messages"), (None, "messages"), (["x"], "messages.0")]:
        r = call(s, "POST", "/v1/chat/completions", json={"messages": messages})
        assert r.status_code == 400 and openai_error(r)["param"] == param


def test_body_over_the_limit_is_413_declared_or_counted():
    s = asyncio.run(server(limits={"max_body_bytes": 1024}))
    assert openai_error(r := call(s, "POST", "/v1/completions", content=b"x" * 2048))["code"] == "request_too_large"
    assert r.status_code == 413

    async def chunks():
        for _ in range(4):
            yield b"y" * 512

    r = call(s, "POST", "/v1/completions", content=chunks())  # no content-length: counted while read
    assert r.status_code == 413


def test_framework_errors_are_rewritten():
    s = asyncio.run(server())
    r = call(s, "GET", "/v1/nowhere")
    assert r.status_code == 404 and openai_error(r)["type"] == "not_found_error"
    r = call(s, "GET", "/v1/completions")
    assert r.status_code == 405 and openai_error(r)["message"]


def test_api_keys(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("team-a:sk-aaaaaaaaaaaa\n")
    s = asyncio.run(server(keys_file=keys))
    body = {"model": "tiny-mistral", "prompt": "hi"}
    for auth in [None, "Bearer sk-wrong", "Basic sk-aaaaaaaaaaaa"]:
        r = call(s, "POST", "/v1/completions", json=body, headers={"authorization": auth} if auth else {})
        assert r.status_code == 401 and openai_error(r)["code"] == "invalid_api_key"
    assert call(s, "GET", "/v1/models").status_code == 401  # every route but the probes
    assert call(s, "GET", "/health").status_code == 200
    r = call(s, "POST", "/v1/completions", json=body, headers={"authorization": "Bearer sk-aaaaaaaaaaaa"})
    assert r.status_code == 200
    assert ("finished", "completions", 200, "team-a") in s.metrics.calls


def test_full_replica_answers_503_with_retry_after():
    s = asyncio.run(server())
    s.load.max_ongoing = 0
    r = call(s, "POST", "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and openai_error(r)["code"] == "overloaded"


def test_quota_is_charged_only_for_admitted_requests_and_given_back_when_the_engine_refuses():
    bank = Bank(requests_per_minute=10, tokens_per_minute=10_000, max_keys=10)
    s = asyncio.run(server(bank=bank, limits={"requests_per_minute": 10, "tokens_per_minute": 10_000}))
    body = {"prompt": "hi", "max_tokens": 10}
    s.load.max_ongoing = 0  # full: 503 before the bank is asked
    assert call(s, "POST", "/v1/completions", json=body).status_code == 503
    # a full replica sheds before it reads the body: even a request it would refuse for its size
    assert call(s, "POST", "/v1/completions", json={"prompt": "hi", "n": 99}).status_code == 503
    assert bank.calls == []
    s.load.max_ongoing = 64
    assert call(s, "POST", "/v1/completions", json=body).status_code == 200
    assert bank.calls == [("admit", "none", 10, None, None)] and bank.real.limiter.buckets["none"][0].level == 9
    # vLLM refuses it (its own 400) before generating: its tokens come back, not its request.
    r = call(s, "POST", "/v1/completions", json={**body, "vllm_error": True})
    assert r.status_code == 400 and bank.calls[-1] == ("refund", "none", (0.0, 10.0))
    requests, tokens = bank.real.limiter.buckets["none"]
    assert requests.level == 8  # it was a request: counted
    assert tokens.level == 10_000 - 10  # its tokens were never made: given back


def test_rate_limit_answers_429_with_retry_after():
    bank = Bank(requests_per_minute=1, max_keys=10)
    s = asyncio.run(server(bank=bank, limits={"requests_per_minute": 1}))
    assert call(s, "POST", "/v1/completions", json={"prompt": "hi"}).status_code == 200
    r = call(s, "POST", "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert openai_error(r)["code"] == "rate_limit_exceeded" and ("reject", "completions", "rate_limit") in s.metrics.calls


def test_no_first_byte_in_time_is_504_and_the_engine_request_is_cancelled():
    s = asyncio.run(server(request_timeout_s=0.3))
    r = call(s, "POST", "/v1/completions", json={"prompt": "hi", "slow": True})
    assert r.status_code == 504 and openai_error(r)["code"] == "timeout"
    assert s.engine_ref.started and s.engine_ref.cancelled == [True]
    assert ("reject", "completions", "timeout") in s.metrics.calls


def test_an_engine_fault_is_a_500_not_the_clients_fault():
    s = asyncio.run(server())
    r = call(s, "POST", "/v1/completions", json={"prompt": "hi", "boom": True})
    assert r.status_code == 500 and openai_error(r)["type"] == "server_error"
    assert call(s, "POST", "/v1/completions", json={"prompt": "still here?"}).status_code == 200


def test_health_and_ready():
    s = asyncio.run(server())
    assert call(s, "GET", "/health").json() == {"status": "ok"}
    assert call(s, "GET", "/ready").json() == {"status": "ready", "replica": s.replica_id}
    sick = asyncio.run(server(FakeEngine(healthy=False)))
    r = call(sick, "GET", "/ready")
    assert r.status_code == 503 and openai_error(r)["code"] == "not_ready"


def test_load_counts_waiting_running_windowed_kv_and_arrivals():
    async def go():
        s = await server()
        gate = s.gate()
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            body = {"prompt": "p" * 4000, "slow": True}  # ~1000 tokens, parked in the engine: waiting
            task = asyncio.create_task(client.post("/v1/completions", json=body,
                                                   headers={PICKER_HEADER: "router-1"}))
            while not s.engine_ref.started:
                await asyncio.sleep(0.01)
            stats = await s.record_routing_stats()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return s, stats

    s, stats = asyncio.run(go())
    assert (stats["waiting"], stats["running"]) == (1, 0)
    # KV counts min(length, W=64) per sequence on 4 x 32 = 128 token slots.
    assert stats["kv_usage"] == pytest.approx(64 / 128)
    assert stats["arrivals"] == {"router-1": 1}
    assert set(asyncio.run(s.record_autoscaling_stats())) == {"waiting", "running", "kv_usage"}


def test_serving_modules_do_not_import_vllm_or_torch():
    code = (
        "import sys, mistral_ray.app, mistral_ray.server.replica, mistral_ray.routing.ingress, mistral_ray.cli;"
        "heavy = {'vllm', 'torch', 'transformers'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_metrics_switched_off_declare_nothing():
    from mistral_ray import metrics

    off = metrics.RequestMetrics("m", enabled=False)
    assert all(isinstance(getattr(off, n), metrics._Off)
               for n in ("requests", "in_flight", "ttft", "e2e", "rejected", "tokens"))
    off.started("chat")
    off.finished("chat", 200, "k")
    off.reject("chat", "auth")
    assert off._in_flight == {"chat": 0}
    assert isinstance(metrics.RoutingMetrics("a", "pow2", enabled=False).decisions, metrics._Off)


@pytest.mark.parametrize("method, path", [("POST", "/invocations"), ("POST", "/v1/chat/completions/batch"),
                                          ("POST", "/inference/v1/generate"), ("GET", "/ping"),
                                          ("GET", "/openapi.json"), ("POST", "/v1/completions/")])
def test_routes_outside_the_table_are_404_even_where_vllm_has_them(method, path, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("team-a:sk-aaaaaaaaaaaa\n")
    s = asyncio.run(server(keys_file=keys))
    r = call(s, method, path, json={"prompt": "x", "n": 50}, headers={"authorization": "Bearer sk-aaaaaaaaaaaa"})
    assert r.status_code == 404 and openai_error(r)["type"] == "not_found_error"
    assert ("reject", "other", "not_served") in s.metrics.calls


def test_websockets_are_refused_before_the_handshake():
    s = asyncio.run(server())
    sent = []

    async def go():
        async def receive():
            return {"type": "websocket.connect"}

        async def send(message):
            sent.append(message)

        await s.gate()({"type": "websocket", "path": "/v1/realtime", "headers": []}, receive, send)

    asyncio.run(go())
    assert sent == [{"type": "websocket.close", "code": 1008}]  # no accept: the server answers 403


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "n": "5"}, "n"), ({"prompt": "x", "n": 5.0}, "n"), ({"prompt": "x", "n": "3"}, "n"),
    ({"prompt": "x", "max_tokens": "1000"}, "max_tokens"), ({"prompt": "x", "max_tokens": 33.0}, "max_tokens"),
    ({"prompt": ["a", "b", "c"], "max_tokens": 1}, "prompt"),
])
def test_limits_hold_for_every_encoding_vllm_accepts(body, param):
    s = asyncio.run(server(limits={"max_n": 2, "max_tokens": 32, "max_batch_prompts": 2}))
    r = call(s, "POST", "/v1/completions", json={"model": "tiny-mistral", **body})
    assert r.status_code == 400 and openai_error(r)["param"] == param, r.text
    assert not s.engine_ref.started


def test_the_capacity_bound_holds_while_a_slow_bank_answers():
    bank = Bank(requests_per_minute=1000, max_keys=10)
    bank.delay_s = 0.1

    async def go():
        s = await server(bank=bank, limits={"requests_per_minute": 1000})
        s.load.max_ongoing = 2
        transport = httpx.ASGITransport(app=s.gate())
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            return await asyncio.gather(*(client.post("/v1/completions", json={"prompt": "hi"}) for _ in range(10)))

    statuses = sorted(r.status_code for r in asyncio.run(go()))
    assert statuses == [200] * 2 + [503] * 8
    assert len([c for c in bank.calls if c[0] == "admit"]) == 2  # the refused never reached the bank


def test_no_routing_state_from_unauthenticated_requests_and_pickers_are_bounded(tmp_path):
    from mistral_ray.server.load import MAX_PICKERS

    keys = tmp_path / "keys"
    keys.write_text("team-a:sk-aaaaaaaaaaaa\n")
    s = asyncio.run(server(keys_file=keys))
    for i in range(5):
        assert call(s, "POST", "/v1/completions", json={"prompt": "x"}, headers={PICKER_HEADER: f"fake-{i}"}
                    ).status_code == 401
    assert asyncio.run(s.record_routing_stats())["arrivals"] == {}
    for i in range(MAX_PICKERS + 10):
        s.load.arrived(f"router-{i}")
    s.load.arrived("x" * 1000)
    arrivals = asyncio.run(s.record_routing_stats())["arrivals"]
    assert len(arrivals) == MAX_PICKERS and "router-0" not in arrivals and f"router-{MAX_PICKERS + 9}" in arrivals


def test_a_batch_counts_its_sequences_in_the_load():
    async def go():
        s = await server()
        transport = httpx.ASGITransport(app=s.gate())
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            task = asyncio.create_task(client.post("/v1/completions", json={
                "prompt": ["p" * 400, "q" * 400], "n": 2, "slow": True}))
            while not s.engine_ref.started:
                await asyncio.sleep(0.01)
            (seq,) = s.load.sequences
            stats = await s.record_routing_stats()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return seq, stats

    seq, stats = asyncio.run(go())
    assert (seq.width, seq.tokens) == (4, 50)  # 2 prompts x n 2, 200 tokens over 4 sequences
    assert stats["kv_usage"] == pytest.approx(4 * 50 / 128) and stats["waiting"] == 1


@pytest.mark.parametrize("path, body, param", [
    ("/v1/responses", {"input": "x", "prompt": "x"}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
])
def test_vllm_s_own_validators_refuse_before_the_engine(path, body, param):
    s = asyncio.run(server())
    r = call(s, "POST", path, json=body)
    assert r.status_code == 400 and openai_error(r)["param"] == param, r.text
