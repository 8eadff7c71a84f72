"""A digest of every table's rows, read straight from the database file or server (no
SQLAlchemy, no app code): what "nothing changed" is compared with after a refused request.

One connection is kept per database (a fuzz run reads it twice per request); each read is
its own transaction, so it sees every commit before it.

Digesting every table costs more as the audit log grows, so each read first asks the
database for a change token and reuses the last digests when it has not moved:

- SQLite: `PRAGMA data_version`, which changes whenever another connection commits.
- PostgreSQL: `pg_current_snapshot()`, which is the same text only if no transaction that
  was given an id (every one that writes a row is) ended in between: one that began before
  the first read is in its in-progress list, one that began after pushes its xmax.

The token is read before the digests, so a commit landing between the two only makes the
next read digest again; a token that moved for another database on the same server does too.
"""

from __future__ import annotations

import hashlib
import sqlite3
from typing import Any

_open: dict[str, Any] = {}
_last: dict[str, tuple[object, dict[str, str]]] = {}


def _digest(rows: list[Any]) -> str:
    return hashlib.sha256(repr(sorted(map(repr, rows))).encode()).hexdigest()


def _sqlite_conn(path: str) -> sqlite3.Connection:
    conn = _open.get(path)
    if conn is None:
        # Schemathesis runs its phases in threads of their own, one request at a time.
        conn = _open[path] = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, check_same_thread=False
        )
    return conn


def _sqlite_token(path: str) -> object:
    return _sqlite_conn(path).execute("PRAGMA data_version").fetchone()[0]


def _sqlite(path: str) -> dict[str, str]:
    conn = _sqlite_conn(path)
    tables = [
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    return {t: _digest(conn.execute(f'SELECT * FROM "{t}"').fetchall()) for t in tables}


def _postgres_conn(url: str) -> Any:
    import psycopg

    conn = _open.get(url)
    if conn is None:
        conn = _open[url] = psycopg.connect(
            url.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True
        )
    return conn


def _postgres_token(url: str) -> object:
    return _postgres_conn(url).execute("SELECT pg_current_snapshot()::text").fetchone()[0]


def _postgres(url: str) -> dict[str, str]:
    """One round trip: the server hashes each table's rows (as text, sorted)."""
    conn = _postgres_conn(url)
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
    sqlite = db_url.startswith("sqlite:///")
    where = db_url.removeprefix("sqlite:///") if sqlite else db_url
    token = _sqlite_token(where) if sqlite else _postgres_token(where)
    last = _last.get(db_url)
    if last is not None and last[0] == token:
        return dict(last[1])
    fresh = _sqlite(where) if sqlite else _postgres(where)
    _last[db_url] = (token, fresh)
    return dict(fresh)


def changed_tables(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(t for t in before.keys() | after.keys() if before.get(t) != after.get(t))
