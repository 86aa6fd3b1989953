"""The server layer's one error type, and OpenAI's error body for everything a replica answers.

Every check before the engine raises `Refused` (status, OpenAI `code`, `param`, the rejection metric's reason,
Retry-After); the gate turns it into a response in one place. Errors that vLLM or FastAPI answer themselves
(`{"error": {...}}` with vLLM's own `type`, `{"detail": ...}`, plain text) are rewritten into the same shape.
"""

from __future__ import annotations

import json
from typing import Any, Optional

REPLICA_HEADER = "x-mistral-ray-replica"
# Set by HAProxy on every request (see proxy/haproxy.py), kept on its retries: the quota bank charges it once.
REQUEST_ID_HEADER = "x-mistral-ray-request-id"

# OpenAI's error `type` for each status, as its API and client SDKs use them.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def sse_error(status: int, message: str, code: Optional[str] = None) -> bytes:
    """An error event for a stream that already sent 200: clients see it instead of a silent cut."""
    return f"data: {json.dumps(error_body(status, message, code=code))}\n\ndata: [DONE]\n\n".encode()


class Refused(Exception):
    """A request the replica answers itself, before (or instead of) the engine."""

    def __init__(self, status: int, message: str, *, code: Optional[str] = None, param: Optional[str] = None,
                 reason: str = "validation", retry_after_s: Optional[int] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.reason, self.retry_after_s = reason, retry_after_s

    def body(self) -> bytes:
        return json.dumps(error_body(self.status, self.message, self.param, self.code)).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        # Retry-After in whole seconds, as HTTP and the openai client's retry logic read it.
        return [(b"retry-after", str(self.retry_after_s).encode())] if self.retry_after_s is not None else []


def _message(detail: Any) -> str:
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):  # FastAPI's validation errors
        first = detail[0]
        loc = ".".join(str(p) for p in first.get("loc", ())[1:])
        return f"{loc}: {first.get('msg')}" if loc else str(first.get("msg"))
    return str(detail)


def normalized(status: int, raw: bytes) -> bytes:
    """Any error body (vLLM's `{"error": {...}}` with its own `type` and an integer `code`, FastAPI's
    `{"detail": ...}`, Serve's or Starlette's plain text) as OpenAI's body for `status`."""
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        payload = raw.decode("utf-8", "replace").strip() or f"HTTP {status}"
    param = code = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        err = payload["error"]
        message, param = err.get("message") or f"HTTP {status}", err.get("param")
        code = err.get("code") if isinstance(err.get("code"), str) else None
    elif isinstance(payload, dict) and "detail" in payload:
        message = _message(payload["detail"])
    elif isinstance(payload, dict) and isinstance(payload.get("error"), str):
        message = payload["error"]
    else:
        message = payload if isinstance(payload, str) else json.dumps(payload)
    return json.dumps(error_body(status, str(message), param if isinstance(param, str) else None, code)).encode()
