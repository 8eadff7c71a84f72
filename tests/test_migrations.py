"""The Alembic migrations build exactly the schema the models describe, on both databases.

Other tests get copies of a database migrated once per session (tests/conftest.py); here
the migrations run for real, on an empty database, and the copies are shown to be apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel
from support.databases import copy_sqlite

from custody.db.migrate import current_revision, head_revision, upgrade
from custody.db.session import make_engine
from regtest.postgres import PostgresServer


@pytest.fixture(params=["sqlite", "postgres"])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty database (no schema, no Alembic version table) on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    eng = make_engine(url)
    yield eng
    eng.dispose()


def test_migrations_match_the_models(empty_engine: Engine) -> None:
    assert current_revision(empty_engine) is None
    upgrade(empty_engine)
    assert current_revision(empty_engine) == head_revision()
    with empty_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"


def test_the_engine_fixture_is_migrated(engine: Engine) -> None:
    assert current_revision(engine) == head_revision()


def _revision_rows(url: str) -> int:
    eng = make_engine(url)
    try:
        with eng.connect() as conn:
            count: int = conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one()
            return count
    finally:
        eng.dispose()


def _forget_the_revision(url: str) -> None:
    eng = make_engine(url)
    try:
        with eng.begin() as conn:
            conn.execute(text("DELETE FROM alembic_version"))
    finally:
        eng.dispose()


def test_sqlite_copies_of_the_template_are_apart(sqlite_template: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first.db", tmp_path / "second.db"
    copy_sqlite(sqlite_template, first)
    copy_sqlite(sqlite_template, second)
    _forget_the_revision(f"sqlite:///{first}")
    assert _revision_rows(f"sqlite:///{first}") == 0
    assert _revision_rows(f"sqlite:///{second}") == 1
    assert _revision_rows(f"sqlite:///{sqlite_template}") == 1


def test_postgres_copies_of_the_template_are_apart(
    postgres_database: Callable[..., str], postgres_server: PostgresServer, postgres_template: str
) -> None:
    first = postgres_database(template=postgres_template)
    second = postgres_database(template=postgres_template)
    _forget_the_revision(first)
    assert _revision_rows(first) == 0
    assert _revision_rows(second) == 1
    assert _revision_rows(postgres_server.url(postgres_template)) == 1
