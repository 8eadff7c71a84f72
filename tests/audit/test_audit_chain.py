"""The hash-chained audit log, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from custody.audit.service import record, verify_chain
from custody.db.models import AuditEvent
from custody.db.session import transaction


def _ids(engine: Engine) -> list[int]:
    with Session(engine) as s:
        return list(s.exec(select(AuditEvent.id).order_by(col(AuditEvent.id))).all())


def test_events_commit_with_their_transaction_and_vanish_with_its_rollback(engine: Engine) -> None:
    with transaction(engine) as s:
        record(s, actor="t", action="a.one", data={"n": 1})
        record(s, actor="t", action="a.two")
    try:
        with transaction(engine) as s:
            record(s, actor="t", action="a.lost")
            s.flush()
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    with transaction(engine) as s:
        record(s, actor="t", action="a.three")
    assert _ids(engine) == [1, 2, 3]
    with Session(engine) as s:
        actions = s.exec(select(AuditEvent.action).order_by(col(AuditEvent.id))).all()
        assert list(actions) == ["a.one", "a.two", "a.three"]
        report = verify_chain(s)
    assert report.ok and report.events == 3


def test_concurrent_writers_never_fork_the_chain(engine: Engine) -> None:
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(10):
                with transaction(engine) as s:
                    record(s, actor=f"w{n}", action="concurrent", data={"i": i})
                    record(s, actor=f"w{n}", action="concurrent.second")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _ids(engine) == list(range(1, 81))
    with Session(engine) as s:
        assert verify_chain(s).ok


def test_an_edited_row_is_reported(engine: Engine) -> None:
    with transaction(engine) as s:
        for i in range(5):
            record(s, actor="t", action="x", data={"i": i})
    with engine.begin() as conn:
        conn.execute(text("UPDATE auditevent SET reason = 'edited' WHERE id = 3"))
    with Session(engine) as s:
        report = verify_chain(s)
    assert not report.ok and report.first_broken_id == 3
    assert "hash" in (report.problem or "")


def test_a_deleted_row_is_reported(engine: Engine) -> None:
    with transaction(engine) as s:
        for i in range(5):
            record(s, actor="t", action="x", data={"i": i})
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM auditevent WHERE id = 4"))
    with Session(engine) as s:
        report = verify_chain(s)
    assert not report.ok and report.first_broken_id == 4
    assert "missing" in (report.problem or "")
