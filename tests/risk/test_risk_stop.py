"""The risk engine told to stop (SIGTERM to `custody risk`) leaves the loans it has not
reached for the next pass, and each loan it reached is whole: each loan's work is its own
transactions, however many loans a pass works on at once."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session
from support.offline import record_confirmed_deposit
from support.world import World, build_world

from custody.db.models import Loan
from custody.root import Root


def _state(engine: Engine, loan_id: int) -> str:
    with Session(engine) as s:
        loan = s.get(Loan, loan_id)
        assert loan is not None
        return str(loan.state)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_stopped_pass_leaves_the_rest_for_the_next_one(engine: Engine, concurrency: int) -> None:
    world: World = build_world(engine)
    loans = []
    for _ in range(3):
        loan_id = world.keyed_loan(principal_kopecks=1_500_000_00)["id"]
        loans.append(record_confirmed_deposit(world, loan_id, f"{loan_id:064x}"))
    price = world.call("bank_operator", "POST", "/v1/prices", json={"price_rub_per_btc": "4000000"})
    assert price.status_code == 201, price.text  # 75% LTV: a margin call for each
    r = world.call("bank_approver", "POST", f"/v1/prices/{price.json()['id']}/confirm")
    assert r.status_code == 200, r.text
    risk = Root.assemble(world.settings, engine=engine).risk_engine()
    risk.concurrency = concurrency  # loans at once: none is started once told to stop
    stop = threading.Event()
    seen: list[int] = []

    def progress() -> None:  # called before each loan: stop after the first is done
        seen.append(1)
        if len(seen) == 2:
            stop.set()

    report = risk.run_once(stop=stop, progress=progress)
    assert report.stopped and report.loans == 3
    assert report.margin_calls == [loans[0]]
    assert [_state(engine, i) for i in loans] == ["margin_call", "active", "active"]

    report = risk.run_once()  # the next start: the rest
    assert not report.stopped and sorted(report.margin_calls) == loans[1:]
    assert {_state(engine, i) for i in loans} == {"margin_call"}
