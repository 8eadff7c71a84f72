"""Recording many screening outcomes at once (the watcher's pass), and deciding deposits
before they are inserted (`insert_deposit_screenings`): a replay records nothing twice,
and nothing is decided there when a provider would call out."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from support.world import World, audit_actions, build_world

from custody.db.models import AuditEvent, ScreeningDecision, ScreeningListEntry, ScreeningStatus
from custody.db.session import transaction
from custody.screening import repository as screening_repository
from custody.screening import service as screening
from custody.screening.providers import Decision, Result
from custody.screening.service import Screener, ScreeningConfig

ACTOR = "test"


@pytest.fixture
def world(engine: Engine) -> World:
    return build_world(engine)


def _rows(loan_id: int, count: int) -> list[dict[str, Any]]:
    return [
        screening.pending_deposit_row(loan_id, f"{i:02x}" * 32, i, 1_000_000 + i)
        for i in range(count)
    ]


def _pending(world: World, count: int) -> tuple[int, list[dict[str, Any]]]:
    loan_id = world.create_loan()["id"]
    rows = _rows(loan_id, count)
    with transaction(world.engine) as session:
        screening_repository.insert_decisions(session, rows)
    return loan_id, rows


def _ids(engine: Engine, loan_id: int) -> list[int]:
    with Session(engine) as s:
        query = select(ScreeningDecision.id).where(ScreeningDecision.loan_id == loan_id)
        return [i for i in s.exec(query.order_by(col(ScreeningDecision.id))).all() if i]


def test_many_outcomes_are_recorded_once_each_and_a_replay_records_nothing(
    world: World, engine: Engine
) -> None:
    loan_id, _ = _pending(world, 3)
    first, second, third = _ids(engine, loan_id)
    clear = Decision(Result.clear, 0, [], "builtin")
    review = Decision(Result.review, 60, ["on the review list"], "builtin")
    with transaction(engine) as session:
        [recorded_first] = screening.record_outcomes(session, {first: (review, ())}, ACTOR)
        assert recorded_first.id == first

    outcomes: dict[int, screening.Outcome] = {i: (clear, ()) for i in (first, second, third)}
    with transaction(engine) as session:
        recorded = screening.record_outcomes(session, outcomes, ACTOR)
        assert sorted(r.id for r in recorded if r.id) == [second, third]
    with transaction(engine) as session:
        assert screening.record_outcomes(session, outcomes, ACTOR) == []
    with Session(engine) as s:
        rows = {d.id: d for d in s.exec(select(ScreeningDecision)).all()}
    assert rows[first].status == ScreeningStatus.review  # the first answer stands
    assert [rows[i].status for i in (second, third)] == [ScreeningStatus.clear] * 2
    assert [rows[i].settle_pending for i in (first, second, third)] == [False, True, True]
    assert audit_actions(engine, loan_id=loan_id).count("screening.decided") == 3


def test_nothing_is_decided_at_insert_when_a_provider_would_call_out(
    world: World, engine: Engine
) -> None:
    loan_id = world.create_loan()["id"]
    with_http = Screener(ScreeningConfig(http_url="http://127.0.0.1:9"))
    with transaction(engine) as session:
        inserted = screening.insert_deposit_screenings(session, with_http, _rows(loan_id, 1), ACTOR)
        assert inserted == screening.DepositScreenings()
    with transaction(engine) as session:  # a list entry: the inputs must be read from the node
        entry = ScreeningListEntry(
            kind="txid", value="ff" * 32, action="block", note="x", created_by="test"
        )
        session.add(entry)
    with transaction(engine) as session:
        offline = Screener(ScreeningConfig())
        inserted = screening.insert_deposit_screenings(session, offline, _rows(loan_id, 2), ACTOR)
        assert inserted.decided == 0
    with Session(engine) as s:
        statuses = s.exec(select(ScreeningDecision.status)).all()
    assert list(statuses) == [ScreeningStatus.pending] * 2  # both inserted, still pending
    assert "screening.decided" not in audit_actions(engine, loan_id=loan_id)


def test_deposits_decided_at_insert_are_clear_audited_once_and_left_to_the_caller_to_settle(
    world: World, engine: Engine
) -> None:
    loan_id = world.create_loan()["id"]
    rows = _rows(loan_id, 2)
    with transaction(engine) as session:
        offline = Screener(ScreeningConfig())
        inserted = screening.insert_deposit_screenings(session, offline, rows, ACTOR)
        assert inserted == screening.DepositScreenings(decided=2, to_settle=(loan_id,))
    with transaction(engine) as session:  # the same deposits again (a replayed block)
        again = screening.insert_deposit_screenings(session, offline, _rows(loan_id, 2), ACTOR)
        assert again == screening.DepositScreenings()
    with Session(engine) as s:
        found = s.exec(select(ScreeningDecision).order_by(col(ScreeningDecision.id))).all()
        assert [(d.status, d.attempts, d.settle_pending) for d in found] == [
            (ScreeningStatus.clear, 1, False)
        ] * 2
        assert screening.any_to_settle(s) is False  # the caller settles them: no mark left
        query = select(AuditEvent.data).where(AuditEvent.action == "screening.decided")
        events = [json.loads(data) for data in s.exec(query.order_by(col(AuditEvent.id)))]
    assert [e["decision_id"] for e in events] == [d.id for d in found]  # once each
    assert {e["status"] for e in events} == {str(ScreeningStatus.clear)}
