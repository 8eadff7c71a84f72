"""Holds every route to its declared errors: a test client that fails the test whenever
the service answers an error its OpenAPI entry does not list.

Each route declares what it may answer (`custody.api.errors.errors_for`); the document a
client is generated from says so. Every error answer, the router's own too, must also be
in the one error shape (`check_shape`). `CheckedClient` reads the app's own OpenAPI document
and, for every answer with a 4xx/5xx status, finds the route that served it (by method
and path template, from the document) and requires that status to be declared with the
answer's `error` code in its enum. So every error-path test of the suite also checks
the declaration of the route it calls.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient


class UndeclaredError(AssertionError):
    """A route answered an error (status and code) that its OpenAPI entry does not list."""


Declared = dict[tuple[str, str], dict[str, frozenset[str] | None]]


# Every test assembles an app of its own, and FastAPI builds the document anew for each
# (about half a second, most of what an error-path test costs). The routers are module-level,
# so apps with the same documented routes (path, methods, endpoint function) declare the
# same errors.
_by_routes: dict[tuple[Any, ...], Declared] = {}


def _routes_key(app: FastAPI) -> tuple[Any, ...]:
    return (
        app.title,
        app.version,
        tuple(  # what the document is made of (FastAPI's own docs routes are not in it)
            (r.path, tuple(sorted(r.methods or ())), r.endpoint)
            for r in app.routes
            if isinstance(r, APIRoute) and r.include_in_schema
        ),
    )


def _declared(app: FastAPI) -> Declared:
    """(METHOD, path template) -> {status: the declared codes (None: no enum)}, read once
    per app from its OpenAPI document (once per set of routes)."""
    cached: Declared | None = getattr(app.state, "declared_errors", None)
    if cached is not None:
        return cached
    key = _routes_key(app)
    if (shared := _by_routes.get(key)) is not None:
        app.state.declared_errors = shared
        return shared
    doc = app.openapi()
    out: dict[tuple[str, str], dict[str, frozenset[str] | None]] = {}
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            statuses: dict[str, frozenset[str] | None] = {}
            for status, response in operation.get("responses", {}).items():
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                enum = schema.get("properties", {}).get("error", {}).get("enum")
                statuses[status] = frozenset(enum) if enum is not None else None
            out[(method.upper(), path)] = statuses
    app.state.declared_errors = _by_routes[key] = out
    return out


def _template_pattern(template: str) -> re.Pattern[str]:
    """`/v1/loans/{loan_id}` -> a regex of the paths it serves (as Starlette compiles it)."""
    parts = re.split(r"(\{[^}]+\})", template)
    return re.compile(
        "^"
        + "".join(
            (".*" if p.endswith(":path}") else "[^/]+") if p.startswith("{") else re.escape(p)
            for p in parts
        )
        + "$"
    )


def route_template(app: FastAPI, method: str, path: str) -> str | None:
    """The path template of the documented route that serves `method path` (the most
    literal one if several could: `/keys/bank/hsm` before `/keys/{seat}`)."""
    candidates = [
        template
        for (m, template) in _declared(app)
        if m == method.upper() and _template_pattern(template).match(path)
    ]
    return max(candidates, key=lambda t: len(re.sub(r"\{[^}]+\}", "", t)), default=None)


def declared_codes(app: FastAPI, method: str, template: str) -> dict[int, frozenset[str]]:
    """What the route declares it may answer: {status: codes}."""
    return {
        int(status): codes or frozenset()
        for status, codes in _declared(app)[(method.upper(), template)].items()
        if status[0] in "45"
    }


class MisshapenError(AssertionError):
    """An error answer that is not `{error, message, field}` JSON (the one error shape)."""


def check_shape(response: httpx.Response) -> dict[str, Any]:
    """The error body, if it has the one shape: JSON, `error` and `message` strings and
    `field` a string or null, in that order; else MisshapenError."""
    where = f"{response.request.method} {response.request.url.path} {response.status_code}"
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if not (
        response.headers.get("content-type", "").startswith("application/json")
        and isinstance(body, dict)
        and tuple(body)[:3] == ("error", "message", "field")
        and isinstance(body["error"], str)
        and isinstance(body["message"], str)
        and (body["field"] is None or isinstance(body["field"], str))
    ):
        raise MisshapenError(f"{where} is not {{error, message, field}}: {response.text[:300]}")
    return body


def check_answer(app: FastAPI, response: httpx.Response) -> None:
    """Raise UndeclaredError if `response` is an error its route does not declare, and
    MisshapenError if it is not in the one error shape."""
    if response.status_code < 400:
        return
    body = check_shape(response)
    method, path = response.request.method, response.request.url.path
    template = route_template(app, method, path)
    if template is None:  # no such route (404) or method (405): the router's, not a route's
        return
    code = body["error"]
    where = f"{method} {template} answered {response.status_code} {code!r}"
    statuses = _declared(app)[(method, template)]
    if str(response.status_code) not in statuses:
        raise UndeclaredError(f"{where}, but declares no {response.status_code}: {body}")
    codes = statuses[str(response.status_code)]
    if codes is None or code not in codes:
        raise UndeclaredError(f"{where}, but declares only {sorted(codes or ())}: {body}")


class CheckedClient(TestClient):
    """A TestClient whose every error answer must be declared by its route."""

    app: FastAPI

    def request(self, method: str, url: Any, **kwargs: Any) -> httpx.Response:
        response: httpx.Response = super().request(method, url, **kwargs)
        check_answer(self.app, response)
        return response
