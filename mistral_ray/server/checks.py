"""The checks a request passes before the engine, as one flat pipeline: route, key, size, JSON, model,
shape, the request as the engine reads it, limits, room, rate. Each check passes or raises `Refused`; the
gate answers every refusal in one place.

Everything a hostile client can send (huge or endless bodies, deep nesting, invalid UTF-8, wrong shapes,
numbers as strings) ends here as an OpenAI-shaped 4xx; vLLM only sees JSON objects of bounded size that
name our model, on a route of the table (`routes.py`). The limits are judged on the request as vLLM's own
request models read it (`Generation`, from the engine's reader), so no encoding of a number passes them;
the engine enforces `max_tokens` besides (vLLM's generation-config override) and `max_prompt_tokens` and
the context on the rendered prompt (engine/vllm_engine.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

from mistral_ray.config import ServiceConfig
from mistral_ray.server.auth import ApiKeys, Tenant
from mistral_ray.server.errors import Refused
from mistral_ray.server.fairness import BAND, FairShare, Ticket
from mistral_ray.server.generation import Generation, Unreadable
from mistral_ray.server.limits import check_sizes, requested_tokens
from mistral_ray.server.load import Inflight, Sequence
from mistral_ray.server.migration import RESUME_FIELD, BadResume, Resume, resumed_payload
from mistral_ray.server.quota import Charge, Quota
from mistral_ray.server.routes import Route

# Routes whose streams end with a usage chunk only when `stream_options.include_usage` asks for it.
USAGE_OPTION = ("chat", "completions")


@dataclass
class Admitted:
    """A request that passed every check, with what the gate needs to forward and account for it."""

    route: Route
    key_id: str
    body: bytes  # what vLLM gets (the stream's usage asked for, when the client did not)
    stream: bool = False
    seq: Optional[Sequence] = None  # its slot in the replica's load (generation routes)
    charge: Optional[Charge] = None
    hide_usage: bool = False  # we asked vLLM for the stream's usage chunk; the client did not
    received: bytes = b""  # the body as the client sent it
    model: Optional[str] = None  # the base model or the adapter it named (its metrics' label)
    migrate: Optional[str] = None  # a guarded stream: "ok" (tracked for migration) or why it cannot be continued
    resume: Optional[Resume] = None  # a continuation (or the guard's report) of a stream cut elsewhere
    tenant: Optional[Tenant] = None  # whose key sent it (keys on), or the default tier's
    ticket: Optional[Ticket] = None  # what the engine is told (generation routes): its priority
    tokens: int = 0  # the tokens it asked for (prompt estimate + completion budget): its fair-share charge
    used: Optional[int] = None  # the tokens it used (prompt + completion, from the engine's usage)

    def __post_init__(self):
        self.received = self.received or self.body


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def check_shape(route: str, payload: dict[str, Any]) -> None:
    """The OpenAI contract's required input, checked before vLLM sees it: vLLM's request models let some of
    these through (`messages: null`, an empty list) and then fail deep in rendering with a server error."""
    if route in ("chat", "messages"):
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


# Fields of vLLM's request models for disaggregated serving and KV connectors, which this server does not run:
# `kv_transfer_params.prompt_token_ids` replaces the prompt the messages render to, and `vllm_xargs` reaches
# the engine's per-request KV controls (`kv_cache_report_mode` re-publishes reused blocks as events).
NOT_SERVED_FIELDS = {"kv_transfer_params": "disaggregated serving's transfer parameters",
                     "ec_transfer_params": "disaggregated serving's encoder-cache transfer parameters",
                     "vllm_xargs": "vLLM's per-request extension arguments (KV connectors, plugins)",
                     RESUME_FIELD: "the stream guard's own continuation of a migrated stream",
                     "priority": "the engine priority, which the server sets from the API key's tier and fair share"}


def check_fields(payload: dict[str, Any]) -> None:
    """Fields of a generation request this server does not serve: refused, not passed on."""
    for name, what in NOT_SERVED_FIELDS.items():
        if payload.get(name) is not None:
            raise Refused(400, f"`{name}` ({what}) is not served here", param=name, code="unsupported_field")


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


def _unreadable(exc: Exception) -> Refused:
    if isinstance(exc, Unreadable):
        return Refused(400, str(exc), param=exc.param)
    errors = getattr(exc, "errors", None)
    if callable(errors) and errors():  # pydantic: name the field as vLLM's own 400 would
        first = errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        return Refused(400, f"{loc}: {first.get('msg')}" if loc else str(first.get("msg")), param=loc or None)
    return Refused(400, f"the request cannot be read: {type(exc).__name__}: {exc}")


class Checks:
    def __init__(self, cfg: ServiceConfig, keys: Optional[ApiKeys], quota: Optional[Quota], load: Inflight,
                 read: Callable[[str, dict], Generation], context: int,
                 migratable: Optional[Callable[[str, dict], Optional[str]]] = None,
                 printed: Optional[Callable[[tuple], tuple]] = None, default_max_tokens: Optional[int] = None):
        self.cfg, self.keys, self.quota, self.load, self.read = cfg, keys, quota, load, read
        self.migratable = migratable  # the engine's reason a stream cannot be continued (None: it can)
        self.printed = printed  # a continuation's ids without a character the client did not get
        self.default_max_tokens = default_max_tokens  # the engine's, for a request that names none
        self.limits = cfg.router.limits
        self.context = context  # the engine's context length, as it resolved it (engine.max_model_len may be null)
        self.models = frozenset({cfg.model.name})  # the base model and the adapters it serves now (reconfigure)
        self.allowed: dict[str, frozenset] = {}  # adapter -> the key ids that may use it (adapters with a list)
        tenants = cfg.router.tenants
        self.anyone = Tenant("none", tenants.default_tier, tenants.tiers[tenants.default_tier])
        # Fair share needs two keys at least: a key file of one has nobody to keep the reserve for.
        self.fair = (FairShare(cfg.scaling.max_ongoing_requests, tenants.reserve)
                     if keys is not None and tenants.fair_share and len(keys.tenants) > 1 else None)
        self.priorities = cfg.engine.scheduling_policy == "priority"  # fcfs: vLLM takes priority 0 only

    def _room(self, tenant: Tenant) -> None:
        """503 when the replica holds max_ongoing_requests, or when it is nearly full and `tenant` holds the
        largest share of it (fair share)."""
        if len(self.load.sequences) >= self.load.max_ongoing:
            raise Refused(503, "this replica is at capacity; retry later", code="overloaded", retry_after_s=1,
                          reason="overload")
        fair = self.fair
        if fair is not None and len(self.load.sequences) >= fair.soft and fair.refuses(tenant, self.load.holders()):
            raise Refused(503, "this replica is nearly full and your API key holds the largest share of it; "
                          "retry later", code="overloaded", retry_after_s=1, reason="fair_share")

    def tenant(self, key_id: str) -> Tenant:
        return self.keys.tenants.get(key_id, self.anyone) if self.keys is not None else self.anyone

    def _ticket(self, tenant: Tenant, seq: Sequence, tokens: int, continuation: bool = False) -> Ticket:
        """The engine's priority for a request: its tier's band, and its place in the fair order (a
        continuation goes on at the clock, charged nothing more: it was charged where it began)."""
        if not self.priorities or self.keys is None:
            return Ticket(0)
        if self.fair is None:
            return Ticket(tenant.priority * BAND)
        held = (s.tag for s in self.load.sequences if s.tag is not None)
        seq.tag = self.fair.now(held) if continuation else self.fair.tag(tenant, tokens, held)
        return Ticket(self.fair.priority(tenant, seq.tag))

    def authenticate(self, route: Route, headers: dict[bytes, bytes]) -> str:
        """The caller's key id ("none" with keys off or on a probe)."""
        if self.keys is None or route.kind == "probe":
            return "none"
        auth = headers.get(b"authorization")
        key_id = self.keys.identify(auth.decode("latin-1") if auth else None)
        if key_id is None:
            raise Refused(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                          code="invalid_api_key", reason="auth")
        return key_id

    def _resume(self, payload: dict[str, Any]) -> Resume:
        try:
            return Resume.parse(payload.pop(RESUME_FIELD, None))
        except BadResume as exc:
            raise Refused(400, f"`{RESUME_FIELD}` is not the stream guard's: {exc}", param=RESUME_FIELD) from None

    def _budget(self, request: Generation) -> Optional[int]:
        """The completion tokens the first part ran with (what was asked, else the route's default, else the
        engine's, capped by the operator's limit); None: the rest of the context, which a continuation's
        longer prompt shrinks by itself."""
        asked = request.max_tokens if request.max_tokens is not None else request.default_max_tokens
        if asked is None:
            asked = self.default_max_tokens
        limit = self.limits.max_tokens
        if asked is None:
            return limit
        return min(asked, limit) if limit else asked

    async def read_body(self, receive, headers: dict[bytes, bytes], extra: int = 0) -> bytes:
        """The body, or 413 as soon as it is known to exceed the limit (declared or counted while reading)."""
        limit = self.limits.max_body_bytes + extra
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

    def hidden(self, key_id: str) -> frozenset:
        """The adapters this key may not see (nor use)."""
        return frozenset(name for name, keys in self.allowed.items() if key_id not in keys)

    def check_model(self, payload: dict[str, Any], key_id: str = "none") -> None:
        model = payload.get("model")
        if model is not None and (not isinstance(model, str) or model not in self.models
                                  or (model in self.allowed and key_id not in self.allowed[model])):
            raise Refused(404, f"The model `{model}` does not exist.", param="model", code="model_not_found",
                          reason="model_not_found")

    def generation(self, route: str, payload: dict[str, Any]) -> Generation:
        """The request as the engine will read it, or the 400 its own request model would give. Reading
        raises for the client's input only (pydantic's ValidationError, vLLM's validators as Unreadable, and
        whatever else they raise on shapes they do not expect): a 400 either way."""
        try:
            return self.read(route, payload)
        except Exception as exc:
            raise _unreadable(exc) from None

    async def admit(self, route: Route, method: str, headers: dict[bytes, bytes], receive, key_id: str,
                    request_id: Optional[str] = None, guarded: bool = False, resumed: bool = False) -> Admitted:
        """Everything after the key, in order; the admitted request, or Refused. `guarded`: the stream guard
        relays it (it may be migrated); `resumed`: the guard put a continuation in the body."""
        if method != "POST":
            return Admitted(route, key_id, b"")
        if route.generation and not resumed:
            try:
                self._room(self.tenant(key_id))  # shed before the body is parsed: a flood's refusals cost little
            except Refused:
                await self.read_body(receive, headers)  # read, not parsed: the connection stays usable
                raise
        # A continuation's body is the client's plus the ids already made (at most ~7 bytes each).
        body = await self.read_body(receive, headers, 8 * self.context if resumed else 0)
        payload = parse(body)
        self.check_model(payload, key_id)
        check_shape(route.label, payload)
        model = payload.get("model")  # one this replica serves (check_model), or None: the base model
        if not route.generation:
            return Admitted(route, key_id, body, model=model)
        resume = self._resume(payload) if resumed else None
        if resume is not None and resume.report:
            return Admitted(route, key_id, b"", model=model, resume=resume)
        if resume is not None and route.label not in USAGE_OPTION:
            raise Refused(400, f"`{RESUME_FIELD}`: {route.label} streams are not continued", param=RESUME_FIELD)
        if resume is not None and self.printed is not None:
            resume = dataclasses.replace(resume, ids=self.printed(resume.ids))
        check_fields(payload)
        request = self.generation(route.label, payload)
        migrate = None
        if guarded and request.stream:
            migrate = (self.migratable(route.label, payload) if self.migratable else "route") or "ok"
        received = body
        if resume is not None:
            payload = resumed_payload(payload, resume, request.max_tokens_param, self._budget(request),
                                      request_id or "")
            body = json.dumps(payload).encode()
            request = self.generation(route.label, payload)
        check_sizes(request, self.limits)
        cfg = self.cfg
        tenant = self.tenant(key_id)
        if resume is None:
            self._room(tenant)  # again: others may have come in while the body was read
        seq = self.load.reserve(request.prompt_tokens(cfg.router.routing.chars_per_token),
                                request.n * max(1, request.prompts), tenant if self.keys is not None else None)
        if seq is None:
            raise Refused(503, "this replica is at capacity; retry later", code="overloaded", retry_after_s=1,
                          reason="overload")
        try:  # from here the slot is held: whatever fails gives it back
            tokens = requested_tokens(request, cfg.router.routing.chars_per_token, self.limits.max_tokens,
                                      self.context)
            admitted = Admitted(route, key_id, body, stream=request.stream, seq=seq, model=model, migrate=migrate,
                                resume=resume, received=received, tenant=tenant, tokens=tokens)
            # The slot is held while the bank answers: arrivals meanwhile see it. A continuation was charged
            # where the stream began; a key without limits (its own or the app's) is not asked about.
            if self.quota is not None and resume is None and (self.limits.rate_limited or tenant.limited):
                admitted.charge = await self.quota.admit(key_id, tokens, request_id, tenant.limited)
            admitted.ticket = self._ticket(tenant, seq, tokens, resume is not None)  # its place in the fair order
            if request.stream and route.label in USAGE_OPTION and not request.include_usage:
                # vLLM's final usage chunk is how the replica counts a stream's tokens; the client never sees it.
                options = payload.get("stream_options")
                payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                admitted.body, admitted.hide_usage = json.dumps(payload).encode(), True
        except BaseException:
            self.load.remove(seq)
            raise
        return admitted
