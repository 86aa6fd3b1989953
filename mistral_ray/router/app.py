"""The router deployment: Serve's HTTP ingress for the OpenAI API.

Per request it parses only what it needs (is it a JSON object, which model, does it stream), forwards the
raw body to an LLM replica picked by Serve's request router, and relays the replica's bytes unchanged —
SSE chunks go out as they arrive, with no batching timer in front of the first token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from mistral_ray.config import LLM_DEPLOYMENT, ServiceConfig
from mistral_ray.metrics import RouterMetrics
from mistral_ray.protocol import REPLICA_HEADER, SSE_MEDIA_TYPE, Head
from mistral_ray.router import errors
from mistral_ray.router.auth import ApiKeys
from mistral_ray.router.errors import error_response
from mistral_ray.router.intake import check_shape, hint, parse, read_body, refused, relay
from mistral_ray.router.limits import RateLimiter, Refusal, check_sizes, requested_tokens
from mistral_ray.routing import RouteHint

logger = logging.getLogger("ray.serve")
api = FastAPI(title="mistral-ray", description="OpenAI-compatible API for Mistral on Ray Serve")
errors.install(api)


# A replica that died (node preempted, actor killed) before answering: nothing reached the client yet, and
# generation is idempotent for the client (a new sample), so the request is sent once more, elsewhere.
_REPLICA_LOST = (RayActorError, ActorUnavailableError)


def _overloaded(message: str) -> Refusal:
    return Refusal(503, f"{message}; retry later", code="overloaded", retry_after_s=1, reason="overload")


# Helpers stay above the class: Serve pickles the ingress class with the globals defined before it.
@serve.ingress(api)
class Router:
    """The OpenAI front door: one per node or more, scaled apart from the GPU replicas."""

    def __init__(self, llm: DeploymentHandle, cfg: ServiceConfig):
        self.cfg = cfg
        self.llm = llm
        self.llm_stream = llm.options(stream=True)
        self.created = int(time.time())
        self.metrics = RouterMetrics(cfg.model.name, enabled=cfg.observability.router_metrics)
        app_name = serve.get_replica_context().app_name
        self.metrics.configured(app_name, LLM_DEPLOYMENT, cfg.scaling.max_replicas)
        keys = cfg.router.api_keys
        self.keys = ApiKeys(keys.read_entries()) if keys.enabled else None
        limits = cfg.router.limits
        self.rate = RateLimiter(limits.requests_per_minute, limits.tokens_per_minute)
        self.waiting = 0  # requests here without a first byte from a replica yet (bounded)

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self) -> Response:
        try:
            replica = await asyncio.wait_for(self.llm.ready.remote(), self.cfg.router.ready_timeout_s)
        except Exception as exc:
            return error_response(503, f"no LLM replica is ready: {type(exc).__name__}", code="not_ready")
        return JSONResponse({"status": "ready", "replica": replica})

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        key_id = self._authenticate("models", request)
        if isinstance(key_id, Response):
            return key_id
        m = self.cfg.model
        card = {
            "id": m.name,
            "object": "model",
            "created": self.created,
            "owned_by": "mistral-ray",
            "root": m.source,
            "parent": None,
            "max_model_len": self.cfg.engine.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._forward("chat", request)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._forward("completions", request)

    def _authenticate(self, route: str, request: Request) -> str | Response:
        """The caller's key id ("none" when keys are off), or the 401 to send."""
        if self.keys is None:
            return "none"
        key_id = self.keys.identify(request.headers.get("authorization"))
        if key_id is None:
            self.metrics.reject(route, "auth")
            logger.info("rejected %s %s: missing or unknown API key", request.method, request.url.path)
            return error_response(
                401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.", code="invalid_api_key"
            )
        return key_id

    async def _forward(self, route: str, request: Request) -> Response:
        start = time.perf_counter()
        self.metrics.started(route)
        key_id = self._authenticate(route, request)
        if isinstance(key_id, Response):
            self.metrics.finished(route, 401, "unknown")
            return key_id
        response = await self._answer(route, request, start, key_id)
        if not isinstance(response, StreamingResponse):  # streams are accounted for when they end
            self.metrics.finished(route, response.status_code, key_id)
            if self.keys is not None:
                logger.info("%s key=%s status=%d", route, key_id, response.status_code)
        return response

    async def _answer(self, route: str, request: Request, start: float, key_id: str) -> Response:
        cfg, r = self.cfg, self.cfg.router
        body = await read_body(request, r.limits.max_body_bytes)
        if isinstance(body, Response):
            self.metrics.reject(route, "too_large")
            return body
        payload = parse(body)
        if isinstance(payload, Response):
            self.metrics.reject(route, "validation")
            return payload
        model = payload.get("model")
        if model is not None and model != cfg.model.name:
            self.metrics.reject(route, "model_not_found")
            return error_response(
                404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
            )
        broken = check_shape(route, payload)
        if broken is not None:
            self.metrics.reject(route, "validation")
            return error_response(400, broken[0], param=broken[1])
        refusal = check_sizes(payload, r.limits.max_tokens, r.limits.max_n)
        route_hint = hint(cfg, route, payload, request)
        if refusal is None and self.rate.enabled:
            tokens = requested_tokens(payload, route_hint.prompt_chars, r.routing.chars_per_token,
                                      cfg.engine.max_model_len or 0)
            refusal = self.rate.admit(key_id, tokens)
        if refusal is None and self.waiting >= r.max_queued_requests:
            refusal = _overloaded(f"the server is at capacity ({r.max_queued_requests} requests waiting)")
        if refusal is not None:
            self.metrics.reject(route, refusal.reason)
            return refused(refusal.status, refusal.message, refusal.param, refusal.code, refusal.retry_after_s)
        self.waiting += 1
        try:
            # Waits while no replica is ready (cold start, scale from zero) or all are full, but not forever.
            head, replies, content = await asyncio.wait_for(self._dispatch(route, body, route_hint),
                                                            r.request_timeout_s)
        except asyncio.TimeoutError:
            self.metrics.reject(route, "timeout")
            return error_response(504, f"no answer from an LLM replica within {r.request_timeout_s:g}s "
                                  "(router.request_timeout_s)", code="timeout")
        except BackPressureError as exc:
            self.metrics.reject(route, "overload")
            return refused(503, f"the LLM replicas are at capacity: {exc}", code="overloaded", retry_after_s=1)
        except Exception as exc:
            self.metrics.reject(route, "no_replica")
            return error_response(503, f"no LLM replica could take the request: {type(exc).__name__}: {exc}")
        finally:
            self.waiting -= 1
        headers = {REPLICA_HEADER: head.replica_id}
        if content is not None:
            if head.status == 200:
                elapsed = time.perf_counter() - start
                self.metrics.first_byte(route, False, elapsed)
                self.metrics.completed(route, False, elapsed)
            elif 400 <= head.status < 500:
                self.metrics.reject(route, "validation")
            return Response(content, status_code=head.status, media_type="application/json", headers=headers)
        return StreamingResponse(
            self._timed(route, start, key_id, relay(replies)), media_type=SSE_MEDIA_TYPE, headers=headers
        )

    async def _dispatch(self, route: str, body: bytes, route_hint: RouteHint):
        """(head, replies, whole body for unary answers) from one replica; if that replica dies before
        anything was sent to the client, once more on another (Serve has stopped routing to the dead one)."""
        for attempt in (1, 2):
            replies = self.llm_stream.generate.remote(route, body, route_hint)
            try:
                head: Head = await replies.__anext__()
                content = None if head.stream else "".join([chunk async for chunk in replies])
                return head, replies, content
            except asyncio.CancelledError:
                replies.cancel()  # timed out or the client left: free the engine too
                raise
            except _REPLICA_LOST as exc:
                if attempt == 2:
                    raise
                self.metrics.retried(route)
                logger.warning("%s: replica lost before answering (%s); retrying on another", route,
                               type(exc).__name__)

    async def _timed(self, route: str, start: float, key_id: str, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        first, complete = True, False
        try:
            async for chunk in chunks:
                yield chunk
                if first:
                    self.metrics.first_byte(route, True, time.perf_counter() - start)
                    first = False
            complete = True
            self.metrics.completed(route, True, time.perf_counter() - start)
        finally:
            # A stream that ended early (client gone, replica lost) has already sent 200.
            self.metrics.finished(route, 200 if complete else 499, key_id)
            if self.keys is not None:
                logger.info("%s key=%s status=%d (stream)", route, key_id, 200 if complete else 499)


def deployment(cfg: ServiceConfig):
    return serve.deployment(Router).options(**cfg.router_deployment_options())
