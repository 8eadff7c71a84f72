"""PostgreSQL refusing a connection (no room left: "too many clients"; the server down or
restarting) is overload or an outage, not a fault of the request: the API answers 503
`busy` with `Retry-After`, never a 500, and names nothing of the database. Found under
400 requests/s over two replicas, whose pools together outgrew the server's
`max_connections`."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from support.world import World, build_world

from custody.config import Settings
from custody.db.migrate import upgrade
from custody.db.session import make_engine, refused_connection
from custody.root import Root


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: a connection to it is refused


def _assert_busy(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"] == "busy" and "retry" in body["message"]
    assert response.headers["retry-after"] == "1"
    for detail in ("psycopg", "127.0.0.1", "FATAL", "too many"):
        assert detail not in response.text


def test_a_database_that_is_not_there_answers_503_busy() -> None:
    url = f"postgresql+psycopg://custody:secret@127.0.0.1:{_closed_port()}/custody"
    app = Root.assemble(Settings(network="regtest"), engine=make_engine(url)).app()
    client = TestClient(app, raise_server_exceptions=False)
    _assert_busy(client.get("/v1/me", headers={"Authorization": "Bearer pk_" + "a" * 40}))


def test_postgres_with_no_room_for_this_connection_answers_503_busy(
    postgres_database: Callable[..., str],
) -> None:
    url = postgres_database()
    owner = make_engine(url)
    upgrade(owner)
    world: World = build_world(owner)
    role = f"full_{uuid.uuid4().hex[:12]}"
    with owner.begin() as c:  # a role with no connection left, as a full server has none
        c.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD 'pw' CONNECTION LIMIT 0"))
    limited = make_engine(
        make_url(url).set(username=role, password="pw").render_as_string(hide_password=False)
    )
    try:
        app = Root.assemble(world.settings, engine=limited).app()
        client = TestClient(app, raise_server_exceptions=False)
        for path in ("/v1/me", "/v1/loans"):
            _assert_busy(client.get(path, headers=world.h("admin")))
        # The same key through the owner's engine works: the key was never the problem.
        assert world.call("admin", "GET", "/v1/me").status_code == 200
    finally:
        limited.dispose()
        with owner.begin() as c:
            c.execute(text(f"DROP ROLE {role}"))
        owner.dispose()


def test_only_a_refused_connection_counts_not_an_error_during_a_statement() -> None:
    refused = OperationalError(None, None, psycopg.OperationalError("connection failed"))
    lost = OperationalError("COMMIT", {}, psycopg.OperationalError("server closed"))
    sqlite = OperationalError(None, None, Exception("database is locked"))
    assert refused_connection(refused)
    assert not refused_connection(lost)  # the COMMIT may or may not have been applied
    assert not refused_connection(sqlite)
    assert not refused_connection(ValueError("no"))


@pytest.mark.parametrize("statement", [None, "SELECT 1"])
def test_the_api_answers_500_for_an_error_during_a_statement(statement: str | None) -> None:
    """Not every OperationalError is overload: one raised by a statement stays a 500."""
    error = OperationalError(statement, {}, psycopg.OperationalError("server closed"))
    app = Root.assemble(Settings(network="regtest"), engine=make_engine("sqlite://")).app()

    def boom() -> None:
        raise error

    app.add_api_route("/v1/probe-db", boom, methods=["GET"])
    client = TestClient(app, raise_server_exceptions=False)
    response = client.get("/v1/probe-db")
    expected = 503 if statement is None else 500
    assert response.status_code == expected, response.text
    assert "server closed" not in response.text
