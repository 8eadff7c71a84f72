"""Every error answer has one shape, `{error, message, field}` (`field` null when no one
field is wrong), the framework's own refusals included: no such path, a wrong method, a
body that is not JSON or not JSON at all, validation, an `HTTPException` raised anywhere,
401/403 from the dependencies, an unexpected failure. Each answer also matches the schema
its route declares in the OpenAPI document (the client checks its code is declared)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import HTTPException as FastAPIHTTPException
from fastapi.testclient import TestClient
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from support.declared import route_template
from support.world import World, build_world

from custody.api.errors import errors_for
from custody.db.migrate import upgrade
from custody.db.session import make_engine
from custody.errors import BodyTooLarge, LoanNotFound
from pledge.errors import Conflict, NotAuthenticated

SHAPE = ("error", "message", "field")


def _probe(what: str) -> dict[str, str]:
    """Raises what it is told to, as code deep in a route or a library would."""
    if what == "starlette":
        raise StarletteHTTPException(409, "already there", headers={"X-Reason": "probe"})
    if what == "fastapi":
        raise FastAPIHTTPException(401, {"not": "a string"}, {"WWW-Authenticate": "Basic"})
    if what == "too-large":
        raise StarletteHTTPException(413)
    if what == "teapot":
        raise StarletteHTTPException(418)
    if what == "pool":
        raise PoolTimeout("QueuePool limit of size 5 overflow 10 reached")
    if what == "bug":
        raise KeyError("secret-looking detail")
    return {"ok": what}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    engine = make_engine(f"sqlite:///{Path(tmp_path_factory.mktemp('shape')) / 'db.sqlite'}")
    upgrade(engine)
    world = build_world(engine)
    world.client.app.add_api_route(
        "/v1/probe/{what}",
        _probe,
        methods=["GET"],
        responses=errors_for(LoanNotFound, NotAuthenticated, Conflict, BodyTooLarge),
    )
    return world


def _post(world: World, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
    r: httpx.Response = world.client.post(
        path, content=content, headers={**world.h("admin"), **headers}
    )
    return r


def _conforms(value: Any, schema: dict[str, Any]) -> bool:
    """Enough of JSON Schema for the error schemas: type (one or a list), enum, required,
    properties, items."""
    kinds = schema.get("type")
    if kinds is not None:
        names = {
            "string": str,
            "integer": int,
            "object": dict,
            "array": list,
            "null": type(None),
            "boolean": bool,
        }
        if not any(
            isinstance(value, names[k]) for k in ([kinds] if isinstance(kinds, str) else kinds)
        ):
            return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, dict):
        if not set(schema.get("required", ())) <= value.keys():
            return False
        props = schema.get("properties", {})
        return all(_conforms(v, props[k]) for k, v in value.items() if k in props)
    if isinstance(value, list) and "items" in schema:
        return all(_conforms(v, schema["items"]) for v in value)
    return True


def _shaped(world: World, r: httpx.Response) -> dict[str, Any]:
    """The error body, checked for the one shape and against its route's declared schema."""
    body: dict[str, Any] = r.json()
    assert r.headers["content-type"] == "application/json", r.headers
    assert tuple(body)[:3] == SHAPE, body
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["message"], str) and body["message"], body
    assert body["field"] is None or isinstance(body["field"], str), body
    assert "detail" not in body, body
    template = route_template(world.client.app, r.request.method, r.request.url.path)
    if template is not None:
        doc = world.client.app.openapi()
        schema = doc["paths"][template][r.request.method.lower()]["responses"][str(r.status_code)][
            "content"
        ]["application/json"]["schema"]
        assert _conforms(body, schema), (body, schema)
    return body


@pytest.mark.unit
def test_an_unknown_path_is_answered_in_the_error_shape(world: World) -> None:
    for path in ("/", "/v1/no-such-thing", "/v1/loans/1/nope", "/v2/loans"):
        r = world.call("admin", "GET", path)
        assert r.status_code == 404
        assert _shaped(world, r) == {
            "error": "no_such_route",
            "message": "no route serves this path",
            "field": None,
        }


@pytest.mark.unit
def test_a_wrong_method_keeps_its_allow_header(world: World) -> None:
    r = world.call("admin", "DELETE", "/v1/loans/1")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert _shaped(world, r)["error"] == "unsupported_method"
    r = world.call("admin", "PATCH", "/v1/loans")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "POST"}
    assert "GET" in _shaped(world, r)["message"]


@pytest.mark.unit
def test_a_body_that_is_not_json_is_a_400(world: World) -> None:
    json_type = {"Content-Type": "application/json"}
    for route in ("/v1/parties", "/v1/signing-requests/1/signatures"):
        for content in (b"{not json", b'{"name": "x",}', b"\x80\xff", b'"\xc3"'):
            r = _post(world, route, content, json_type)
            assert r.status_code == 400, (route, content, r.text)
            body = _shaped(world, r)
            assert body["error"] == "malformed_body" and body["field"] is None, body
    r = _post(world, "/v1/parties", b"{not json", json_type)
    assert r.json()["message"] == (
        "the request body is not valid JSON: Expecting property name enclosed in double "
        "quotes at character 1"
    )


@pytest.mark.unit
def test_a_body_of_another_content_type_is_a_415(world: World) -> None:
    for route in ("/v1/parties", "/v1/signing-requests/1/signatures"):
        for headers in (
            {"Content-Type": "text/plain"},
            {"Content-Type": "application/x-www-form-urlencoded"},
            {"Content-Type": "multipart/form-data; boundary=x"},
        ):
            r = _post(world, route, b'{"name": "x"}', headers)
            assert r.status_code == 415, (route, headers, r.text)
            assert _shaped(world, r)["error"] == "unsupported_content_type"
    # JSON with parameters, and +json types, are JSON
    for name, kind in (
        ("charset-party", "application/json; charset=utf-8"),
        ("plus-json-party", "application/merge-patch+json"),
    ):
        body = f'{{"name": "{name}", "kind": "miner"}}'.encode()
        r = _post(world, "/v1/parties", body, {"Content-Type": kind})
        assert r.status_code == 201, (kind, r.text)
    # a body without any Content-Type is not taken for JSON (FastAPI's strict default)
    for headers in ({}, {"Content-Type": ""}):
        r = _post(world, "/v1/parties", b'{"name": "untyped", "kind": "miner"}', headers)
        assert "content-type" not in r.request.headers or headers
        assert r.status_code == 415, r.text


@pytest.mark.unit
def test_validation_names_every_bad_field(world: World) -> None:
    r = world.call("admin", "POST", "/v1/parties", json={"name": 7})
    assert r.status_code == 422
    body = _shaped(world, r)
    assert body["error"] == "invalid_input" and body["field"] == "name"
    assert {e["field"] for e in body["errors"]} == {"name", "kind"}
    missing = world.call("admin", "POST", "/v1/parties")  # no body at all
    assert missing.status_code == 422
    assert _shaped(world, missing)["field"] is None
    assert world.call("admin", "GET", "/v1/loans?limit=0").json()["field"] == "limit"
    assert _shaped(world, world.call("admin", "GET", "/v1/loans/x"))["field"] == "loan_id"


@pytest.mark.unit
def test_401_and_403_from_the_dependencies(world: World) -> None:
    r = world.call(None, "GET", "/v1/loans")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert _shaped(world, r)["error"] == "not_authenticated"
    r = world.client.get("/v1/loans", headers={"Authorization": "Bearer pc_nope"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = world.call("miner", "POST", "/v1/principals", json={"name": "x", "role": "auditor"})
    assert r.status_code == 403
    assert _shaped(world, r) == {
        "error": "role_not_allowed",
        "message": r.json()["message"],
        "field": None,
    }


@pytest.mark.unit
def test_an_http_exception_from_anywhere_is_answered_in_the_error_shape(world: World) -> None:
    r = world.call("admin", "GET", "/v1/probe/starlette")
    assert r.status_code == 409 and r.headers["x-reason"] == "probe"
    assert _shaped(world, r) == {"error": "conflict", "message": "already there", "field": None}
    r = world.call("admin", "GET", "/v1/probe/fastapi")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic"
    assert _shaped(world, r)["error"] == "not_authenticated"
    r = world.call("admin", "GET", "/v1/probe/too-large")
    assert r.status_code == 413 and _shaped(world, r)["error"] == "body_too_large"
    # A status no error class has keeps its HTTP name (no route could declare it).
    unchecked = TestClient(world.client.app, raise_server_exceptions=False)
    r = unchecked.get("/v1/probe/teapot", headers=world.h("admin"))
    assert r.status_code == 418
    assert r.json() == {"error": "im_a_teapot", "message": "I'm a Teapot", "field": None}


@pytest.mark.unit
def test_an_unexpected_failure_and_overload_say_nothing_more(world: World) -> None:
    r = world.call("admin", "GET", "/v1/probe/bug")
    assert r.status_code == 500
    assert _shaped(world, r) == {
        "error": "internal_error",
        "message": "internal error",
        "field": None,
    }
    r = world.call("admin", "GET", "/v1/probe/pool")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert _shaped(world, r)["error"] == "busy" and "QueuePool" not in r.text
