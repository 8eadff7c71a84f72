"""The API's edge: a request id for every request, and its latency as a Prometheus histogram.

A pure ASGI middleware, outermost of the app's own: it takes the caller's `X-Request-Id`
when it is safe to carry (`custody.logging.accept_request_id`) or makes one, echoes it in
the response, and binds it in structlog's contextvars for the request, so every log line,
every audit event written during the request (`custody.audit.service.record`) and every
call to the signer (`hsm.client.HttpTransport`) carries it.

Latency is labelled by method, the route's template (`/v1/loans/{loan_id}`, never the
raw path: ids would make a label value per loan) and status. With several uvicorn
workers the samples live in prometheus_client's multiprocess files
(`custody.api.server.multiprocess_metrics`) and a scrape sums every worker's.
"""

from __future__ import annotations

import os
import time
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from custody.logging import REQUEST_ID_HEADER, accept_request_id

# What a route that matched nothing is labelled (a 404, or a method no route takes).
UNMATCHED = "<unmatched>"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# In memory for one worker; in multiprocess mode the samples go to files and this
# registry is never read (a scrape collects the files).
REGISTRY = CollectorRegistry(auto_describe=True)

REQUEST_SECONDS = Histogram(
    "custody_http_request_duration_seconds",
    "Time from a request's arrival to its response's last byte, by route template",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def request_registry() -> CollectorRegistry:
    """What a scrape reads of the request metrics: every worker's files in multiprocess
    mode, else this process's registry."""
    if not multiprocess():
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def route_template(scope: Scope, root_path: str) -> str:
    """The template of the route that served the request (a mounted app's prefix
    included); for an answer given before routing (a body over its limit), the route
    it was for; UNMATCHED when no route serves the path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        prefix = str(scope.get("root_path", ""))[len(root_path) :]
        return prefix + path
    app = scope.get("app")
    for candidate in getattr(app, "routes", ()):
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return str(getattr(candidate, "path", UNMATCHED))
    return UNMATCHED


class RequestMetrics:
    """The middleware (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = accept_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        root_path = str(scope.get("root_path", ""))
        status = 500  # an exception that escapes the app is answered 500 outside us

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            with structlog.contextvars.bound_contextvars(request_id=request_id):
                await self.app(scope, receive, send_with_id)
        finally:
            labels: dict[str, Any] = {
                "method": scope["method"] if scope["method"] in _METHODS else "OTHER",
                "route": route_template(scope, root_path),
                "status": str(status),
            }
            REQUEST_SECONDS.labels(**labels).observe(time.perf_counter() - started)
