"""Suite-wide fixtures. The real parts (btcd, SoftHSM2, PostgreSQL) come from the
plugins below; a test that needs one fails, never skips, when it is missing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine

from custody.db.migrate import upgrade
from custody.db.session import make_engine

pytest_plugins = [
    "regtest.pytest_plugin",
    "regtest.pg_pytest_plugin",
    "hsm.pytest_plugin",
]


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Every database-touching test runs on both backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'custody.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'custody.db'}"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A migrated database: schema built by Alembic, exactly as in production."""
    eng = make_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()
