"""Mid-stream migration, the replica's side (the guard's is `proxy/stream_guard.lua`).

A stream the guard relays is *tracked*: the replica marks each event with the token ids whose text it
carries (`:<ids>` line, `.` first on the event of the last token), which the guard takes out before the
client sees the event. When the replica dies, the guard sends the request again with those ids in
`RESUME_FIELD` (`Resume`): the next replica runs the original prompt plus the ids as its prompt, with the
completion tokens left, and its events are made the continuation of the client's stream (`continuation`):
the same id and `created`, no second role delta, usage summing both parts.

A stream is tracked only when the engine can continue it exactly (`engine/migration.py` names what it
cannot); the replica says which in its `MIGRATE_HEADER` response header, which the guard keeps from the client.
"""

from __future__ import annotations

import contextvars
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

# Request header: set by the stream guard on its inner pass (HAProxy deletes a client's). Response header:
# "ok" when the replica tracks the stream, else the reason it cannot be continued.
MIGRATE_HEADER = "x-mistral-ray-migrate"
# Request header: this body carries RESUME_FIELD, put there by the guard (HAProxy deletes a client's header).
RESUME_HEADER = "x-mistral-ray-resume"
RESUME_FIELD = "mistral_ray_resume"

# Why a stream cannot be continued exactly (the metric's `reason` label; README "Stream migration").
NOT_POSSIBLE = ("route", "n", "logprobs", "echo", "tools", "structured_output", "stop_strings", "seeded_sampling",
                "penalties", "bad_words", "beam_search", "continuous_usage", "prompt_truncation", "parser")
# How a stream the guard found cut ended: continued on another replica, the continuation refused or lost past
# `router.migration_limit`, or not possible (by reason).
OUTCOMES = ("migrated", "failed", "not_possible")
FAILED = ("refused", "limit")
_CREATED = re.compile(rb'"created":\s*\d+')


@dataclass
class Tracked:
    """A tracked stream's token ids not yet put on an event."""

    hold_first: bool  # the first event (a chat's role delta) carries no text: its ids wait for the next
    pending: list = field(default_factory=list)
    finished: bool = False  # the engine reported the last token

    def mark(self, body: bytes) -> bytes:
        """The event with its `:<ids>` line (before the blank line that ends it), if it has ids to carry."""
        if self.hold_first:
            self.hold_first = False
            return body
        if not self.pending and not self.finished:
            return body
        line = (b":." if self.finished else b":") + " ".join(map(str, self.pending)).encode()
        self.pending.clear()
        self.finished = False
        return body[:-1] + line + b"\n\n" if body.endswith(b"\n\n") else body


# The stream the engine's outputs belong to, set by the gate around vLLM's app (a context variable: every task
# vLLM starts for the request inherits it).
TRACKED: contextvars.ContextVar[Optional[Tracked]] = contextvars.ContextVar("mistral_ray_tracked", default=None)
# A continuation's first-part ids, which the engine appends to the prompt it renders (engine/migration.py).
RESUMED: contextvars.ContextVar[tuple] = contextvars.ContextVar("mistral_ray_resumed", default=())


class BadResume(ValueError):
    """A RESUME_FIELD that is not the guard's shape."""


@dataclass(frozen=True)
class Resume:
    """What the guard sends with a continuation: the ids the client got text for, the stream's id and
    `created`, how many events it got, whether it got the last token, when it found the stream cut (its
    clock: the time since the epoch, ms; the hosts' clocks are taken to agree, as NTP keeps them). A
    `report` is not a continuation: the guard tells how a stream it could not continue ended."""

    ids: tuple[int, ...] = ()
    id: Optional[str] = None
    created: Optional[int] = None
    events: int = 0
    finished: bool = False
    cut_ms: float = 0.0
    report: Optional[str] = None

    @classmethod
    def parse(cls, value: Any) -> "Resume":
        if not isinstance(value, dict):
            raise BadResume("not an object")
        ids = value.get("ids", [])
        if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):
            raise BadResume("ids")
        report = value.get("report")
        if report is not None and (not isinstance(report, str) or report.partition(":")[0] not in OUTCOMES):
            raise BadResume("report")
        sid, created = value.get("id"), value.get("created")
        try:
            events, cut_ms = int(value.get("events") or 0), float(value.get("cut_ms") or 0)
        except (TypeError, ValueError):
            raise BadResume("events, cut_ms") from None
        return cls(ids=tuple(ids), id=sid if isinstance(sid, str) else None,
                   created=created if type(created) is int else None, events=events,
                   finished=bool(value.get("finished")), cut_ms=cut_ms,
                   report=report)


def resumed_payload(payload: dict, resume: Resume, param: str, budget: Optional[int], default_id: str) -> dict:
    """The continuation's request: the completion tokens left (`budget`: what the first replica ran with,
    None: the rest of the context; after the last token, 1: only its usage chunk is wanted), min_tokens less
    those made, the stream's own id."""
    made = len(resume.ids)
    out = dict(payload)
    if budget is not None or resume.finished:
        out[param] = 1 if resume.finished or budget is None else max(1, budget - made)
        if param == "max_completion_tokens":
            out.pop("max_tokens", None)
    try:  # as vLLM reads it ("5", 5.0)
        out["min_tokens"] = max(0, int(float(out["min_tokens"])) - made)
    except (KeyError, TypeError, ValueError):
        pass
    if resume.id:  # vLLM's id is "<prefix>-<request_id>" (or X-Request-Id's, which the guard passes on)
        out["request_id"] = resume.id.split("-", 1)[1] if "-" in resume.id else resume.id
    elif default_id:
        out.setdefault("request_id", default_id)
    return out


def continuation(send, resume: Resume, chat: bool):
    """`send` for a continuation's events: its role delta dropped (the client has one), `created` the
    first part's, usage counting the ids of the first part as completion tokens, not as prompt; after the
    last token (`finished`), only the usage chunk and [DONE] go out."""
    made = len(resume.ids)
    created = b'"created":%d' % resume.created if resume.created is not None else None
    state = {"first": chat and resume.events > 0}

    async def rewritten(message) -> None:
        if message["type"] != "http.response.body" or not message.get("body"):
            return await send(message)
        body = message["body"]
        if state["first"]:
            state["first"] = False
            if b'"role"' in body:
                return await send({**message, "body": b""})
        if resume.finished and b'"choices":[{' in body:
            return await send({**message, "body": b""})
        if created is not None:
            body = _CREATED.sub(created, body, count=1)
        if b'"usage":{' in body and b'"choices":[]' in body:
            body = _usage(body, made, resume.finished)
        await send({**message, "body": body})

    return rewritten


def _usage(event: bytes, made: int, finished: bool) -> bytes:
    """The usage chunk with the first part's tokens counted as completion, not prompt (after the last token,
    they are all of it: the one token a tail's engine ran for is not the client's)."""
    head, _, rest = event.partition(b"data: ")
    text, sep, tail = rest.partition(b"\n")
    try:
        chunk = json.loads(text)
        usage = chunk["usage"]
        usage["prompt_tokens"] -= made
        usage["completion_tokens"] = made if finished else usage["completion_tokens"] + made
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            details["cached_tokens"] = min(details["cached_tokens"], usage["prompt_tokens"])
    except (ValueError, KeyError, TypeError):
        return event
    return head + b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + sep + tail
