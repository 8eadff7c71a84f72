"""A digest of every table's rows, read straight from the database file or server (no
SQLAlchemy, no app code): what "nothing changed" is compared with after a refused request.

One connection is kept per database (a fuzz run reads it twice per request); each read is
its own transaction, so it sees every commit before it."""

from __future__ import annotations

import hashlib
import sqlite3
from typing import Any

_open: dict[str, Any] = {}


def _digest(rows: list[Any]) -> str:
    return hashlib.sha256(repr(sorted(map(repr, rows))).encode()).hexdigest()


def _sqlite(path: str) -> dict[str, str]:
    conn = _open.get(path)
    if conn is None:
        # Schemathesis runs its phases in threads of their own, one request at a time.
        conn = _open[path] = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, check_same_thread=False
        )
    tables = [
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    return {t: _digest(conn.execute(f'SELECT * FROM "{t}"').fetchall()) for t in tables}


def _postgres(url: str) -> dict[str, str]:
    """One round trip: the server hashes each table's rows (as text, sorted)."""
    import psycopg

    conn = _open.get(url)
    if conn is None:
        conn = _open[url] = psycopg.connect(
            url.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True
        )
    tables = [
        name
        for (name,) in conn.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY 1"
        )
    ]
    query = " UNION ALL ".join(
        f"SELECT '{t}', md5(coalesce(string_agg(r::text, '|' ORDER BY r::text), '')) "
        f'FROM "{t}" AS r'
        for t in tables
    )
    return {name: digest for name, digest in conn.execute(query)}


def snapshot(db_url: str) -> dict[str, str]:
    """Table name -> digest of its rows (in any order) for a SQLite file or a PostgreSQL URL."""
    if db_url.startswith("sqlite:///"):
        return _sqlite(db_url.removeprefix("sqlite:///"))
    return _postgres(db_url)


def changed_tables(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(t for t in before.keys() | after.keys() if before.get(t) != after.get(t))
