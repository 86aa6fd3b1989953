"""Mid-stream migration, the replica's side, without Ray: what a tracked stream's events carry, what a
continuation's request and events become, which requests cannot be continued exactly, and the gate's
contract (the guard's headers trusted only behind HAProxy, a client's resume field refused). The guard's side
is tests/unit/test_stream_guard.py; a real replica killed mid-stream is tests/integration/test_migration.py."""

import asyncio
import json

import pytest
from fastapi import Request
from fastapi.responses import StreamingResponse

from mistral_ray.server.migration import (MIGRATE_HEADER, NOT_POSSIBLE, RESUME_HEADER, RESUMED, TRACKED, BadResume,
                                          Resume, Tracked, continuation, resumed_payload)
from tests.unit.test_gate import call, server


def _event(chunk: dict) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def test_a_tracked_event_carries_the_ids_behind_its_text_and_the_role_delta_none():
    t = Tracked(hold_first=True)
    t.pending += [5, 6]  # the first output: the role delta goes out first, then the event with its text
    assert t.mark(b"data: {role}\n\n") == b"data: {role}\n\n"
    assert t.mark(b"data: {a}\n\n") == b"data: {a}\n:5 6\n\n" and t.pending == []
    assert t.mark(b"data: {b}\n\n") == b"data: {b}\n\n"  # no new ids (an event of no token): no mark
    t.pending.append(7)
    t.finished = True
    assert t.mark(b"data: {last}\n\n") == b"data: {last}\n:.7\n\n"
    assert t.mark(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"


def test_only_the_guard_s_shape_of_resume_is_read():
    r = Resume.parse({"ids": [1, 2], "id": "chatcmpl-x", "created": 7, "events": 1, "finished": False,
                      "cut_ms": 1.5})
    assert (r.ids, r.id, r.created, r.events, r.finished, r.cut_ms) == ((1, 2), "chatcmpl-x", 7, 1, False, 1.5)
    assert Resume.parse({"report": "not_possible:n"}).report == "not_possible:n"
    for bad in (None, [], {"ids": [1, "2"]}, {"ids": [-1]}, {"ids": [True]}, {"report": "anything"},
                {"events": "x"}, {"cut_ms": [1]}):
        with pytest.raises(BadResume):
            Resume.parse(bad)


def test_a_continuation_asks_for_the_tokens_left_under_the_stream_s_own_id():
    resume = Resume(ids=(1, 2, 3), id="chatcmpl-abc")
    out = resumed_payload({"max_tokens": 10, "min_tokens": 5, "x": 1}, resume, "max_tokens", 10, "rid")
    assert out == {"max_tokens": 7, "min_tokens": 2, "x": 1, "request_id": "abc"}
    out = resumed_payload({"max_tokens": 9, "max_completion_tokens": 10}, resume, "max_completion_tokens", 10, "")
    assert out == {"max_completion_tokens": 7, "request_id": "abc"}
    assert resumed_payload({}, Resume(ids=(1,)), "max_tokens", None, "rid") == {"request_id": "rid"}  # the context's rest
    finished = Resume(ids=(1, 2), finished=True)  # cut after the last token: its usage chunk is all that is left
    assert resumed_payload({"max_tokens": 50}, finished, "max_tokens", 50, "")["max_tokens"] == 1


def _sent(resume: Resume, chat: bool, events: list[bytes]) -> list[bytes]:
    out = []

    async def send(message):
        out.append(message.get("body", b""))

    rewritten = continuation(send, resume, chat)

    async def go():
        for body in events:
            await rewritten({"type": "http.response.body", "body": body, "more_body": True})

    asyncio.run(go())
    return [b for b in out if b]


ROLE = _event({"id": "chatcmpl-b", "created": 99, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                                      "content": ""}}]})
TEXT = _event({"id": "chatcmpl-b", "created": 99, "choices": [{"index": 0, "delta": {"content": "x"}}]})
USAGE = _event({"id": "chatcmpl-b", "created": 99, "choices": [], "usage": {
    "prompt_tokens": 13, "completion_tokens": 4, "total_tokens": 17, "prompt_tokens_details": {"cached_tokens": 12}}})


def test_a_continuation_s_events_continue_the_client_s_stream():
    out = _sent(Resume(ids=(1, 2, 3), created=5, events=2), True, [ROLE, TEXT, USAGE, b"data: [DONE]\n\n"])
    assert len(out) == 3 and b'"role"' not in out[0] and b'"created":5' in out[0]  # one role delta: the first part's
    usage = json.loads(out[1][6:])["usage"]
    assert usage["prompt_tokens"] == 10 and usage["completion_tokens"] == 7 and usage["total_tokens"] == 17
    assert usage["prompt_tokens_details"]["cached_tokens"] == 10
    # cut before the client got any event: the continuation's role delta is the stream's only one
    assert _sent(Resume(ids=(), events=0), True, [ROLE, TEXT])[0] == ROLE
    # cut after the last token's event: only the usage (the first part's tokens) and [DONE]
    out = _sent(Resume(ids=(1, 2, 3), events=4, finished=True), True, [ROLE, TEXT, USAGE, b"data: [DONE]\n\n"])
    assert len(out) == 2 and json.loads(out[0][6:])["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("route, payload, reason", [
    ("chat", {}, None),
    ("chat", {"temperature": 0, "seed": 3}, None),  # greedy: the seed changes nothing
    ("completions", {"prompt": [1, 2, 3]}, None),
    ("chat", {"n": 2}, "n"),
    ("completions", {"best_of": 2, "n": 1}, "n"),
    ("completions", {"prompt": ["a", "b"]}, "n"),
    ("chat", {"logprobs": True}, "logprobs"),
    ("completions", {"logprobs": 1}, "logprobs"),
    ("completions", {"echo": True}, "echo"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"response_format": {"type": "json_object"}}, "structured_output"),
    ("chat", {"structured_outputs": {"regex": "a+"}}, "structured_output"),
    ("chat", {"stop": ["\n"]}, "stop_strings"),
    ("chat", {"seed": 3}, "seeded_sampling"),
    ("chat", {"frequency_penalty": 0.5}, "penalties"),
    ("completions", {"presence_penalty": 0.5}, "penalties"),
    ("chat", {"bad_words": ["x"]}, "bad_words"),
    ("chat", {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}, "continuous_usage"),
    ("chat", {"truncate_prompt_tokens": 5}, "prompt_truncation"),
    ("responses", {}, "route"),
])
def test_what_a_continuation_cannot_reproduce_is_named(route, payload, reason):
    from mistral_ray.engine.migration import not_migratable

    base = {"model": "m", "stream": True, **({"messages": [{"role": "user", "content": "hi"}]} if route == "chat"
                                               else {"prompt": "hi"})}
    assert not_migratable(route, {**base, **payload}) == reason
    assert reason is None or reason in NOT_POSSIBLE


def test_a_parser_that_holds_content_back_makes_chat_streams_not_migratable():
    from types import SimpleNamespace

    from mistral_ray.engine.migration import not_migratable, parser_holds_text

    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert not_migratable("chat", chat, parser_holds_text=True) == "parser"
    holds = lambda **args: parser_holds_text(SimpleNamespace(**args))  # noqa: E731
    assert holds(reasoning_parser="deepseek_r1") and holds(tool_call_parser="mistral")  # its parser engine buffers
    assert not holds(tool_call_parser="pythonic") and not holds()  # deployments/local-cpu.yaml's: passes text on


# The gate, with a stand-in of vLLM's chat serving that feeds the tracked stream as the engine would.
class TrackingEngine:
    def __init__(self):
        from tests.unit.test_gate import FakeEngine

        self.inner, self.resumed = FakeEngine(), []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def not_migratable(self, route, payload):
        from mistral_ray.engine.migration import not_migratable

        return not_migratable(route, payload)

    def build_app(self):
        app = self.inner.build_app()
        app.router.routes = [r for r in app.router.routes if getattr(r, "path", "") != "/v1/chat/completions"]

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.resumed.append((RESUMED.get(), body))

            async def events():
                tracked = TRACKED.get()
                yield 'data: {"id":"chatcmpl-b","created":99,"choices":[{"delta":{"role":"assistant"}}]}\n\n'
                for i in range(2):
                    if tracked is not None:
                        tracked.pending.append(100 + i)
                        tracked.finished = i == 1
                    yield f'data: {{"id":"chatcmpl-b","created":99,"choices":[{{"delta":{{"content":"{i}"}}}}]}}\n\n'
                yield ('data: {"id":"chatcmpl-b","created":99,"choices":[],"usage":{"prompt_tokens":9,'
                       '"completion_tokens":2,"total_tokens":11}}\n\n')
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        return app


CHAT = {"model": "tiny-mistral", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 8}


def test_a_guarded_stream_is_tracked_and_says_so_to_the_guard():
    engine = TrackingEngine()
    s = asyncio.run(server(engine=engine))
    gate = s.gate()
    gate.trust_request_id = True  # behind HAProxy
    r = _post(gate, CHAT, {MIGRATE_HEADER: "1"})
    assert r.headers[MIGRATE_HEADER] == "ok"
    events = r.content.split(b"\n\n")
    assert events[1].endswith(b"\n:100") and events[2].endswith(b"\n:.101")  # each text event, its ids
    r = _post(gate, {**CHAT, "n": 2}, {MIGRATE_HEADER: "1"})
    assert r.headers[MIGRATE_HEADER] == "n" and b"\n:" not in r.content
    r = _post(gate, CHAT, {})  # not relayed by the guard: nothing to mark
    assert MIGRATE_HEADER not in r.headers and b"\n:" not in r.content


def test_a_continuation_runs_the_first_part_s_ids_and_continues_its_stream():
    engine = TrackingEngine()
    s = asyncio.run(server(engine=engine))
    gate = s.gate()
    gate.trust_request_id = True
    resume = {"ids": [7, 8, 9], "id": "chatcmpl-first", "created": 5, "events": 3, "cut_ms": 10}
    r = _post(gate, {**CHAT, "mistral_ray_resume": resume}, {MIGRATE_HEADER: "1", RESUME_HEADER: "1"})
    assert r.status_code == 200
    ids, body = engine.resumed[-1]
    assert ids == (7, 8, 9) and body["max_tokens"] == 5 and body["request_id"] == "first"
    assert "mistral_ray_resume" not in body
    assert b'"role"' not in r.content and b'"created":99' not in r.content and b'"created":5' in r.content
    assert ("ttft", "chat") not in s.metrics.calls  # a continuation's first event is not a first token


def test_a_continuation_of_a_request_without_max_tokens_gets_what_is_left_of_the_engine_s_default():
    engine = TrackingEngine()
    engine.info = lambda: {**engine.inner.info(), "default_max_tokens": 20}  # the model's generation config
    s = asyncio.run(server(engine=engine))
    gate = s.gate()
    gate.trust_request_id = True
    body = {k: v for k, v in CHAT.items() if k != "max_tokens"}
    resume = {"ids": [7, 8, 9], "events": 3}
    assert _post(gate, {**body, "mistral_ray_resume": resume}, {MIGRATE_HEADER: "1", RESUME_HEADER: "1"}).status_code == 200
    assert engine.resumed[-1][1]["max_tokens"] == 17


def test_a_client_cannot_resume_a_stream():
    engine = TrackingEngine()
    s = asyncio.run(server(engine=engine))
    body = {**CHAT, "mistral_ray_resume": {"ids": [1]}}
    gate = s.gate()
    gate.trust_request_id = False  # not behind HAProxy: the guard's header is not trusted
    r = _post(gate, body, {RESUME_HEADER: "1"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "mistral_ray_resume"
    gate.trust_request_id = True  # behind HAProxy, without the guard's header (HAProxy deletes a client's)
    r = _post(gate, body, {})
    assert r.status_code == 400 and engine.resumed == []


def test_the_guard_s_report_is_counted_and_answered_without_the_engine():
    engine = TrackingEngine()
    s = asyncio.run(server(engine=engine))
    counted = []
    s.metrics.migration = lambda route, outcome, reason, waited=None, model=None: counted.append(
        (route, outcome, reason))
    gate = s.gate()
    gate.trust_request_id = True
    r = _post(gate, {**CHAT, "mistral_ray_resume": {"report": "not_possible:n"}}, {RESUME_HEADER: "1"})
    assert r.status_code == 204 and counted == [("chat", "not_possible", "n")] and engine.resumed == []
    assert not [c for c in s.metrics.calls if c[0] == "finished"]  # not a client's request
    assert s.metrics._in_flight["chat"] == 0
    r = _post(gate, {**CHAT, "stream": False, "mistral_ray_resume": {"report": "not_possible:route"}},
              {RESUME_HEADER: "1"})
    assert r.status_code == 204 and counted[-1] == ("chat", "not_possible", "route")


def test_a_continuation_s_ids_stop_before_a_character_the_client_did_not_get():
    from mistral_ray.engine.migration import printed

    class Bytes:  # a byte-level tokenizer: ids are UTF-8 bytes
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    text = "a\u4e2d".encode()  # "a", then a 3-byte character
    assert printed(Bytes(), tuple(text)) == tuple(text)
    assert printed(Bytes(), tuple(text[:-1])) == tuple(text[:1])  # its first two bytes: held, made again
    assert printed(Bytes(), ()) == ()


def test_a_refused_continuation_is_counted_by_the_replica_that_refused_it():
    engine = TrackingEngine()
    s = asyncio.run(server(engine=engine))
    counted = []
    s.metrics.migration = lambda route, outcome, reason, waited=None, model=None: counted.append((outcome, reason))
    gate = s.gate()
    gate.trust_request_id = True
    bad = {**CHAT, "messages": [], "mistral_ray_resume": {"ids": [1]}}  # refused by the checks (400)
    assert _post(gate, bad, {MIGRATE_HEADER: "1", RESUME_HEADER: "1"}).status_code == 400
    assert counted == [("failed", "refused")]


def _post(gate, body: dict, headers: dict):
    import httpx

    async def go():
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            return await client.post("/v1/chat/completions", json=body, headers=headers)

    return asyncio.run(go())
