"""Bounded input: a request's body is limited per route and read only after its API key.

A pure ASGI middleware in front of the app. It finds the route a request is for (the same
first full match as the router), then, before reading one byte of the body:

1. refuses at once a `Content-Length` larger than the route accepts (413 `body_too_large`),
   whoever asks: the limit holds for requests without a key too;
2. authenticates the caller when the route needs one, in the same short read transaction
   `custody.api.deps.get_principal` used to open, and leaves the outcome in the scope for it
   (`deps.AUTHENTICATED`): a caller without a valid key is answered 401 by the app with an
   empty body in place of the real one, so nothing of it is read;
3. reads the body, counting, and answers 413 as soon as it passes the limit: at most the
   limit is ever held in memory (the app would have buffered it whole anyway).

The rest of a refused body is left to uvicorn, which discards it as it arrives. Before, an
unauthenticated 300 MB POST was read whole (13 s, 1.2 GB of memory) before its key was
looked at. JSON bodies are small; a PSBT upload (binary or base64 JSON) may be a few MB.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.engine import Engine
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from custody.api.deps import AUTHENTICATED, authenticate_request, get_principal, read_body
from custody.api.errors import error_body, errors_for
from custody.errors import BodyTooLarge

JSON_BODY_LIMIT = 64 * 1024
UPLOAD_BODY_LIMIT = 4 * 1024 * 1024


@dataclass(frozen=True)
class RoutePolicy:
    """What a route reads: its body limit (None: it reads no body) and whether it needs a key."""

    route: APIRoute
    body_limit: int | None
    needs_key: bool


def _calls(dependant: Dependant) -> Iterator[Any]:
    yield dependant.call
    for sub in dependant.dependencies:
        yield from _calls(sub)


def policy_of(route: APIRoute) -> RoutePolicy:
    """A route that takes the raw body (`deps.RawBodyDep`: the PSBT upload) may read a few MB;
    one with a JSON body model, 64 KiB; any other reads none."""
    calls = set(_calls(route.dependant))
    limit: int | None = None
    if read_body in calls:
        limit = UPLOAD_BODY_LIMIT
    elif route.body_field is not None:
        limit = JSON_BODY_LIMIT
    return RoutePolicy(route=route, body_limit=limit, needs_key=get_principal in calls)


def bound_input(app: FastAPI, routers: Sequence[APIRouter]) -> None:
    """Put the middleware in front of `app` for the routes of `routers`, and declare each body
    route's 413 in the OpenAPI document. Call it before the routers are included (the
    document is built from the routes as they are then); declaring is idempotent, so apps
    built from the same routers again change nothing."""
    policies: list[RoutePolicy] = []
    for router in routers:
        for route in router.routes:
            if isinstance(route, APIRoute):
                policy = policy_of(route)
                if policy.body_limit is not None:
                    route.responses.setdefault(413, _declaration(policy.body_limit))
                policies.append(policy)
    app.add_middleware(BoundedInput, policies=tuple(policies), engine=app.state.engine)


def _declaration(limit: int) -> dict[str, Any]:
    declared = copy.deepcopy(errors_for(BodyTooLarge)[413])
    declared["description"] += f" This route reads at most {limit} bytes."
    return declared


def too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"the request body is larger than this route accepts ({limit} bytes)")


class BoundedInput:
    """The middleware (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, policies: tuple[RoutePolicy, ...], engine: Engine) -> None:
        self.app = app
        self.engine = engine
        # Per method, in the router's order (the first full match is the route).
        self.by_method: dict[str, tuple[RoutePolicy, ...]] = {
            method: tuple(p for p in policies if method in (p.route.methods or ()))
            for method in {m for p in policies for m in (p.route.methods or ())}
        }

    def policy(self, scope: Scope) -> RoutePolicy | None:
        path: str = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        candidates = self.by_method.get(scope["method"], ())
        return next((p for p in candidates if p.route.path_regex.match(path)), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        policy = self.policy(scope) if scope["type"] == "http" else None
        if policy is None:  # not ours, or a path or method no route serves (the router's 404/405)
            await self.app(scope, receive, send)
            return
        limit = policy.body_limit
        headers = Headers(scope=scope)
        if limit is not None and _content_length(headers) > limit:
            await _refuse(scope, send, limit)
            return
        if policy.needs_key:
            outcome = await self._authenticate(headers.get("authorization"))
            scope[AUTHENTICATED] = outcome
            if isinstance(outcome, BaseException):
                await self.app(scope, _Replay(b"", receive), send)
                return
        if limit is None:
            await self.app(scope, receive, send)
            return
        try:
            body = await _read_at_most(receive, limit)
        except _TooLarge:
            await _refuse(scope, send, limit)
            return
        except _Gone:  # nobody is left to answer
            return
        await self.app(scope, _Replay(body, receive), send)

    async def _authenticate(self, authorization: str | None) -> object:
        """The Principal, or what authenticating raised (the app answers it: 401, or 503 when
        no database connection came in time)."""
        try:
            return await anyio.to_thread.run_sync(authenticate_request, self.engine, authorization)
        except Exception as exc:  # answered by the app's handlers, through get_principal
            return exc


def _content_length(headers: Headers) -> int:
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:  # the HTTP parser refuses these before the app sees them
        return 0


class _TooLarge(Exception):
    pass


class _Gone(Exception):
    """The client went away before its body was complete."""


async def _read_at_most(receive: Receive, limit: int) -> bytes:
    """The whole body; _TooLarge as soon as more than `limit` bytes arrived."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Gone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class _Replay:
    """A `receive` that gives the app the body already read, then the real channel (which
    only reports the client's disconnect from then on)."""

    def __init__(self, body: bytes, receive: Receive) -> None:
        self._body: bytes | None = body
        self._receive = receive

    async def __call__(self) -> Message:
        if self._body is None:
            return await self._receive()
        body, self._body = self._body, None
        return {"type": "http.request", "body": body, "more_body": False}


async def _refuse(scope: Scope, send: Send, limit: int) -> None:
    """413 in the service's one error shape (`error_body`, as custody.api.app answers)."""
    error = too_large(limit)
    response = JSONResponse(status_code=error.status_code, content=error_body(error))
    await response(scope, _never, send)


async def _never() -> Message:
    return {"type": "http.disconnect"}
