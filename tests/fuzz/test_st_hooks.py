"""The fuzz run's own check works: against an API that writes and then refuses, the
Schemathesis run reports `refused_request_changes_nothing`."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
from sqlalchemy.engine import Engine
from sqlmodel import select
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
