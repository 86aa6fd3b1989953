"""OpenAI-shaped error responses for everything the router itself rejects or that FastAPI raises."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from mistral_ray.protocol import error_body


def error_response(status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Replace FastAPI's `{"detail": ...}` bodies (unknown route, wrong method, bad params) with OpenAI's."""

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        return error_response(400, first["msg"], param)
