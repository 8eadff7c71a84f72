"""Recording many screening outcomes at once (the watcher's pass), and deciding deposits
inside the transaction that inserts them (`decide_inline`): a replay records nothing
twice, and nothing is decided inline when a provider would call out."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from support.world import World, audit_actions, build_world

from custody.db.models import ScreeningDecision, ScreeningListEntry, ScreeningStatus
from custody.db.session import transaction
from custody.screening import service as screening
from custody.screening.providers import Decision, Result
from custody.screening.service import Screener, ScreeningConfig

ACTOR = "test"


@pytest.fixture
def world(engine: Engine) -> World:
    return build_world(engine)


def _pending(world: World, count: int) -> tuple[int, list[dict[str, object]]]:
    loan_id = world.create_loan()["id"]
    rows = [
        screening.pending_deposit_row(loan_id, f"{i:02x}" * 32, i, 1_000_000 + i)
        for i in range(count)
    ]
    with transaction(world.engine) as session:
        screening.insert_pending(session, rows)
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
        assert screening.record_outcome(session, first, review, (), ACTOR) is not None

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


def test_inline_decisions_need_nothing_called_out(world: World, engine: Engine) -> None:
    loan_id, rows = _pending(world, 2)
    with_http = Screener(ScreeningConfig(http_url="http://127.0.0.1:9"))
    with transaction(engine) as session:
        assert screening.decide_inline(session, with_http, rows, ACTOR) == []
    with transaction(engine) as session:  # a list entry: the inputs must be read from the node
        entry = ScreeningListEntry(
            kind="txid", value="ff" * 32, action="block", note="x", created_by="test"
        )
        session.add(entry)
    with transaction(engine) as session:
        assert screening.decide_inline(session, Screener(ScreeningConfig()), rows, ACTOR) == []
    with Session(engine) as s:
        statuses = s.exec(select(ScreeningDecision.status)).all()
    assert list(statuses) == [ScreeningStatus.pending] * 2
    assert "screening.decided" not in audit_actions(engine, loan_id=loan_id)


def test_inline_decisions_with_empty_lists_are_clear_and_marked_to_settle(
    world: World, engine: Engine
) -> None:
    loan_id, rows = _pending(world, 2)
    with transaction(engine) as session:
        decided = screening.decide_inline(session, Screener(ScreeningConfig()), rows, ACTOR)
        assert [(d.status, d.settle_pending) for d in decided] == [
            (ScreeningStatus.clear, True)
        ] * 2
        assert screening.take_loans_of(decided) == [loan_id]
        assert not any(d.settle_pending for d in decided)
    with transaction(engine) as session:  # the same rows again: decided already
        assert screening.decide_inline(session, Screener(ScreeningConfig()), rows, ACTOR) == []
    assert audit_actions(engine, loan_id=loan_id).count("screening.decided") == 2
    with Session(engine) as s:
        assert screening.any_to_settle(s) is False
