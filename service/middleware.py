"""ASGI middleware: the body-size limit (before anything reads the body) and HTTP
metrics."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import Problem, problem_response
from service.metrics import HTTP_LATENCY, HTTP_REQUESTS


class BodySizeLimit:
    """413 when Content-Length says too much, or when a chunked body grows past it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> Problem:
        return Problem(
            413,
            "body-too-large",
            "Request body too large",
            f"the body exceeds {self.max_bytes} bytes (MAX_BODY_BYTES); split the items "
            "over several requests",
            limit=self.max_bytes,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            exc = self._too_large()
            reply = problem_response(
                exc.status, exc.slug, exc.title, exc.detail, scope.get("path"), **exc.extensions
            )
            await reply(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            # A chunked body has no Content-Length: count as it streams in. FastAPI lets
            # an HTTPException (Problem is one) raised while reading the body through.
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)


class HttpMetrics:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            # The route template (not the raw path) keeps label cardinality bounded.
            route = getattr(scope.get("route"), "path", "unmatched")
            HTTP_REQUESTS.labels(scope["method"], route, str(status[0])).inc()
            HTTP_LATENCY.labels(scope["method"], route).observe(time.perf_counter() - start)
