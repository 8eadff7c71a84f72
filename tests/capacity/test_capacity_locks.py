"""Who waits for whom in the database, on SQLite and PostgreSQL: reads never wait for a
writer, the audit chain is locked only while it is written, migrations take turns, and
the loan list costs the same number of statements for one loan as for many."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, col, select
from support.custody_serve import Lender, ready_lender

from custody.api.app import create_app
from custody.audit.service import record, verify_chain
from custody.config import Settings
from custody.db.migrate import current_revision, head_revision, upgrade
from custody.db.models import AuditEvent, Party, PartyKind
from custody.db.session import make_engine, pools, read_only_engine, transaction

# Long enough for a loaded CI machine, far shorter than SQLite's 30 s busy timeout.
PROMPT = 10.0


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url="sqlite://"), engine)) as c:
        yield c


def _hold_write_lock(conn: Connection, loan_id: int) -> None:
    """What a writer holds mid-transaction: SQLite's database lock (its BEGIN IMMEDIATE
    and a write), on PostgreSQL the loan's row and the audit chain's lock too."""
    conn.execute(text("UPDATE loan SET updated_at = updated_at WHERE id = :id"), {"id": loan_id})
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": 0x5C0A_7D17})


def test_reads_answer_while_a_writer_holds_its_locks(engine: Engine, client: TestClient) -> None:
    lender = ready_lender(engine)
    loan_id = lender.loan_ids[0]
    h = lender.headers()
    with ThreadPoolExecutor(8) as pool:
        with engine.begin() as writer:  # a write transaction, left open
            _hold_write_lock(writer, loan_id)
            reads = [
                pool.submit(client.get, path, headers=h)
                for path in (
                    "/v1/me",
                    "/v1/loans",
                    f"/v1/loans/{loan_id}",
                    f"/v1/loans/{loan_id}/addresses",
                    "/v1/health",
                )
            ]
            assert [r.result(timeout=PROMPT).status_code for r in reads] == [200] * 5
            # a write does wait for the writer: the lock is really held
            hand_out: Future[Any] = pool.submit(
                client.post, f"/v1/loans/{loan_id}/addresses", headers=h
            )
            assert not hand_out.done()
            writer.rollback()
        answer = hand_out.result(timeout=PROMPT)
    assert answer.status_code == 201 and answer.json()["index"] == 1


def test_a_read_transaction_refuses_to_write_and_leaves_the_pool_writable(
    engine: Engine,
) -> None:
    with pytest.raises(DBAPIError), transaction(engine, write=False) as session:
        session.add(Party(name="by-a-read", kind=PartyKind.bank))
    for _ in range(3):  # the same pooled connections, read then write
        with transaction(engine, write=False) as session:
            session.exec(select(Party)).all()
        with transaction(engine) as session:
            session.add(Party(name=f"written-{_}", kind=PartyKind.bank))
    with transaction(engine, write=False) as session:
        assert len(session.exec(select(Party).where(col(Party.name).like("written-%"))).all()) == 3


def test_an_open_audited_transaction_does_not_hold_up_other_audited_writes(
    postgres_url: str,
) -> None:
    """PostgreSQL: the chain is locked only while a transaction writes its events at
    commit, not from its first event on. (SQLite serialises all writers anyway.)"""
    engine = make_engine(postgres_url)
    upgrade(engine)
    try:

        def quick() -> None:
            with transaction(engine) as session:
                record(session, actor="test", action="test.quick")

        with ThreadPoolExecutor(1) as pool, Session(engine) as slow:
            record(slow, actor="test", action="test.slow")
            slow.add(Party(name="slow", kind=PartyKind.bank))
            slow.flush()  # the slow transaction is open and has written
            try:
                pool.submit(quick).result(timeout=PROMPT)
            finally:
                slow.commit()
        with transaction(engine, write=False) as session:
            actions = session.exec(select(AuditEvent.action).order_by(col(AuditEvent.id))).all()
            chain = verify_chain(session)
        assert actions == ["test.quick", "test.slow"] and chain.ok, chain
    finally:
        engine.dispose()


def _empty_database(db_url: str, base: Path, round_: int) -> str:
    """A database with nothing in it: a new SQLite file, or PostgreSQL's public schema
    dropped and made again."""
    if db_url.startswith("sqlite"):
        return f"sqlite:///{base / f'round-{round_}.db'}"
    admin = make_engine(db_url)
    with admin.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    admin.dispose()
    return db_url


# A migrating process: imports done, it upgrades each database URL read from stdin the
# moment the line arrives, and says how it went.
_MIGRATOR = """
import sys
from custody.db.migrate import upgrade
from custody.db.session import make_engine
print("ready", flush=True)
for line in sys.stdin:
    engine = make_engine(line.strip())
    try:
        upgrade(engine)
        print("ok", flush=True)
    except Exception as exc:
        print("failed:", type(exc).__name__, str(exc).splitlines()[0], flush=True)
    finally:
        engine.dispose()
"""


@pytest.mark.process
def test_two_processes_upgrading_an_empty_database_at_once_both_succeed(
    db_url: str, tmp_path: Path
) -> None:
    """Every process migrates at start, so two replicas may do it at the same instant:
    the second waits for the first (it used to fail on PostgreSQL, 3 runs out of 3)."""
    migrators = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATOR],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for m in migrators:
            assert m.stdout is not None and m.stdout.readline().strip() == "ready"
        for round_ in range(5):
            url = _empty_database(db_url, tmp_path, round_)
            for m in migrators:  # the same URL to both, as close together as can be
                assert m.stdin is not None
                m.stdin.write(url + "\n")
                m.stdin.flush()
            outcomes = [m.stdout.readline().strip() for m in migrators if m.stdout]
            assert outcomes == ["ok", "ok"], f"round {round_}: {outcomes}"
            engine = make_engine(url)
            assert current_revision(engine) == head_revision()
            engine.dispose()
    finally:
        for m in migrators:
            if m.stdin is not None:
                m.stdin.close()
            m.wait(timeout=30)


class _Statements:
    """Counts the SQL statements an engine sends."""

    def __init__(self, engine: Engine) -> None:
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._one)
        reader = read_only_engine(engine)
        if reader.pool is not engine.pool:  # PostgreSQL: reads have an engine of their own
            event.listen(reader, "before_cursor_execute", self._one)

    def _one(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        # SQLite's PRAGMA query_only is switched only when a pooled connection goes from
        # writing to reading: it depends on which connection the pool hands out.
        if not statement.startswith("PRAGMA"):
            self.count += 1

    def during(self, call: Any) -> tuple[int, Any]:
        self.count = 0
        result = call()
        return self.count, result


def _listed(client: TestClient, lender: Lender, limit: int) -> Any:
    answer = client.get(f"/v1/loans?limit={limit}", headers=lender.headers())
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_the_loan_list_costs_the_same_statements_for_one_loan_as_for_thirty(
    engine: Engine, client: TestClient
) -> None:
    lender = ready_lender(engine, loans=30)
    statements = _Statements(engine)
    one, first = statements.during(lambda: _listed(client, lender, 1))
    thirty, page = statements.during(lambda: _listed(client, lender, 30))
    assert len(first) == 1 and len(page) == 30
    assert one == thirty <= 10, (one, thirty)
    # the batched page shows each loan exactly as its own GET does
    for loan in page:
        alone = client.get(f"/v1/loans/{loan['id']}", headers=lender.headers()).json()
        assert loan == alone
        assert [k["role"] for k in loan["keys"]] == ["miner", "bank", "arbiter"]
        assert loan["collateral_address"] and loan["collateral"]["required_sats"] == 50_000_000


def test_no_connection_in_time_is_a_503_not_a_wait(db_url: str, engine: Engine) -> None:
    """A request that cannot get a database connection within the pool's timeout is
    told to retry (503, Retry-After), instead of queueing for ever."""
    lender = ready_lender(engine)
    tiny = make_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    try:
        with TestClient(create_app(Settings(database_url="sqlite://"), tiny)) as c:
            with ExitStack() as busy_pools:  # the only connection of each pool, busy
                for pool in pools(tiny):
                    busy_pools.enter_context(closing(pool.connect()))
                busy = c.get("/v1/me", headers=lender.headers())
            assert busy.status_code == 503, busy.text
            assert busy.json()["error"] == "busy" and busy.headers["retry-after"] == "1"
            assert c.get("/v1/me", headers=lender.headers()).status_code == 200
    finally:
        tiny.dispose()
