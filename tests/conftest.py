"""Suite-wide fixtures. The real parts (btcd, SoftHSM2, PostgreSQL) come from the
plugins below; a test that needs one fails, never skips, when it is missing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine

from custody.chain.watcher import Watcher, WatcherConfig
from custody.db.migrate import upgrade
from custody.db.session import make_engine
from regtest.node import RegtestNode

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


@pytest.fixture
def watcher(engine: Engine, regtest_node: RegtestNode) -> Iterator[Watcher]:
    """A watcher on this test's database, starting at the next block (the database knows
    nothing older), with the default confirmation rules (1 below 1 BTC, 3 from it)."""
    w = Watcher(
        engine,
        regtest_node.rpc,
        config=WatcherConfig(start_height=regtest_node.rpc.get_block_count() + 1),
    )
    w.acquire()
    yield w
    w.release()
