"""The fuzz run's own check works: against an API that writes and then refuses, the
Schemathesis run reports `refused_request_changes_nothing`."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert
from sqlalchemy.engine import Engine
from sqlmodel import select
from support import dbsnapshot
from support.dbsnapshot import changed_tables, snapshot
from support.signer_world import free_port

from custody.db.models import Party, PartyKind
from custody.db.session import transaction
from regtest.wait import wait_until

HERE = Path(__file__).parent


def test_snapshot_sees_a_changed_row_and_nothing_else(db_url: str, engine: Engine) -> None:
    with transaction(engine) as session:
        session.add(Party(name="p", kind=PartyKind.miner))
    before = snapshot(db_url)
    assert "party" in before and changed_tables(before, snapshot(db_url)) == []
    with transaction(engine) as session:
        party = session.exec(select(Party)).one()
        party.name = "q"
        session.add(party)
    assert changed_tables(before, snapshot(db_url)) == ["party"]


def test_a_read_with_no_commit_since_the_last_reuses_its_digests(
    db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    with transaction(engine) as session:
        session.add(Party(name="p", kind=PartyKind.miner))
    digests = 0
    kind = "_sqlite" if db_url.startswith("sqlite") else "_postgres"
    real: Callable[[str], dict[str, str]] = getattr(dbsnapshot, kind)

    def counted(where: str) -> dict[str, str]:
        nonlocal digests
        digests += 1
        return real(where)

    monkeypatch.setattr(dbsnapshot, kind, counted)
    first = snapshot(db_url)
    # PostgreSQL's token is the server's: autovacuum may move it now and then, so of a few
    # reads in a row at least one must have reused the digests (on SQLite, all of them).
    reuses = 0
    for _ in range(5):
        seen = digests
        assert snapshot(db_url) == first
        reuses += digests == seen
    assert reuses == 5 if db_url.startswith("sqlite") else reuses >= 1
    with transaction(engine) as session:
        session.add(Party(name="q", kind=PartyKind.arbiter))
    digested = digests
    assert changed_tables(first, snapshot(db_url)) == ["party"] and digests == digested + 1


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # SQLite: one writer at once
def test_a_write_begun_before_the_first_read_and_committed_after_is_seen(
    db_url: str, engine: Engine
) -> None:
    """The attack on a token of "the newest transaction id" alone: a writer that took its id
    before a later one committed leaves that number as it was when it commits itself."""
    with engine.connect() as early:
        early.execute(insert(Party).values(name="early", kind=PartyKind.miner))  # takes its id
        with transaction(engine) as session:  # a later writer, committed at once
            session.add(Party(name="later", kind=PartyKind.miner))
        before = snapshot(db_url)
        early.commit()
    assert changed_tables(before, snapshot(db_url)) == ["party"]


def test_a_refusal_that_wrote_a_row_fails_the_fuzz_run(tmp_path: Path) -> None:
    db = tmp_path / "leaky.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE thing (name TEXT)")
    port = free_port()
    env = {**os.environ, "LEAKY_DB": str(db)}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "leaky_app:app", "--app-dir", str(HERE),
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def up() -> bool:
            assert server.poll() is None, "the leaky app exited"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/openapi.json").is_success
            except httpx.TransportError:
                return False

        wait_until(up, timeout=30, message="the leaky app to answer")
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run",
             f"http://127.0.0.1:{port}/openapi.json", "--phases", "fuzzing",
             "--max-examples", "3", "--checks", "all", "--no-color"],
            env={**env, "SCHEMATHESIS_HOOKS": "st_hooks",
                 "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]),
                 "FUZZ_DB_URL": f"sqlite:///{db}"},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert run.returncode != 0, run.stdout
    assert "refused_request_changes_nothing" in run.stdout, run.stdout
    assert "changed the tables ['thing']" in run.stdout, run.stdout
