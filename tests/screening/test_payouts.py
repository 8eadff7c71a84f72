"""Payout addresses are screened when a release or liquidation is built: a blocked one
refuses the request (409) and stays in the bank's report; one under review waits for a
compliance officer (one queue entry however often it is tried), then the request builds."""

from __future__ import annotations

import csv
import io
import json
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

import pytest
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from support.http_server import answer, local_http_server
from support.offline import funded_loan, offline_world
from support.world import World

from custody.auth.context import Context
from custody.db.migrate import upgrade
from custody.db.models import Principal, Role, ScreeningDecision
from custody.db.session import make_engine
from custody.errors import PayoutAddressBlocked
from custody.screening.service import Screener, ScreeningConfig, screen_payouts


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


class _Provider(BaseHTTPRequestHandler):
    """A commercial provider over HTTP: `block` for the addresses in `blocks`, else clear."""

    blocks: ClassVar[set[str]] = set()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        blocked = body["subject"]["address"] in _Provider.blocks
        verdict = {"result": "block" if blocked else "clear", "score": 90 if blocked else 1}
        answer(self, 200, json.dumps({**verdict, "reasons": ["provider list"]}).encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _payout_statuses(engine: Engine, loan_id: int, address: str) -> list[str]:
    with Session(engine) as session:
        rows = session.exec(
            select(ScreeningDecision)
            .where(ScreeningDecision.loan_id == loan_id, ScreeningDecision.address == address)
            .order_by(col(ScreeningDecision.id))
        ).all()
    return [f"{r.status}:{r.providers}" for r in rows]


def test_with_a_provider_over_http_a_block_is_kept_and_refuses_the_request(world: World) -> None:
    """With an HTTP provider (a call out, so asked between two transactions) a clear
    answer lets the request be built and a block refuses it, kept in the decisions as
    with the bank's lists alone; a block is not asked again."""
    loan_id = funded_loan(world)
    address = _return_address(world, loan_id)
    robot = Principal(
        id=None, name="auto", role=Role.risk_engine, party_id=None, key_hash="-", key_prefix="-"
    )
    ctx = Context(principal=robot, network="regtest")
    with local_http_server(_Provider) as url:
        config = ScreeningConfig(network="regtest", http_url=url, http_api_key=SecretStr("k"))
        screener = Screener(config)
        assert not screener.addresses_offline
        _Provider.blocks = set()
        screen_payouts(world.engine, ctx, loan_id, "release", screener)
        _Provider.blocks = {address}
        with pytest.raises(PayoutAddressBlocked, match=address):
            screen_payouts(world.engine, ctx, loan_id, "release", screener)
        with pytest.raises(PayoutAddressBlocked):  # a block is not screened again
            screen_payouts(world.engine, ctx, loan_id, "release", screener)
    assert _payout_statuses(world.engine, loan_id, address) == [
        "clear:builtin,http",
        "block:builtin,http",
    ]
