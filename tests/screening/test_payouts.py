"""Payout addresses are screened when a release or liquidation is built: a blocked one
refuses the request (409) and stays in the bank's report; one under review waits for a
compliance officer (one queue entry however often it is tried), then the request builds."""

from __future__ import annotations

import csv
import io

import pytest
from sqlalchemy.engine import Engine
from support.offline import funded_loan, offline_world
from support.world import World

from custody.db.migrate import upgrade
from custody.db.session import make_engine


@pytest.fixture
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    engine: Engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('payouts') / 'db.sqlite'}")
    upgrade(engine)
    return offline_world(engine)


def _list(world: World, address: str, action: str) -> None:
    r = world.call(
        "compliance_officer",
        "POST",
        "/v1/screening-lists",
        json={"kind": "address", "value": address, "action": action, "note": "court order 12/26"},
    )
    assert r.status_code == 201, r.text


def _release(world: World, loan_id: int) -> tuple[int, dict[str, object]]:
    r = world.call(
        "bank_operator", "POST", f"/v1/loans/{loan_id}/signing-requests", json={"action": "release"}
    )
    body: dict[str, object] = r.json()
    return r.status_code, body


def _return_address(world: World, loan_id: int) -> str:
    terms = world.call("bank_operator", "GET", f"/v1/loans/{loan_id}").json()["terms"]
    address: str = terms["miner_return_address"]
    return address


def test_a_blocked_return_address_refuses_the_release_and_stays_in_the_report(
    world: World,
) -> None:
    loan_id = funded_loan(world)
    address = _return_address(world, loan_id)
    _list(world, address, "block")
    status, body = _release(world, loan_id)
    assert (status, body["error"]) == (409, "payout_address_blocked")
    assert address in str(body["message"])
    assert world.call("bank_operator", "GET", f"/v1/loans/{loan_id}/signing-requests").json() == []
    blocked = world.call("compliance_officer", "GET", "/v1/screening-decisions?result=block")
    [decision] = [d for d in blocked.json() if d["address"] == address]
    assert (decision["purpose"], decision["status"], decision["subject"]) == (
        "miner_return",
        "block",
        "payout",
    )
    report = world.call("auditor", "GET", "/v1/screening-decisions.csv").text
    [row] = [r for r in csv.DictReader(io.StringIO(report)) if r["address"] == address]
    assert (row["loan_id"], row["status"]) == (str(loan_id), "block")
    assert "court order 12/26" in row["reasons"]


def test_a_return_address_under_review_waits_for_a_compliance_officer(world: World) -> None:
    loan_id = funded_loan(world)
    address = _return_address(world, loan_id)
    _list(world, address, "review")
    for _ in range(2):  # tried again: still one entry in the queue
        status, body = _release(world, loan_id)
        assert (status, body["error"]) == (409, "payout_address_under_review")
    queue = world.call("compliance_officer", "GET", "/v1/screening-decisions?result=review")
    [decision] = [d for d in queue.json() if d["address"] == address]
    r = world.call(
        "compliance_officer",
        "POST",
        f"/v1/screening-decisions/{decision['id']}/resolution",
        json={"outcome": "clear", "reason": "the miner's own exchange account, verified"},
    )
    assert r.status_code == 200, r.text
    status, body = _release(world, loan_id)
    assert status == 201, body
