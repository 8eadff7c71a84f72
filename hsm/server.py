"""`hsm serve`: the bank's signer as its own process, over loopback HTTP.

Why a separate process: the custody API is the biggest attack surface of the system. In
this mode the API holds neither the HSM PIN, the signer's registry nor the enrolled
people's keys; it can only ask. Every operation is `POST /v1/<op>` with a JSON body,
handed as bytes to `SignerCore.handle`, the same entry point the in-process transport
uses. `GET /health` answers the signer's health (with its C_Sign count, for tests);
`GET /metrics` its Prometheus metrics (`hsm.metrics`). A caller's `X-Request-Id` (the
service's request id) is bound to the log lines of its call (`hsm.logs`).

Before anything else, a pure ASGI layer checks `Authorization: Bearer <token>` (constant
time; every path, 404s included) and bounds the body: a body above the limit is refused
with 413 while reading, never buffered whole. Neither the token nor the PIN is logged.
"""

from __future__ import annotations

import hmac
from typing import Any

import structlog
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hsm.core import SignerCore
from hsm.logs import REQUEST_ID_HEADER, request_id_from

__all__ = ["create_signer_app"]


class _Guard:
    """Bearer token first, then a bounded body; anything else never reaches the core."""

    def __init__(self, app: ASGIApp, token: str, core: SignerCore, max_body_bytes: int) -> None:
        self.app = app
        self._token = token.encode("utf-8")
        self.core = core
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        scheme, _, credential = headers.get(b"authorization", b"").partition(b" ")
        if not (
            scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self._token)
        ):
            response = JSONResponse(
                {"error": "not_authenticated", "message": "a valid bearer token is required"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            size = int(declared) if declared.isdigit() else -1
            await self._too_large(scope, receive, send, size)
            return
        chunks: list[bytes] = []
        total = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body_bytes:
                await self._too_large(scope, receive, send, total)
                return
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        replayed = False
        request_id = request_id_from(
            headers.get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1") or None
        )

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if request_id is None:
            await self.app(scope, replay, send)
            return
        # Every line written for this call, its decision's included, carries the id.
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        status, answer = self.core.refuse_oversized(size, self.max_body_bytes)
        await JSONResponse(answer, status_code=status)(scope, receive, send)


def create_signer_app(core: SignerCore, token: str, *, max_body_bytes: int = 1 << 20) -> ASGIApp:
    """The signer's HTTP app around `core`. `token` is the bearer secret callers present."""
    if len(token) < 32:
        raise ValueError("the serve token must be at least 32 characters")

    def answer(status: int, body: dict[str, Any]) -> Response:
        return JSONResponse(body, status_code=status)

    async def operation(request: Request) -> Response:
        op = request.path_params["op"]
        body = await request.body()
        # The core is synchronous (token, SQLite, node): run it off the event loop.
        from starlette.concurrency import run_in_threadpool

        status, result = await run_in_threadpool(core.handle, op, body)
        return answer(status, result)

    async def health(_: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        status, result = await run_in_threadpool(core.handle, "health", b"{}")
        return answer(status, result)

    async def metrics(_: Request) -> Response:
        return Response(core.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "not_found", "message": "no such path"}, status_code=404)

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return JSONResponse(
            {"error": "method_not_allowed", "message": "use POST /v1/<operation>"},
            status_code=405,
        )

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/v1/{op:str}", operation, methods=["POST"]),
        ],
        exception_handlers={404: not_found, 405: not_allowed},
    )
    return _Guard(app, token, core, max_body_bytes)
