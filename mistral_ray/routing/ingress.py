"""The ingress router: HAProxy asks it once per request which LLM replica gets the request.

HAProxy's Lua action (Ray's `ingress_request_router.lua.tmpl`) POSTs the request's body (up to
`routing.route_body_bytes`, only when the policy needs it) and the session header to `/internal/route`; we
answer `{"replica_id": ...}` plus a header HAProxy adds to the forwarded request, naming us as the picker, so
the replica can report how many of our picks it has received. HAProxy then forwards the client's request
straight to that replica's own HTTP port: no token ever passes through here. A plain ASGI app (no FastAPI):
it sits on every request's path.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Optional

from ray import serve
from ray.serve.handle import DeploymentHandle

from mistral_ray.config import ServiceConfig
from mistral_ray.listeners import bind_replica_grpc_to_node
from mistral_ray.metrics import RouteLatency
from mistral_ray.routing.hint import hint_from_body
from mistral_ray.routing.policies import KV_EVENTS
from mistral_ray.routing.prompts import body_digest

logger = logging.getLogger("ray.serve")
# HAProxy strips client-sent headers with Serve's router prefix and applies the ones we return.
PICKER_HEADER = "x-serve-router-mistral-ray-picker"
# kv_aware: the prompt tokens the router predicted the chosen replica's engine would reuse.
PREDICTED_HEADER = "x-serve-router-mistral-ray-predicted-cached"
# kv_aware: the key under which the router staged a chat's prompt token ids at the chosen replica (link.py).
PROMPT_HEADER = "x-serve-router-mistral-ray-prompt"
TRUNCATED_HEADER = b"x-body-truncated"


async def _read(receive, limit: int) -> Optional[bytes]:
    """The body HAProxy sent, or None past `limit` (HAProxy sends at most routing.route_body_bytes: more
    comes from someone else, and is not held in memory)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _answer(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class IngressRouter:
    """One replica per proxy node (Serve places them); the policy's state lives in its Serve request router."""

    def __init__(self, llm: DeploymentHandle, cfg: ServiceConfig):
        bind_replica_grpc_to_node()
        self.llm = llm
        self.routing = cfg.router.routing
        self.session_header = self.routing.session_header.lower().encode()
        self.picker = serve.get_replica_context().replica_id.unique_id
        self.metrics = RouteLatency(serve.get_replica_context().app_name, self.routing.policy,
                                      enabled=cfg.observability.request_metrics)
        self.tokens = self.prompts = None
        self.base_model = cfg.model.name if cfg.engine.lora is not None else None  # adapters may be asked for
        if self.routing.policy == "kv_aware":
            from mistral_ray.routing.prompts import PromptSender
            from mistral_ray.routing.tokens import PromptTokens

            self.tokens = PromptTokens(cfg.model.resolved_source(), cfg.engine.chat_template,
                                       tokenizer_mode=cfg.engine.tokenizer_mode, revision=cfg.model.revision)
            self.tokens.preload()
            self.prompts = PromptSender()
        llm._init()  # start the handle's request router now, not on the first request

    def __del__(self):
        if getattr(self, "prompts", None) is not None:
            self.prompts.close()

    async def __serve_build_asgi_app__(self):
        async def app(scope, receive, send):  # a plain function: uvicorn would take a bound method for ASGI2
            await self.serve_http(scope, receive, send)

        return app

    async def serve_http(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["path"] == "/internal/route" and scope["method"] == "POST":
            return await self.route(scope, receive, send)
        if scope["path"] == "/health":
            return await _answer(send, 200, {"status": "ok"})
        await _answer(send, 404, {"detail": "not found"})

    async def route(self, scope, receive, send) -> None:
        start = time.perf_counter()
        body = await _read(receive, self.routing.route_body_bytes)
        if body is None:
            return await _answer(send, 413, {"detail": "body beyond routing.route_body_bytes"})
        headers = dict(scope["headers"])
        session = headers.get(self.session_header)
        # A truncated body is not JSON: route it by load (and session header), as an unparsable one.
        hint = hint_from_body(b"" if TRUNCATED_HEADER in headers else body,
                              session.decode("latin-1") if session else None,
                              self.routing.block_chars, self.routing.max_prefix_blocks, self.picker,
                              self.tokens.of if self.tokens is not None else None, self.base_model)
        # While Serve knows no replica this waits for one; HAProxy gives up after its router timeout (5 s)
        # and answers 503. (HAProxy only asks while it lists replicas: an app at zero replicas goes to Serve's
        # fallback proxy, which waits for the cold start.)
        try:
            async with self.llm.choose_replica(hint, _reserve=False) as selection:
                replica = selection._replica
        except Exception as exc:  # the deployment failed or went away: HAProxy answers 503
            logger.warning("ingress router: no replica picked: %s: %s", type(exc).__name__, exc)
            return await _answer(send, 503, {"detail": f"no replica: {type(exc).__name__}"})
        host, port = replica.backend_http_endpoint or ("", 0)
        headers = {PICKER_HEADER: self.picker}
        predicted = hint.predicted.get(replica.replica_id.unique_id)
        if predicted is not None:
            headers[PREDICTED_HEADER] = str(predicted)
        if hint.sendable and self.prompts is not None:  # the engine need not tokenize the chat again
            source = (replica.routing_stats or {}).get(KV_EVENTS) or {}
            if source.get("prompts") and self.tokens.agrees(source.get("probe")):
                key = self.prompts.send(source["prompts"], hint.tokens, body_digest(body))
                if key is not None:
                    headers[PROMPT_HEADER] = key
        await _answer(send, 200, {"replica_id": replica.replica_id.to_full_id_str(), "host": host, "port": port,
                                  "request_headers": headers})
        self.metrics.answered(time.perf_counter() - start)


def deployment(cfg: ServiceConfig):
    from mistral_ray.options import ingress_router_options

    return serve.deployment(serve.ingress()(IngressRouter)).options(**ingress_router_options(cfg))
