"""pytest fixtures for a real PostgreSQL: one server per xdist worker, one database per test.

Register with ``pytest_plugins = ["regtest.pg_pytest_plugin"]`` (top-level conftest)
or ``-p regtest.pg_pytest_plugin``. A missing PostgreSQL FAILS the test with a
message saying how to install it: a silently skipped database test is a test
that never runs in CI.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterator

import pytest

from regtest.postgres import PostgresError, PostgresServer

_counter = itertools.count()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A server for this worker's whole session (xdist gives each worker its own session).

    Set ``CUSTODY_TEST_KEEP_PG=1`` to keep the data dir and log for a post-mortem.
    """
    keep = os.environ.get("CUSTODY_TEST_KEEP_PG") == "1"
    try:
        server = PostgresServer(keep_data=keep)
        server.start()
    except PostgresError as exc:
        pytest.fail(f"PostgreSQL test server unavailable: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


def _database_name(request: pytest.FixtureRequest) -> str:
    """A database name unique in this session, readable in the server's log."""
    worker = _slug(os.environ.get("PYTEST_XDIST_WORKER", "main"))
    stem = _slug(request.node.name)[:40]
    return f"t_{worker}_{next(_counter)}_{stem}"[:63].rstrip("_")


MakeDatabase = Callable[..., str]


@pytest.fixture
def postgres_database(
    postgres_server: PostgresServer, request: pytest.FixtureRequest
) -> Iterator[MakeDatabase]:
    """`make(template=None) -> url`: databases of this test's own, empty or copies of a
    template database (cheap: see PostgresServer.create_database), dropped after it."""
    made: list[str] = []

    def make(*, template: str | None = None) -> str:
        name = _database_name(request)
        url = postgres_server.create_database(name, template=template)
        made.append(name)
        return url

    try:
        yield make
    finally:
        for name in made:
            postgres_server.drop_database(name)


@pytest.fixture
def postgres_url(postgres_database: MakeDatabase) -> str:
    """SQLAlchemy URL of a fresh, empty database, dropped after the test."""
    return postgres_database()
