"""Migrated databases for tests: built once, copied per test (see tests/conftest.py)."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine

from custody.db.migrate import upgrade
from custody.db.session import make_engine
from regtest.wait import wait_until


def migrate(url: str) -> None:
    """Upgrade the database at `url` to the latest revision and close every connection
    (PostgreSQL copies a template only while nobody is connected to it)."""
    engine = make_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


def copy_sqlite(template: Path, target: Path) -> None:
    """A consistent copy through SQLite's backup API (the template is in WAL mode, so its
    file alone need not hold every committed page)."""
    with closing(sqlite3.connect(template)) as source, closing(sqlite3.connect(target)) as copy:
        source.backup(copy)


def wait_for_a_lock_wait(engine: Engine, timeout: float = 20) -> None:
    """Until one session of this database waits on a lock (PostgreSQL). Polled in
    autocommit: inside one transaction pg_stat_activity is a snapshot, and a waiter that
    arrives after the first poll would never be seen."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    activity = text("SELECT state, wait_event_type, wait_event, query FROM pg_stat_activity")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watch:
        wait_until(
            lambda: watch.execute(query).scalar_one() == 1,
            timeout=timeout,
            message=lambda: str(watch.execute(activity).all()),
        )
