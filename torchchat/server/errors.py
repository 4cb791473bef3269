"""Errors as OpenAI sends them: a status code and ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server answers, including FastAPI's own (a body that is not JSON, a missing or
ill-typed field, an unknown route), leaves in this shape, so OpenAI clients raise their usual
exceptions (``BadRequestError``, ``NotFoundError``, ...) with a readable message.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

log = logging.getLogger("torchchat.server")


class ApiError(Exception):
    """An error answered to the client; ``param`` names the request field at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def server_busy(message: str) -> ApiError:
    return ApiError(503, message, code="server_busy", type="server_error")


def param_path(loc: tuple) -> str | None:
    """A pydantic location ("body", "messages", 0, "role") -> "messages[0].role"."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or None


def validation_error(exc: RequestValidationError | ValidationError) -> ApiError:
    """FastAPI's 422 or pydantic's error -> OpenAI's 400, with the first problem spelled out (the rest
    are usually echoes)."""
    first = exc.errors()[0]
    param = param_path(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return bad_request(f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})")
    if kind == "missing":
        return bad_request(f"missing required parameter: '{param}'", param, "missing_required_parameter")
    if param is None:
        return bad_request(f"the request body must be a JSON object: {first.get('msg')}")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return bad_request(f"invalid value for '{param}': {message}", param, "invalid_value")


def install_error_handlers(app: FastAPI):
    """Answer every error in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        err = validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("error answering %s %s", request.method, request.url.path)
        err = ApiError(500, "internal error; the server's log has the details", type="server_error")
        return JSONResponse(err.body(), status_code=500)
