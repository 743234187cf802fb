"""Errors in the OpenAI wire format: ``{"error": {"message", "type", "param", "code"}}``.

Every non-2xx answer of the server carries this body (so the official client raises its typed
exceptions with our message).  Route code raises :class:`APIError`; the handlers in
:func:`install_handlers` turn it, FastAPI's validation errors, unknown routes and unexpected
exceptions into that shape.  Imports Starlette/FastAPI lazily, inside install_handlers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

__all__ = ["APIError", "error_body", "install_handlers"]

log = logging.getLogger("edgevlm.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
          413: "request_too_large", 429: "rate_limit_error", 500: "server_error", 503: "server_overloaded"}


@dataclass
class APIError(Exception):
    """An error answer: HTTP ``status`` with ``message`` (what was wrong and how to fix it)."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def _loc(loc: tuple) -> str:
    # ("body", "messages", 0, "content") -> "messages[0].content"; the "body" root says nothing
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """FastAPI/pydantic error list -> (one readable message, the first offending param)."""
    if errors and errors[0].get("type") == "json_invalid":
        ctx = errors[0].get("ctx") or {}
        return (f"the request body is not valid JSON ({ctx.get('error', 'parse error')}); send a JSON object "
                "with Content-Type: application/json"), None
    msgs, first = [], None
    for e in errors[:5]:
        where = _loc(tuple(e.get("loc", ())))
        first = first or where or None
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {str(got)[:60]!r})"
        msgs.append(f"{where or 'body'}: {e.get('msg', 'invalid')}{shown}")
    more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(msgs) + more, first


def install_handlers(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def reply(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api(request, exc: APIError):
        return reply(exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        # OpenAI answers a malformed request with 400, not FastAPI's 422.
        msg, param = validation_message(list(exc.errors()))
        return reply(400, error_body(400, msg, param, "invalid_value" if param else "invalid_json"))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}; see /docs or /openapi.json for the API"
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return reply(exc.status_code, error_body(exc.status_code, msg), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return reply(500, error_body(500, f"internal server error ({type(exc).__name__}); see the server log"))
