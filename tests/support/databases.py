"""Migrated databases for tests: built once, copied per test (see tests/conftest.py)."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from custody.db.migrate import upgrade
from custody.db.session import make_engine


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
