"""Our layer around vLLM's OpenAI app, inside each LLM replica: the replica is the HTTP server HAProxy
forwards to, and this ASGI middleware is the first code a request meets.

It serves only the routes of its table (`routes.py`: anything else is 404, a WebSocket is refused); answers
/health and /ready itself; runs the checks (`checks.py`) and answers refusals; gives vLLM the
(bounded, already read) body; adds the replica header; rewrites every error body into OpenAI's shape; answers
504 when no first byte comes within `router.request_timeout_s`; and records the request metrics and the load
routing and autoscaling read. A 2xx body goes out untouched, chunk by chunk as vLLM sends it: per token it
costs one function call, and nothing holds a first token back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Awaitable, Callable, Optional

from mistral_ray.metrics import RequestMetrics
from mistral_ray.routing.ingress import PICKER_HEADER, PREDICTED_HEADER, PROMPT_HEADER
from mistral_ray.routing.prompts import body_digest
from mistral_ray.server.checks import Admitted, Checks
from mistral_ray.server.errors import REPLICA_HEADER, REQUEST_ID_HEADER, Refused, normalized, sse_error
from mistral_ray.server.fairness import TICKET
from mistral_ray.server.generation import PROMPT_IDS_SCOPE
from mistral_ray.server.load import Inflight
from mistral_ray.server.migration import MIGRATE_HEADER, RESUME_HEADER, RESUMED, TRACKED, Tracked, continuation
from mistral_ray.server.routes import Route, route_of

logger = logging.getLogger("ray.serve")
_PICKER = PICKER_HEADER.encode()
_PREDICTED = PREDICTED_HEADER.encode()
_PROMPT = PROMPT_HEADER.encode()
_REQUEST_ID = REQUEST_ID_HEADER.encode()
_MIGRATE = MIGRATE_HEADER.encode()
_RESUME = RESUME_HEADER.encode()
_NOT_SERVED = {404: "no such route on this server (see the README's route table)",
               405: "this route does not take that method"}
_USAGE = re.compile(rb'"(prompt_tokens|input_tokens|completion_tokens|output_tokens)":\s*(\d+)')
_CACHED = re.compile(rb'"cached_tokens":\s*(\d+)')


def usage_of(body: bytes) -> Optional[tuple[int, int]]:
    """(prompt, completion) tokens from the usage object in a response body or SSE event, if any."""
    at = body.rfind(b'"usage":{')
    if at < 0:
        return None
    found: dict[bytes, int] = {}
    for name, value in _USAGE.findall(body, at):
        found.setdefault(name, int(value))
    prompt = found.get(b"prompt_tokens", found.get(b"input_tokens"))
    completion = found.get(b"completion_tokens", found.get(b"output_tokens"))
    return None if prompt is None else (prompt, completion or 0)


def cached_of(body: bytes) -> Optional[int]:
    """The engine's cached prompt tokens from a usage object (prompt_tokens_details), if any."""
    at = body.rfind(b'"usage":{')
    found = _CACHED.search(body, at) if at >= 0 else None
    return int(found.group(1)) if found else None


def _path(scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _replay(body: bytes, receive):
    """A receive that hands the app the body we already read, then the client's own messages (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


class Gate:
    def __init__(self, app, checks: Checks, load: Inflight, metrics: RequestMetrics, replica_id: str,
                 ready: Callable[[], Awaitable[None]], request_timeout_s: float, ready_timeout_s: float,
                 trust_request_id: bool = False,
                 prompt_ids: Optional[Callable[[bytes, bytes], Awaitable[Optional[list]]]] = None):
        self.app, self.checks, self.load, self.metrics = app, checks, load, metrics
        self.replica_id, self.ready = replica_id, ready
        self.header = (REPLICA_HEADER.encode(), replica_id.encode())
        self.request_timeout_s, self.ready_timeout_s = request_timeout_s, ready_timeout_s
        # HAProxy sets the request id on every request (a client's own is overwritten); without HAProxy
        # a client could send one, so it is not read.
        self.trust_request_id = trust_request_id
        self.prompt_ids = prompt_ids  # kv_aware: the ids a router staged for a chat, by its key (link.py)

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "lifespan":  # vLLM's app starts its stats logging task
            return await self.app(scope, receive, send)
        if kind != "http":  # no WebSocket route is served: refused before the handshake (HTTP 403)
            return await send({"type": "websocket.close", "code": 1008})
        route, refused = route_of(scope["method"], _path(scope))
        if refused is not None:
            self.metrics.reject(route.label, "not_served")
            return await self.answer(send, refused, Refused(refused, _NOT_SERVED[refused]).body())
        if route.label == "health":
            return await self.answer(send, 200, {"status": "ok"})
        if route.label == "ready":
            return await self._ready(send)
        await self._serve(scope, receive, send, route)

    async def answer(self, send, status: int, payload, extra: list = ()) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), self.header,
            *extra]})
        await send({"type": "http.response.body", "body": body})

    async def _send_empty(self, send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": [self.header]})
        await send({"type": "http.response.body", "body": b""})

    async def _ready(self, send) -> None:
        try:
            await asyncio.wait_for(self.ready(), self.ready_timeout_s)
        except Exception as exc:
            refusal = Refused(503, f"the engine is not ready: {type(exc).__name__}", code="not_ready")
            return await self.answer(send, 503, refusal.body())
        await self.answer(send, 200, {"status": "ready", "replica": self.replica_id})

    async def _serve(self, scope, receive, send, route: Route) -> None:
        start = time.perf_counter()
        headers = dict(scope["headers"])
        request: Optional[Admitted] = None
        key_id, status, resumed = "unknown", 500, False
        self.metrics.started(route.label)
        try:
            key_id = self.checks.authenticate(route, headers)
            picker = headers.get(_PICKER)  # an authenticated request an ingress router sent here
            self.load.arrived(picker.decode("latin-1") if picker else None)
            request_id = headers.get(_REQUEST_ID) if self.trust_request_id else None
            resumed = self.trust_request_id and _RESUME in headers  # the guard's headers: HAProxy deletes a client's
            request = await self.checks.admit(route, scope["method"], headers, receive, key_id,
                                              request_id.decode("latin-1") if request_id else None,
                                              guarded=self.trust_request_id and _MIGRATE in headers, resumed=resumed)
            if request.resume is not None and request.resume.report:
                outcome, _, reason = request.resume.report.partition(":")
                self.metrics.migration(route.label, outcome, reason, model=request.model)
                status = 204
                return await self._send_empty(send)
            if request.seq is not None and request.resume is None:
                self.metrics.tier(request.tenant.tier, "admitted")
            if request.seq is not None and request.model not in (None, self.metrics.model):
                request.seq.adapter = request.model
                self.metrics.adapter_used(request.model, *self.load.used(request.model))
            predicted = headers.get(_PREDICTED) if self.trust_request_id else None  # set by our router only
            if route.label == "chat":
                await self._take_prompt_ids(scope, headers, request.received)
            status = await self._forward(scope, receive, send, request, start,
                                         int(predicted) if predicted and predicted.isdigit() else None)
        except Refused as refusal:
            status = refusal.status
            if status != 499:  # 499: the client left while sending its body, nobody to answer
                self.metrics.reject(route.label, refusal.reason)
                if refusal.reason in ("fair_share", "overload", "rate_limit") and key_id != "unknown" and not resumed:
                    self.metrics.tier(self.checks.tenant(key_id).tier, refusal.reason)
                if status == 401:
                    logger.info("refused %s %s: missing or unknown API key", scope["method"], scope["path"])
                await self.answer(send, status, refusal.body(), refusal.headers())
        except asyncio.CancelledError:  # the client disconnected: Serve cancels the request
            status = 499
            raise
        except Exception:  # our own bug before the engine: still an OpenAI body, and logged
            logger.exception("%s: the replica failed the request before the engine", route.label)
            status = 500
            await self.answer(send, 500, Refused(500, "the replica failed the request", code="internal_error").body())
        finally:
            report = request is not None and request.resume is not None and request.resume.report
            # A continuation refused here (503: the guard tries another replica, and counts what it gives up)
            if resumed and not report and status >= 400 and status not in (499, 503):
                self.metrics.migration(route.label, "failed", "refused", model=request and request.model)
            # a report is the guard's, not a client's request
            self.metrics.finished(route.label, status, key_id, request.model if request is not None else None,
                                  counted=not report)
            if request is not None:
                if request.seq is not None:
                    self.load.remove(request.seq)
                    fair = self.checks.fair
                    if fair is not None and request.seq.tag is not None and request.used is not None:
                        fair.unused(request.tenant, request.tokens - request.used)
                if request.charge and request.charge[1] and 400 <= status < 500 and status != 499:
                    # The engine refused it (prompt beyond the limit or the context): no tokens were made,
                    # but it was a request (it cost a render), so only its tokens come back.
                    self.checks.quota.refund(key_id, (0.0, request.charge[1]))

    async def _take_prompt_ids(self, scope, headers: dict[bytes, bytes], body: bytes) -> None:
        """The chat's token ids as the router computed them from this very body, for the engine to run
        (behind HAProxy only: the header is ours there)."""
        key = headers.get(_PROMPT) if self.trust_request_id and self.prompt_ids is not None else None
        if key is None:
            return
        ids = await self.prompt_ids(key, body_digest(body))
        self.metrics.prompt_forwarded("chat", ids is not None)
        if ids:
            scope[PROMPT_IDS_SCOPE] = ids

    async def _forward(self, scope, receive, send, request: Admitted, start: float,
                       predicted: Optional[int] = None) -> int:
        exchange = Exchange(self, send, request, start, predicted)
        send_out = exchange.send
        if request.route.label == "models" and len(self.checks.models) > 1:  # adapters are served
            send_out = _listing(exchange.send, lambda: self.checks.hidden(request.key_id))
        chat = request.route.label == "chat"
        if request.resume is not None:
            send_out = continuation(send_out, request.resume, chat)
            RESUMED.set(request.resume.ids)
        if request.migrate == "ok" and not (request.resume is not None and request.resume.finished):
            # The role delta opens a chat: its ids wait for the event with their text (a continuation's is dropped).
            exchange.tracked = Tracked(hold_first=chat and (request.resume is None or request.resume.events == 0))
        TRACKED.set(exchange.tracked)  # what vLLM's tasks for this request inherit
        TICKET.set(request.ticket)
        app = self.app(scope, _replay(request.body, receive) if scope["method"] == "POST" else receive, send_out)
        try:
            if request.route.generation:
                await self._bounded(app, exchange)
            else:
                await app
        except Exception:  # vLLM's app raised past its own handlers: an engine fault, never the client's
            logger.exception("%s: the engine failed the request", request.route.label)
            await exchange.fail(500, "the engine failed the request", "engine_error")
        return exchange.status

    async def _bounded(self, app: Awaitable, exchange: "Exchange") -> None:
        """Run the app; if no first byte comes within request_timeout_s, cancel it (vLLM aborts the request)."""
        task = asyncio.ensure_future(app)
        try:
            done, _ = await asyncio.wait((task, exchange.first_byte), timeout=self.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if done:
                return await task
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self.metrics.reject(exchange.request.route.label, "timeout")
            await exchange.fail(504, f"no answer from the engine within {self.request_timeout_s:g}s "
                                "(router.request_timeout_s)", "timeout")
        finally:
            if not task.done():  # the client left (Serve cancelled us): cancelling the app aborts in vLLM
                task.cancel()


def _listing(send, hidden: Callable[[], frozenset]):
    """`send` for /v1/models: the adapters this key may not use (as of the answer) left out of the list, and
    each adapter's `root` (vLLM puts the adapter's directory there) its name: no path of the server's shows."""
    start, chunks = None, []

    async def filtered(message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(chunks)
        if start["status"] == 200:
            try:
                listed, hide = json.loads(body), hidden()
                listed["data"] = [m for m in listed.get("data", []) if m.get("id") not in hide]
                for card in listed["data"]:
                    if card.get("parent"):
                        card["root"] = card["id"]
                body = json.dumps(listed).encode()
            except (ValueError, AttributeError, TypeError):  # not vLLM's model list: as it is
                pass
        headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return filtered


class Exchange:
    """One request's response on its way out: status, header, first byte, usage, error bodies."""

    def __init__(self, gate: Gate, send, request: Admitted, start: float, predicted: Optional[int] = None):
        self.gate, self._send, self.request, self.start, self.seq = gate, send, request, start, request.seq
        self.predicted = predicted  # kv_aware: the cached prompt tokens the router expected
        self.status = 500
        self.started = False  # response headers went out
        self.first_byte = asyncio.get_running_loop().create_future()
        self.held: Optional[dict] = None  # an error's start message, held until its body is complete
        self.error = b""
        self.tracked: Optional[Tracked] = None  # a stream the guard may migrate: its events carry their ids

    async def send(self, message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            if self.status >= 400:
                self.held = message
                return
            message["headers"] = [*message.get("headers", ()), self.gate.header]
            if self.request.migrate is not None:
                message["headers"].append((_MIGRATE, self.request.migrate.encode()))
            self.started = True
            return await self._send(message)
        if kind != "http.response.body":
            return await self._send(message)
        body, more = message.get("body", b""), message.get("more_body", False)
        if self.held is not None:
            self.error += body
            if not more:
                await self._error()
            return
        if body:
            if not self.first_byte.done():
                self._first()
            if self.seq is not None:
                self.seq.grow()
            if b'"usage":{' in body and (self.request.stream or not more):
                self._count(body)
                if self.request.hide_usage and b'"choices":[]' in body:
                    return  # the usage chunk we asked for; the client did not
            if self.tracked is not None:
                message = {**message, "body": self.tracked.mark(body)}
        if not more and self.status < 400 and self.request.route.generation and self.request.resume is None:
            self.gate.metrics.completed(self.request.route.label, self.request.stream,
                                        time.perf_counter() - self.start, self.request.model)
        await self._send(message)

    def _first(self) -> None:
        self.first_byte.set_result(None)
        if self.seq is not None:
            self.seq.started = True
        resume = self.request.resume
        if resume is not None:  # not a first token: the client's wait for the stream to go on
            waited = max(0.0, time.time() - resume.cut_ms / 1000) if resume.cut_ms else None
            self.gate.metrics.migration(self.request.route.label, "migrated", "", waited, self.request.model)
        elif self.request.route.generation:
            waited = time.perf_counter() - self.start
            if self.request.stream:  # a unary answer's first byte is all of it
                self.gate.metrics.first_token(self.request.route.label, waited, self.request.model)
            ticket = self.request.ticket
            self.gate.metrics.tier_waited(self.request.tenant.tier, ticket and ticket.queued_s,
                                          waited if self.request.stream else None)

    def _count(self, body: bytes) -> None:
        usage = usage_of(body)
        if usage is not None:
            self.gate.metrics.count_tokens(self.request.route.label, *usage, model=self.request.model)
            self.request.used = sum(usage)
        if self.predicted is not None:
            cached = cached_of(body)
            if cached is not None:
                self.gate.metrics.kv_prediction(self.request.route.label, self.predicted, cached)
                self.predicted = None

    async def _error(self) -> None:
        """vLLM's (or FastAPI's) error, rewritten into OpenAI's body; a 4xx here is a validation refusal."""
        status = self.status
        if 400 <= status < 500:
            self.gate.metrics.reject(self.request.route.label, "validation")
        await self.gate.answer(self._send, status, normalized(status, self.error))
        self.started = True

    async def fail(self, status: int, message: str, code: str) -> None:
        """Answer an error we found ourselves: a body if nothing went out yet, else an SSE error event."""
        if not self.started and self.held is None:
            self.status = status
            return await self.gate.answer(self._send, status, Refused(status, message, code=code).body())
        if self.started and self.request.stream:
            await self._send({"type": "http.response.body", "body": sse_error(status, message, code)})
