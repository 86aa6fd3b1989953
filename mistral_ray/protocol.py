"""What crosses the router -> replica hop. No vllm, no torch: the router imports this.

A replica answers every request with an async stream shaped like ASGI's: one `Head` first (status,
who served it, whether the body is SSE), then the body as already-encoded text chunks. The router relays
chunks untouched, so nothing on the path re-encodes a token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

SSE_MEDIA_TYPE = "text/event-stream"
REPLICA_HEADER = "x-mistral-ray-replica"

# OpenAI's error `type` for each status, as its API and client SDKs use them.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


@dataclass(frozen=True)
class Head:
    status: int
    replica_id: str
    stream: bool


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
    err_type = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_json(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> str:
    return json.dumps(error_body(status, message, param, code))


def sse_error(status: int, message: str) -> str:
    """An error event for a stream that already sent 200: clients see it instead of a silent cut."""
    return f"data: {error_json(status, message)}\n\ndata: [DONE]\n\n"
