"""Engines and sessions for SQLite (embedded default) and PostgreSQL.

Two kinds of transaction. A write transaction (the default) on SQLite is BEGIN
IMMEDIATE: writers queue on the database lock at the start instead of failing at
commit, which is what makes check-then-insert sequences (unique key sets, address
indexes, the audit chain) safe there. A read transaction (`transaction(engine,
write=False)`, every GET of the API) takes no write lock: SQLite runs a plain deferred
BEGIN on its WAL snapshot, PostgreSQL a READ ONLY transaction, and both refuse a write
inside it, so a read can never queue behind a writer nor turn into one by mistake.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlmodel import Session, create_engine

# An execution option: connections of the engine's read-only twin carry it.
_READ_ONLY = "custody_read_only"
_READER = "_custody_reader"  # where an engine keeps its read-only twin

# Connections each process may open, and how long a request waits for one. A request
# holds a connection only while its own thread runs (see custody/api/deps.py), so the
# pool needs about one per API thread (custody.config: api_threads, db_pool_size);
# waiting longer than the timeout means overload, answered 503, not a queue.
DEFAULT_POOL_SIZE = 40
DEFAULT_MAX_OVERFLOW = 10
DEFAULT_POOL_TIMEOUT = 5.0


def make_engine(
    url: str,
    *,
    pool_size: int = DEFAULT_POOL_SIZE,
    max_overflow: int = DEFAULT_MAX_OVERFLOW,
    pool_timeout: float = DEFAULT_POOL_TIMEOUT,
) -> Engine:
    parsed = make_url(url)
    pool: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_timeout": pool_timeout,
    }
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            **({} if _in_memory(parsed) else pool),
        )
        _configure_sqlite(engine)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return create_engine(url, pool_pre_ping=True, **pool)


def _in_memory(url: URL) -> bool:
    """An in-memory SQLite database lives in one connection: no pool to size."""
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()
        record.info[_READ_ONLY] = False  # a new connection may write (query_only is off)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        read_only = bool(conn.get_execution_options().get(_READ_ONLY, False))
        if conn.info.get(_READ_ONLY, False) != read_only:  # switched only when it changes
            conn.exec_driver_sql(f"PRAGMA query_only={'ON' if read_only else 'OFF'}")
            conn.info[_READ_ONLY] = read_only
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def read_only_engine(engine: Engine) -> Engine:
    """The same pool, read-only transactions (made once per engine, then kept)."""
    reader: Engine | None = engine.__dict__.get(_READER)
    if reader is None:
        reader = engine.execution_options(**{_READ_ONLY: True, "postgresql_readonly": True})
        engine.__dict__[_READER] = reader
    return reader


def is_postgres(session: Session) -> bool:
    bind = session.get_bind()
    return bind.dialect.name == "postgresql"


@contextmanager
def transaction(engine: Engine, *, write: bool = True) -> Iterator[Session]:
    """One unit of work: commit once on success, roll back on any error. `write=False`
    for work that only reads: it takes no write lock and may not write."""
    bind = engine if write else read_only_engine(engine)
    with Session(bind, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
