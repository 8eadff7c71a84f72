"""Suite-wide fixtures. The real parts (btcd, SoftHSM2, PostgreSQL) come from the
plugins below; a test that needs one fails, never skips, when it is missing.

Every test is marked by the real parts it needs (see `pytest_collection_modifyitems`):
`node`, `hsm`, `postgres`, or `unit` when it needs none, so `pytest -m unit` is a fast
run with no btcd, no SoftHSM2 token and no PostgreSQL server."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from support.databases import copy_sqlite, migrate

from custody.config import Settings
from custody.db.session import make_engine
from custody.logging import configure_structlog
from custody.root import Root
from custody.watcher.service import Watcher
from regtest.node import RegtestNode
from regtest.postgres import PostgresServer


def pytest_configure(config: pytest.Config) -> None:
    """The service's own structlog set-up in every test process, as in production: its
    default renders for a terminal and drew every 500's traceback with Rich, most of the
    CPU of a test that provokes a few (std logging is left to pytest's capture)."""
    configure_structlog()


pytest_plugins = [
    "regtest.pytest_plugin",
    "regtest.pg_pytest_plugin",
    "regtest.hsm_pytest_plugin",
]

# The fixture that starts each real part. Everything needing one depends on it
# (`faucet`, `regtest_fund`, `watcher` on `regtest_node`; `pkcs11_signer`, `bank_signer`,
# `signer_world`, the signer worlds on `softhsm_token`; `postgres_url` on
# `postgres_server`), and `item.fixturenames` is the test's whole fixture closure.
REAL_PART_FIXTURES: Mapping[str, str] = {
    "node": "regtest_node",
    "hsm": "softhsm_token",
    "postgres": "postgres_server",
    "browser": "console_browser",  # Chromium, for the console's tests (tests/console/)
}
# A fixture parametrized with this value asks for PostgreSQL at run time
# (`request.getfixturevalue`), which the static closure cannot see: `db_url` (and so
# `engine`, `world`, ...) and tests/api/test_authorization.py's `world`.
POSTGRES_PARAM = "postgres"
# Real parts no fixture stands for, given by an explicit mark: `process` for a test that
# starts the service's own commands as OS processes (seconds each, so never in `-m unit`).
MARKED_PARTS = frozenset({"process"})
REAL_PARTS = frozenset(REAL_PART_FIXTURES) | MARKED_PARTS


def real_parts(item: pytest.Item) -> set[str]:
    """The real parts `item` needs, from its fixtures and its fixtures' parameters."""
    names = set(getattr(item, "fixturenames", ()))
    parts = {part for part, fixture in REAL_PART_FIXTURES.items() if fixture in names}
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        defs = item._fixtureinfo.name2fixturedefs  # type: ignore[attr-defined]
        for name, value in callspec.params.items():
            parametrized_fixture = name in defs and defs[name][-1].params is not None
            if parametrized_fixture and value == POSTGRES_PARAM:
                parts.add("postgres")
    return parts


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test `node`/`hsm`/`postgres`/`browser` by what it needs, else `unit`.

    Explicit marks stay (a test that starts a process itself, without the fixtures,
    says so with a mark); a test explicitly marked `unit` that needs a real part is an
    error, since `-m unit` would then start it.
    """
    wrong: list[str] = []
    for item in items:
        explicit = {m.name for m in item.iter_markers() if m.name in REAL_PARTS | {"unit"}}
        needs = real_parts(item) | (explicit & REAL_PARTS)
        if "unit" in explicit and needs:
            wrong.append(f"{item.nodeid} (needs {', '.join(sorted(needs))})")
            continue
        for part in sorted(needs - explicit):
            item.add_marker(part)
        if not needs and "unit" not in explicit:
            item.add_marker("unit")
    if wrong:
        raise pytest.UsageError("marked unit but needs a real part:\n  " + "\n  ".join(wrong))


# Alembic builds the schema once per test process (xdist worker) and backend, into a
# template; each test gets its own copy of it: a file copy for SQLite, CREATE DATABASE ...
# TEMPLATE for PostgreSQL. tests/test_migrations.py runs the migrations on empty databases.
@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated by Alembic once; tests get copies of it, never the file itself."""
    path = tmp_path_factory.mktemp("template") / "custody.db"
    migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_template(postgres_server: PostgresServer) -> str:
    """A PostgreSQL database migrated by Alembic, left with no connection so it can be copied."""
    name = f"template_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
    migrate(postgres_server.create_database(name))
    return name


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database of this test's own, at the latest migration; every database-touching test
    runs on both backends."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("db") / "custody.db"
        copy_sqlite(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    # postgres_database drops what it made after the test
    make: Callable[..., str] = request.getfixturevalue("postgres_database")
    return make(template=request.getfixturevalue("postgres_template"))


@pytest.fixture
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'custody.db'}"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A migrated database: schema built by Alembic, exactly as in production (once per
    session, copied per test)."""
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def watcher(engine: Engine, regtest_node: RegtestNode) -> Iterator[Watcher]:
    """A watcher on this test's database, starting at the next block (the database knows
    nothing older), with the default confirmation rules (1 below 1 BTC, 3 from it)."""
    settings = Settings(
        network="regtest", watch_start_height=regtest_node.rpc.get_block_count() + 1
    )
    w = Root.assemble(settings, engine=engine, node=regtest_node.rpc).watcher()
    w.acquire()
    yield w
    w.release()
