"""Reading what a client sent, cheaply and defensively: bounded body, JSON object, routing hint, SSE relay.

Everything a hostile client can send (huge or endless bodies, deep nesting, invalid UTF-8) ends here as an
OpenAI-shaped 4xx; nothing reaches an engine unless it is a JSON object of bounded size.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import Response

from mistral_ray.config import ServiceConfig
from mistral_ray.protocol import sse_error
from mistral_ray.router.errors import error_response
from mistral_ray.routing import RouteHint, is_follow_up, prefix_blocks, prompt_text


async def read_body(request: Request, limit: int) -> bytes | Response:
    """The body, or 413 as soon as it is known to exceed `limit` (declared or counted while reading)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> Response:
    return error_response(413, f"request body is {size} bytes or more; the limit is {limit} bytes",
                          code="request_too_large")


def parse(body: bytes) -> dict | Response:
    """The request's JSON object, or the 400 that explains why it is not one."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return error_response(400, f"request body is not valid JSON: {exc}", code="invalid_json")
    except RecursionError:
        return error_response(400, "request body is nested too deeply", code="invalid_json")
    if not isinstance(payload, dict):
        return error_response(400, "request body must be a JSON object", code="invalid_json")
    return payload


def refused(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
            retry_after_s: Optional[int] = None) -> Response:
    # Retry-After in whole seconds, as HTTP and the openai client's retry logic read it.
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return error_response(status, message, param=param, code=code, headers=headers)


def hint(cfg: ServiceConfig, route: str, payload: dict[str, Any], request: Request) -> RouteHint:
    """What the routing policy needs, taken from the body the router parsed anyway. Every field is filled
    whatever the policy, so the LLM deployment's request router can be switched without touching this."""
    routing = cfg.router.routing
    text = prompt_text(route, payload)
    user = payload.get("user")
    session = request.headers.get(routing.session_header) or (user if isinstance(user, str) else None)
    return RouteHint(prefix_blocks(text, routing.block_chars, routing.max_prefix_blocks), session, len(text),
                     is_follow_up(route, payload))


async def relay(replies: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for chunk in replies:
            yield chunk
    except asyncio.CancelledError:
        raise  # the client went away; cancelling `replies` aborts the request in the engine
    except Exception as exc:  # the replica died mid-stream: end with an error event, not a hang
        yield sse_error(503, f"the LLM replica failed mid-stream: {type(exc).__name__}")


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def check_shape(route: str, payload: dict[str, Any]) -> Optional[tuple[str, str]]:
    """The OpenAI contract's required input, checked before an engine sees it: (message, param) if broken.
    vLLM's request models let some of these through (`messages: null`, an empty list) and then fail deep in
    rendering with a server error; the client deserves a 400 naming the field."""
    if route == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages must be a non-empty array of message objects", "messages"
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                return f"messages[{i}] must be an object with a string `role`", f"messages.{i}"
        return None
    prompt = payload.get("prompt")
    ok = (isinstance(prompt, str) and prompt) or _is_token_ids(prompt) or (
        isinstance(prompt, list) and prompt and all((isinstance(p, str) and p) or _is_token_ids(p) for p in prompt))
    return None if ok else ("prompt must be a non-empty string, array of strings, or array of token ids", "prompt")
