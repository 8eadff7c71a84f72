"""SQLite writers of different processes queue on the database's writer lock file:
taken at BEGIN IMMEDIATE, given back once COMMIT or ROLLBACK has returned, on every
path (a failed transaction, a connection dropped from the pool, a killed process)."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from custody.db.migrate import upgrade
from custody.db.models import Party, PartyKind
from custody.db.session import make_engine, transaction

pytestmark = pytest.mark.unit


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    url = f"sqlite:///{tmp_path / 'custody.db'}"
    engine = make_engine(url)
    upgrade(engine)
    yield url, engine
    engine.dispose()


def _names(engine: Engine) -> list[str]:
    with transaction(engine, write=False) as session:
        return list(session.exec(select(Party.name).order_by(col(Party.id))).all())


def _lock_is_free(url: str) -> bool:
    """Can another open file take the writer lock right now?"""
    fd = os.open(url.removeprefix("sqlite:///") + "-writer.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def test_the_lock_is_held_for_the_write_transaction_only(db: tuple[str, Engine]) -> None:
    url, engine = db
    assert _lock_is_free(url)
    with transaction(engine) as session:
        session.add(Party(name="p1", kind=PartyKind.miner))
        session.flush()
        assert not _lock_is_free(url)
        assert _names(engine) == []  # a read does not wait for it
    assert _lock_is_free(url)


def test_a_failed_write_transaction_gives_the_lock_back(db: tuple[str, Engine]) -> None:
    url, engine = db
    with pytest.raises(RuntimeError, match="boom"), transaction(engine) as session:
        session.add(Party(name="p1", kind=PartyKind.miner))
        session.flush()
        raise RuntimeError("boom")
    assert _lock_is_free(url)
    assert _names(engine) == []


def test_a_connection_dropped_mid_transaction_gives_the_lock_back(
    db: tuple[str, Engine],
) -> None:
    url, engine = db
    conn = engine.connect()
    conn.begin()
    conn.execute(
        text("INSERT INTO party (name, kind, created_at) VALUES ('p1', 'miner', '2026-01-01')")
    )
    assert not _lock_is_free(url)
    conn.invalidate()  # the pool closes the DBAPI connection without a commit
    conn.close()
    assert _lock_is_free(url)


def _hold_a_write(url: str, pipe: Connection, hold_s: float) -> None:
    engine = make_engine(url)
    with transaction(engine) as session:
        session.add(Party(name="first", kind=PartyKind.miner))
        session.flush()
        pipe.send("holding")
        time.sleep(hold_s)  # the transaction stays open: what the other writer waits for
        committing = time.monotonic()
    pipe.send(committing)
    engine.dispose()


def test_a_writer_of_another_process_waits_for_the_commit_then_writes(
    db: tuple[str, Engine],
) -> None:
    url, engine = db
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    holder = ctx.Process(target=_hold_a_write, args=(url, child, 0.3))
    holder.start()
    try:
        assert parent.poll(30) and parent.recv() == "holding"
        with transaction(engine) as session:
            session.add(Party(name="second", kind=PartyKind.miner))
            session.flush()  # begins: waits on the lock, no "database is locked"
            began = time.monotonic()
        committed_by_other: float = parent.recv()
        assert began >= committed_by_other  # it wrote after the other's transaction ended
    finally:
        holder.join(10)
    assert _names(engine) == ["first", "second"]


def _take_and_die(url: str, pipe: Connection) -> None:
    engine = make_engine(url)
    session_cm = transaction(engine)
    session = session_cm.__enter__()
    session.add(Party(name="doomed", kind=PartyKind.miner))
    session.flush()
    pipe.send("holding")
    time.sleep(60)  # killed before this ends


def test_a_killed_writer_leaves_no_lock_behind(db: tuple[str, Engine]) -> None:
    url, engine = db
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    doomed = ctx.Process(target=_take_and_die, args=(url, child))
    doomed.start()
    assert parent.poll(30) and parent.recv() == "holding"
    assert not _lock_is_free(url)
    doomed.kill()
    doomed.join(10)
    assert _lock_is_free(url)
    with transaction(engine) as session:
        session.add(Party(name="after", kind=PartyKind.miner))
    assert _names(engine) == ["after"]
