"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``.

Everything the server refuses goes through here: an :class:`APIError` raised anywhere (a route,
a dependency, the body limit's receive), FastAPI's validation errors, Starlette's 404/405, and
anything unexpected (500, the one status a client's input never causes)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .schemas import field_names

log = logging.getLogger("tide_local.serve")

# A validation error's location keeps the bodies' field names (and list indexes) and drops
# pydantic's union tags ("str", "list[str]"): that is OpenAI's `param`.
_FIELD_NAMES = field_names()


class APIError(HTTPException):
    """An error response: HTTP status, message, OpenAI's error type, the request field it is
    about (`param`) and a machine-readable `code`. An HTTPException, so that it passes through
    FastAPI's body reading (the body limit raises it there) to the handler below."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.message, self.type, self.param, self.code = message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def bad_field(param: str | None, message: str, code: str | None = None) -> APIError:
    """400 for a request field that is wrong."""
    return APIError(400, message, param=param, code=code)


def context_exceeded(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="context_length_exceeded")


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; the request was not completed", type="server_error",
                    code="server_shutting_down")


def client_gone() -> APIError:
    """The client closed the connection before its answer: nobody reads this response, but
    /metrics counts it (499, as nginx logs it)."""
    return APIError(499, "the client closed the request before its answer", code="client_closed_request")


def internal(err: BaseException) -> APIError:
    return APIError(500, f"the server failed: {type(err).__name__}: {err}", type="server_error")


def _from_http(exc: HTTPException, request: Request) -> APIError:
    """Starlette's own errors (no route, wrong method) in OpenAI's shape."""
    if exc.status_code == 404:
        return APIError(404, f"no such path: {request.method} {request.url.path}", code="not_found")
    if exc.status_code == 405:
        return APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed",
                        headers=exc.headers)
    return APIError(exc.status_code, str(exc.detail), headers=exc.headers)


def _param(loc) -> str | None:
    """`messages[0].role` from pydantic's ("body", "messages", 0, "role")."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELD_NAMES:
            out += f".{part}" if out else part
        else:
            break
    return out or None


def _from_validation(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "")
        return bad_field(None, f"the body is not valid JSON: {why}".rstrip(": "))
    param = _param(first.get("loc", ()))
    if param is None:
        return bad_field(None, "the body must be a JSON object with the fields of this endpoint")
    return bad_field(param, f"{param}: {first.get('msg', 'invalid value')}")


def install(app: FastAPI) -> None:
    """Give every error of `app` OpenAI's shape."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        error = exc if isinstance(exc, APIError) else _from_http(exc, request)
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _from_validation(exc).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return internal(exc).response()
