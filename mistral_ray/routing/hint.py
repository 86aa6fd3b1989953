"""What a routing policy learns from a request: its prompt's prefix digests, its session, its size.

Pure functions of the request body (as HAProxy hands it to the ingress router) and the session header; the
replicas use `prompt_text` too, to estimate a request's tokens before the engine has tokenized it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# The OpenAI routes whose prompt we can read, by path.
PROMPT_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses"}


@dataclass(frozen=True)
class RouteHint:
    """What the ingress router learned about a request, for the routing policy."""

    prefix: tuple[bytes, ...] = ()  # chained digests of the prompt's leading fixed-size blocks
    session: Optional[str] = None
    prompt_chars: int = 0
    follow_up: bool = True  # False for a chat's first request: nothing of its own can be cached yet
    picker: Optional[str] = None  # the ingress router that picks (its picks count as load until reported)
    tokens: tuple[int, ...] = ()  # kv_aware: the prompt's token ids as the engine will see them
    sendable: bool = False  # kv_aware: a chat whose `tokens` may replace its messages at the engine
    adapter: Optional[str] = None  # the LoRA adapter the request names as its `model` (None: the base model)
    # kv_aware fills this while ranking: replica -> prompt tokens its engine would reuse (the ingress router
    # tells the chosen replica, which compares it with the engine's own count).
    predicted: dict = field(default_factory=dict, compare=False, hash=False)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts, Responses input items, or a token-id prompt
        return "".join(_text(v.get("text") or v.get("content")) if isinstance(v, dict) else
                       (str(v) + " " if isinstance(v, (int, float)) else "") for v in value)
    return ""


def _items(value: Any) -> list:
    return value if isinstance(value, list) else []


def prompt_text(route: str, payload: dict[str, Any]) -> str:
    """The text a prompt's KV cache is keyed by: chat messages in order (role and content; Anthropic's
    Messages API's system prompt first), the Responses API's instructions and input, or the completion
    prompt. Any shape of body gives a string (the router reads bodies no check has seen yet)."""
    if route in ("chat", "messages"):
        system = _text(payload.get("system")) if route == "messages" else ""
        return system + "".join(f"{m.get('role')}\x00{_text(m.get('content'))}\x00"
                                for m in _items(payload.get("messages")) if isinstance(m, dict))
    if route == "responses":
        return _text(payload.get("instructions")) + _text(payload.get("input"))
    return _text(payload.get("prompt"))


def is_follow_up(route: str, payload: dict[str, Any]) -> bool:
    """Does the prompt carry an earlier answer (a chat with an assistant or tool message)? Other routes have
    no turns to tell, so they count as follow-ups (routed by their prefix)."""
    if route != "chat":
        return True
    return any(isinstance(m, dict) and m.get("role") in ("assistant", "tool") for m in _items(payload.get("messages")))


def prefix_blocks(text: str, block_chars: int, max_blocks: int, adapter: Optional[str] = None) -> tuple[bytes, ...]:
    """Chained digests of the text's whole leading blocks: block i's digest covers blocks 0..i, so equal
    digests mean equal prefixes (as vLLM's block hashes do, in characters since the router has no tokenizer).
    An adapter's blocks chain from its name: its KV is its own (vLLM hashes the adapter into its blocks too)."""
    digests: list[bytes] = []
    previous = hashlib.blake2b(adapter.encode("utf-8", "surrogatepass"), digest_size=8).digest() if adapter else b""
    data = text.encode("utf-8", "surrogatepass")
    for i in range(min(len(data) // block_chars, max_blocks)):
        previous = hashlib.blake2b(previous + data[i * block_chars:(i + 1) * block_chars], digest_size=8).digest()
        digests.append(previous)
    return tuple(digests)


def parse_object(body: bytes) -> Optional[dict[str, Any]]:
    """The body's JSON object, or None (empty, truncated, not JSON, not an object)."""
    if not body:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


# The chat request fields vLLM's renderer does not read (sampling, output, accounting), and the rendering
# switches at their defaults: a chat with any other field is not sent ahead, since the router may not render
# it as vLLM does (tools, documents, a template or its kwargs, reasoning_effort, response_format, media,
# truncation, echo, a cache salt, ...).
SENDABLE_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "min_tokens", "n", "stream", "stream_options",
    "stop", "stop_token_ids", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "length_penalty", "logit_bias", "logprobs", "top_logprobs",
    "ignore_eos", "user", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "request_id", "priority", "store", "metadata", "service_tier", "return_token_ids"})
RENDER_DEFAULTS = {"add_generation_prompt": True, "continue_final_message": False, "add_special_tokens": False}
# What a replica's engine renders and the router must render alike before it sends it any ids: a system
# prompt, a finished turn, a new turn (the replica reports vLLM's ids for it, `engine/vllm_engine.py`).
PROBE_CHAT = ({"role": "system", "content": "You answer briefly."},
              {"role": "user", "content": "What is a sliding window?"},
              {"role": "assistant", "content": "The last W tokens each token attends to."},
              {"role": "user", "content": "And a block?"})
_BILLING_HEADER = "x-anthropic-billing-header"  # vLLM strips this line from system text


def _plain_message(i: int, m: Any) -> bool:
    """A message vLLM renders as the router does: string content, a system prompt only first (vLLM merges
    system messages and turns `developer` into `system` when the template has no such role)."""
    if not isinstance(m, dict) or set(m) - {"role", "content"} or not isinstance(m.get("content"), str):
        return False
    role = m.get("role")
    if role == "system":
        return i == 0 and not m["content"].startswith(_BILLING_HEADER)
    return role in ("user", "assistant")


def sendable(payload: dict[str, Any]) -> bool:
    """Whether a chat's ids may replace its messages at the engine: no field the renderer reads but the
    messages, the switches at their defaults (as JSON booleans: vLLM reads "false" as False), plain messages."""
    for key, value in payload.items():
        if key in RENDER_DEFAULTS:
            if value is not None and value is not RENDER_DEFAULTS[key]:
                return False
        elif value is not None and key not in SENDABLE_FIELDS:
            return False
    messages = payload.get("messages")
    return isinstance(messages, list) and bool(messages) and all(_plain_message(i, m) for i, m in enumerate(messages))


Tokenize = Callable[[str, dict], Optional[tuple[int, ...]]]


def hint_from_body(body: bytes, session: Optional[str], block_chars: int, max_blocks: int,
                   picker: Optional[str] = None, tokenize: Optional[Tokenize] = None,
                   base_model: Optional[str] = None) -> RouteHint:
    """The routing hint of a request. A body that is missing, truncated, unparsable or of a shape no check
    has refused yet gives a hint with no prefix: the policy then goes by load (and the session header).
    `tokenize` (kv_aware's `PromptTokens.of`) adds the prompt's token ids when it can tell them.
    `base_model` (set when the app serves LoRA adapters): a `model` other than it names an adapter."""
    try:
        return _hint(body, session, block_chars, max_blocks, picker, tokenize, base_model)
    except (RecursionError, ValueError, TypeError, AttributeError):
        return RouteHint(session=session, picker=picker)


def _hint(body: bytes, session: Optional[str], block_chars: int, max_blocks: int,
          picker: Optional[str], tokenize: Optional[Tokenize] = None, base_model: Optional[str] = None) -> RouteHint:
    payload = parse_object(body)
    route = route_of(payload)
    model = payload.get("model") if payload is not None else None
    adapter = model if base_model and isinstance(model, str) and model != base_model else None
    if payload is None or route is None:
        return RouteHint(session=session, picker=picker, adapter=adapter)
    user = payload.get("user")
    text = prompt_text(route, payload)
    tokens = None
    # An adapter's KV blocks are hashed with its name and path as extra keys, which the router does not
    # compute: kv_aware ranks adapter requests by the text prefix (chained from the adapter) instead.
    if tokenize is not None and adapter is None:
        try:
            tokens = tokenize(route, payload)
        except Exception:  # a template or tokenizer error on a body no check has seen: the text prefix decides
            tokens = None
    return RouteHint(prefix_blocks(text, block_chars, max_blocks, adapter),
                     session or (user if isinstance(user, str) else None), len(text),
                     is_follow_up(route, payload), picker, tokens or (),
                     bool(tokens) and route == "chat" and sendable(payload), adapter)


def route_of(payload: Optional[dict[str, Any]]) -> Optional[str]:
    """HAProxy hands the router the body, not the path: tell the route by the body's fields."""
    if payload is None:
        return None
    if "messages" in payload:
        return "chat"
    if "input" in payload:
        return "responses"
    return "completions" if "prompt" in payload else None
