"""Engines and sessions for SQLite (embedded default) and PostgreSQL.

Two kinds of transaction. A write transaction (the default) on SQLite is BEGIN
IMMEDIATE: writers queue on the database lock at the start instead of failing at
commit, which is what makes check-then-insert sequences (unique key sets, address
indexes, the audit chain) safe there. A read transaction (`transaction(engine,
write=False)`, every GET of the API) takes no write lock: SQLite runs a plain deferred
BEGIN on its WAL snapshot, PostgreSQL reads on a pool of sessions the server keeps read
only, in autocommit (`_postgres_reader`); both refuse a write inside it, so a read can
never queue behind a writer nor turn into one by mistake.

On an SQLite file, writers from different processes (several API workers, the watcher,
the risk engine) queue on an OS file lock next to the database before BEGIN IMMEDIATE,
and give it back once their COMMIT or ROLLBACK has returned. SQLite's own busy handler
sleeps 1, 2, 5, 10 ... 100 ms between tries: under load a writer that had lost a race
went on sleeping long after the lock was free. The file lock is tried every millisecond,
up to the same 30 s busy timeout.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import Pool
from sqlmodel import Session, create_engine

# An execution option: connections of the engine's read-only twin carry it.
_READ_ONLY = "custody_read_only"
_READER = "_custody_reader"  # where an engine keeps its read-only twin
_POOL = "_custody_pool"  # where an engine keeps its pool's sizes (for its twin)

# Connections each process may open, and how long a request waits for one. A request
# holds a connection only while its own thread runs (see custody/api/deps.py), so the
# pool needs about one per API thread (custody.config: api_threads, db_pool_size);
# waiting longer than the timeout means overload, answered 503, not a queue.
DEFAULT_POOL_SIZE = 40
DEFAULT_MAX_OVERFLOW = 10
DEFAULT_POOL_TIMEOUT = 5.0
SQLITE_BUSY_TIMEOUT = 30.0  # seconds a writer waits for the write lock, then fails
_WRITE_LOCK_POLL = 0.001


def make_engine(
    url: str,
    *,
    pool_size: int = DEFAULT_POOL_SIZE,
    max_overflow: int = DEFAULT_MAX_OVERFLOW,
    pool_timeout: float = DEFAULT_POOL_TIMEOUT,
) -> Engine:
    """An engine whose errors never show bound parameters (`hide_parameters`): a failed
    statement's text is logged with its traceback, and its parameters may be secrets (a
    webhook's HMAC key, an API key's hash)."""
    parsed = make_url(url)
    pool: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_timeout": pool_timeout,
    }
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT},
            hide_parameters=True,
            **({} if _in_memory(parsed) else pool),
        )
        _configure_sqlite(engine)
        if not _in_memory(parsed):
            _WriteLocks(f"{parsed.database}-writer.lock").install(engine)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    engine = create_engine(url, pool_pre_ping=True, hide_parameters=True, **pool)
    engine.__dict__[_POOL] = pool
    return engine


def _in_memory(url: URL) -> bool:
    """An in-memory SQLite database lives in one connection: no pool to size."""
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


class WriteLockTimeout(RuntimeError):
    """Another writer held the database's write lock for the whole busy timeout."""


class _WriteLocks:
    """One open file per connection (flock is per open file, so threads of one process
    queue on it as processes do), locked from BEGIN IMMEDIATE until the DBAPI COMMIT or
    ROLLBACK returns: on every path, since the pool's reset goes through the dialect's
    rollback too. A killed process's locks go with its files."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fds: dict[int, int] = {}  # id(DBAPI connection) -> its lock file
        self._held: set[int] = set()
        self._guard = threading.Lock()

    def install(self, engine: Engine) -> None:
        event.listen(engine, "connect", self._opened)
        event.listen(engine.pool, "close", self._closed)
        event.listen(engine.pool, "close_detached", self._closed_detached)
        dialect = engine.dialect  # this engine's own instance: the wrappers stay local
        dialect.do_commit = self._after(dialect.do_commit)  # type: ignore[method-assign,assignment]
        dialect.do_rollback = self._after(dialect.do_rollback)  # type: ignore[method-assign,assignment]

    def take(self, dbapi_connection: Any) -> None:
        """Wait for the write lock (the caller then runs BEGIN IMMEDIATE)."""
        key = id(_raw(dbapi_connection))
        fd = self._fds.get(key)
        if fd is None or key in self._held:
            return
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise WriteLockTimeout(
                        f"database is locked: no write lock within {SQLITE_BUSY_TIMEOUT:.0f} s"
                    ) from None
                time.sleep(_WRITE_LOCK_POLL)
        with self._guard:
            self._held.add(key)

    def give_back(self, dbapi_connection: Any) -> None:
        key = id(_raw(dbapi_connection))
        with self._guard:
            if key not in self._held:
                return
            self._held.discard(key)
        fcntl.flock(self._fds[key], fcntl.LOCK_UN)

    def _after(self, end: Callable[[Any], None]) -> Callable[[Any], None]:
        def ended(dbapi_connection: Any) -> None:
            try:
                end(dbapi_connection)
            finally:
                self.give_back(dbapi_connection)

        return ended

    def _opened(self, dbapi_connection: Any, record: Any) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with self._guard:
            self._fds[id(dbapi_connection)] = fd
        record.info[_WRITE_LOCKS] = self

    def _closed(self, dbapi_connection: Any, record: Any) -> None:
        self._closed_detached(dbapi_connection)

    def _closed_detached(self, dbapi_connection: Any) -> None:
        self.give_back(dbapi_connection)
        with self._guard:
            fd = self._fds.pop(id(dbapi_connection), None)
        if fd is not None:
            os.close(fd)


def _raw(connection: Any) -> Any:
    """The DBAPI connection itself: the dialect's commit and rollback get the pool's
    proxy of it."""
    return getattr(connection, "dbapi_connection", connection)


_WRITE_LOCKS = "custody_write_locks"  # connection record info: the engine's _WriteLocks


def _switch_to_wal(cursor: Any) -> None:
    """WAL mode, retried while another process holds the database: switching a new
    database's journal needs its exclusive lock, and SQLite refuses that at once (no busy
    handler, a reader may not wait for a writer) while a second process is migrating it."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(_WRITE_LOCK_POLL)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()
        record.info[_READ_ONLY] = False  # a new connection may write (query_only is off)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        read_only = bool(conn.get_execution_options().get(_READ_ONLY, False))
        if conn.info.get(_READ_ONLY, False) != read_only:  # switched only when it changes
            conn.exec_driver_sql(f"PRAGMA query_only={'ON' if read_only else 'OFF'}")
            conn.info[_READ_ONLY] = read_only
        if read_only:
            conn.exec_driver_sql("BEGIN")
            return
        locks: _WriteLocks | None = conn.connection.info.get(_WRITE_LOCKS)
        dbapi_connection = conn.connection.dbapi_connection
        if locks is not None:
            locks.take(dbapi_connection)
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            if locks is not None:
                locks.give_back(dbapi_connection)
            raise


_readers_made = threading.Lock()


def read_only_engine(engine: Engine) -> Engine:
    """The engine's read-only twin, made once per engine, then kept. SQLite: the same
    pool, each read a deferred BEGIN with `query_only` on. PostgreSQL: a pool of its own
    (`_postgres_reader`)."""
    reader: Engine | None = engine.__dict__.get(_READER)
    if reader is not None:
        return reader
    with _readers_made:
        reader = engine.__dict__.get(_READER)
        if reader is None:
            if engine.dialect.name == "postgresql" and _POOL in engine.__dict__:
                reader = _postgres_reader(engine, engine.__dict__[_POOL])
            else:
                reader = engine.execution_options(**{_READ_ONLY: True, "postgresql_readonly": True})
            engine.__dict__[_READER] = reader
    return reader


def _postgres_reader(engine: Engine, pool: dict[str, Any]) -> Engine:
    """Reads on PostgreSQL: sessions that the server itself keeps read-only
    (`default_transaction_read_only`, set as the connection starts, so a write fails
    with "cannot execute ... in a read-only transaction") and that run in autocommit.

    Under READ COMMITTED each statement sees its own snapshot whether or not a BEGIN
    surrounds it, so the BEGIN READ ONLY and the COMMIT or ROLLBACK around every read
    bought nothing but two round trips: a simple GET made eleven (measured with
    `log_statement=all`), now seven. Disposed with its engine."""
    url = engine.url
    options = "-c default_transaction_read_only=on"
    given = url.query.get("options")
    if isinstance(given, str) and given:
        options = f"{given} {options}"
    reader = create_engine(
        url.render_as_string(hide_password=False),
        pool_pre_ping=True,
        hide_parameters=True,
        isolation_level="AUTOCOMMIT",
        connect_args={"options": options},
        **pool,
    )
    event.listen(engine, "engine_disposed", lambda _engine: reader.dispose())
    return reader


def pools(engine: Engine) -> list[Pool]:
    """The connection pools an engine's work takes connections from: its own, and on
    PostgreSQL its read-only twin's."""
    reader = read_only_engine(engine)
    return [engine.pool] if reader.pool is engine.pool else [engine.pool, reader.pool]


def refused_connection(exc: BaseException) -> bool:
    """Whether `exc` is PostgreSQL refusing or failing a new connection (no room: "too
    many clients"; the server down or restarting): raised before the transaction sent
    anything, so it changed nothing (an earlier, committed transaction of the same request
    stands, as for any 503; the request's own checks refuse a replay of it). An error
    during a statement is not one: a lost COMMIT may or may not have been applied."""
    if not isinstance(exc, sa_exc.OperationalError) or exc.statement is not None:
        return False
    return type(exc.orig).__module__.startswith("psycopg")


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
