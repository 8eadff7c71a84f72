"""A digest of every table's rows, read straight from the database file or server (no
SQLAlchemy, no app code): what "nothing changed" is compared with after a refused request."""

from __future__ import annotations

import hashlib
import sqlite3
from typing import Any


def _digest(rows: list[Any]) -> str:
    return hashlib.sha256(repr(sorted(map(repr, rows))).encode()).hexdigest()


def _sqlite(path: str) -> dict[str, str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {t: _digest(conn.execute(f'SELECT * FROM "{t}"').fetchall()) for t in tables}
    finally:
        conn.close()


def _postgres(url: str) -> dict[str, str]:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)) as conn:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
            )
        ]
        return {t: _digest(conn.execute(f'SELECT * FROM "{t}"').fetchall()) for t in tables}


def snapshot(db_url: str) -> dict[str, str]:
    """Table name -> digest of its rows (in any order) for a SQLite file or a PostgreSQL URL."""
    if db_url.startswith("sqlite:///"):
        return _sqlite(db_url.removeprefix("sqlite:///"))
    return _postgres(db_url)


def changed_tables(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(t for t in before.keys() | after.keys() if before.get(t) != after.get(t))
