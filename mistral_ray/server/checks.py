"""The checks a request passes before the engine, as one flat pipeline: key, size, JSON, model, shape,
limits, room, rate. Each check passes or raises `Refused`; the gate answers every refusal in one place.

Everything a hostile client can send (huge or endless bodies, deep nesting, invalid UTF-8, wrong shapes)
ends here as an OpenAI-shaped 4xx; vLLM only sees JSON objects of bounded size that name our model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

from mistral_ray.config import ServiceConfig
from mistral_ray.routing.hint import prompt_text
from mistral_ray.server.auth import ApiKeys
from mistral_ray.server.errors import Refused
from mistral_ray.server.limits import check_sizes, requested_tokens
from mistral_ray.server.quota import Charge, Quota

# Routes whose JSON body we read, by path, with the label metrics use.
JSON_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses",
               "/tokenize": "tokenize", "/detokenize": "detokenize"}
GENERATION = ("chat", "completions", "responses")
# Open without a key, as probes and load balancers call them.
OPEN_PATHS = frozenset({"/health", "/ready", "/ping", "/version"})


@dataclass
class Admitted:
    """A request that passed every check, with what the gate needs to forward and account for it."""

    route: str
    key_id: str
    body: bytes
    stream: bool = False
    prompt_chars: int = 0
    charge: Optional[Charge] = None
    hide_usage: bool = False  # we asked vLLM for the stream's usage chunk; the client did not


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def check_shape(route: str, payload: dict[str, Any]) -> None:
    """The OpenAI contract's required input, checked before vLLM sees it: vLLM's request models let some of
    these through (`messages: null`, an empty list) and then fail deep in rendering with a server error."""
    if route == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Refused(400, "messages must be a non-empty array of message objects", param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise Refused(400, f"messages[{i}] must be an object with a string `role`", param=f"messages.{i}")
    elif route == "completions":
        prompt = payload.get("prompt")
        ok = (isinstance(prompt, str) and prompt) or _is_token_ids(prompt) or (
            isinstance(prompt, list) and prompt and all((isinstance(p, str) and p) or _is_token_ids(p)
                                                        for p in prompt))
        if not ok:
            raise Refused(400, "prompt must be a non-empty string, array of strings, or array of token ids",
                          param="prompt")


def parse(body: bytes) -> dict[str, Any]:
    """The request's JSON object, or the 400 that explains why it is not one."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refused(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise Refused(400, "request body is nested too deeply", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise Refused(400, "request body must be a JSON object", code="invalid_json")
    return payload


class Checks:
    def __init__(self, cfg: ServiceConfig, keys: Optional[ApiKeys], quota: Optional[Quota],
                 has_room: Callable[[], bool]):
        self.cfg, self.keys, self.quota, self.has_room = cfg, keys, quota, has_room
        self.limits = cfg.router.limits

    def authenticate(self, path: str, headers: dict[bytes, bytes]) -> str:
        """The caller's key id ("none" with keys off or on an open path)."""
        if self.keys is None or path in OPEN_PATHS:
            return "none"
        auth = headers.get(b"authorization")
        key_id = self.keys.identify(auth.decode("latin-1") if auth else None)
        if key_id is None:
            raise Refused(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                          code="invalid_api_key", reason="auth")
        return key_id

    async def read_body(self, receive, headers: dict[bytes, bytes]) -> bytes:
        """The body, or 413 as soon as it is known to exceed the limit (declared or counted while reading)."""
        limit = self.limits.max_body_bytes
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            raise self._too_large(int(declared))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Refused(499, "client went away", reason="validation")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise self._too_large(size)
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _too_large(self, size: int) -> Refused:
        return Refused(413, f"request body is {size} bytes or more; the limit is {self.limits.max_body_bytes} "
                       "bytes", code="request_too_large", reason="too_large")

    def check_model(self, payload: dict[str, Any]) -> None:
        model = payload.get("model")
        if model is not None and model != self.cfg.model.name:
            raise Refused(404, f"The model `{model}` does not exist.", param="model", code="model_not_found",
                          reason="model_not_found")

    async def admit(self, route: str, method: str, headers: dict[bytes, bytes], receive, key_id: str) -> Admitted:
        """Everything after the key, in order; the admitted request, or Refused."""
        if method != "POST":
            return Admitted(route, key_id, b"")
        body = await self.read_body(receive, headers)
        if route == "other":
            return Admitted(route, key_id, body)
        payload = parse(body)
        self.check_model(payload)
        check_shape(route, payload)
        if route not in GENERATION:
            return Admitted(route, key_id, body)
        check_sizes(payload, self.limits.max_tokens, self.limits.max_n)
        if not self.has_room():
            raise Refused(503, "this replica is at capacity; retry later", code="overloaded", retry_after_s=1,
                          reason="overload")
        request = Admitted(route, key_id, body, stream=payload.get("stream") is True,
                           prompt_chars=len(prompt_text(route, payload)))
        if self.quota is not None:
            request.charge = await self.quota.admit(key_id, requested_tokens(
                payload, request.prompt_chars, self.cfg.router.routing.chars_per_token,
                self.cfg.engine.max_model_len or 0))
        options = payload.get("stream_options")
        if request.stream and route != "responses" and (options is None or (
                isinstance(options, dict) and options.get("include_usage") is not True)):
            # vLLM's final usage chunk is how the replica counts a stream's tokens; the client never sees it.
            payload["stream_options"] = {**(options or {}), "include_usage": True}
            request.body, request.hide_usage = json.dumps(payload).encode(), True
        return request
