"""Two plain ASGI middlewares: the request body limit, and the request counter of /metrics.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: they see every message as it passes, so
the limit acts while the body is read and the counter sees a stream's status."""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tide_local.units import human_bytes

from .errors import APIError
from .metrics import Metrics


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {human_bytes(limit)}", code="request_too_large")


class BodyLimit:
    """413 for a body over `max_bytes`: at once when Content-Length says so, else as soon as the
    body read passes it (a chunked body has no length). The error raised while reading is an
    HTTPException, which FastAPI passes on from its body reading to the error handlers."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await _too_large(self.max_bytes).response()(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _too_large(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class RequestCounter:
    """Counts every HTTP request by endpoint and status once its response ends (500 if the app
    raised before responding); `endpoint_of` maps a path to its label."""

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoint_of: Callable[[str], str]):
        self.app, self.metrics, self.endpoint_of = app, metrics, endpoint_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.metrics.request(self.endpoint_of(scope["path"]), status)
