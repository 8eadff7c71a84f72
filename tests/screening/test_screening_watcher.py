"""Screening with the real watcher against btcd: a deposit from a blocked address is held
out of collateral (the loan keeps waiting, LTV ignores it) and alerts the bank, until a
compliance officer clears it; a resolution by anyone else, or a second one, changes
nothing; a watcher that dies between the pending screening and its decision leaves it to
the next one."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from support.world import World, audit_actions, build_world

from custody.config import Settings
from custody.db.models import Deposit, ScreeningDecision, ScreeningStatus
from custody.risk.repository import confirmed_collateral_sats
from custody.root import Root
from custody.screening.service import Screener, ScreeningConfig
from custody.watcher.service import Watcher
from regtest.node import RegtestNode


@pytest.fixture
def world(engine: Engine) -> World:
    return build_world(engine)


def _loan(world: World, loan_id: int) -> dict[str, Any]:
    body: dict[str, Any] = world.call("bank_operator", "GET", f"/v1/loans/{loan_id}").json()
    return body


def _deposit(engine: Engine, txid: str) -> Deposit:
    with Session(engine) as s:
        return s.exec(select(Deposit).where(Deposit.txid == txid)).one()


def _decision(engine: Engine, txid: str) -> ScreeningDecision:
    with Session(engine) as s:
        return s.exec(select(ScreeningDecision).where(ScreeningDecision.txid == txid)).one()


def test_a_deposit_from_a_blocked_address_is_held_until_cleared(
    world: World, watcher: Watcher, regtest_node: RegtestNode
) -> None:
    faucet = regtest_node.faucet
    r = world.call(
        "compliance_officer",
        "POST",
        "/v1/screening-lists",
        json={"kind": "address", "value": faucet.address, "action": "block", "note": "OFAC"},
    )
    assert r.status_code == 201, r.text
    loan = world.keyed_loan(required_collateral_sats=50_000_000)
    txid, vout = faucet.pay(loan["collateral_address"], 50_000_000)
    regtest_node.mine(1)
    watcher.step()

    # Deep enough, but held: still pending, the loan waits, the risk engine counts nothing.
    dep = _deposit(world.engine, txid)
    assert (dep.state, dep.block_height is not None) == ("pending", True)
    assert _loan(world, loan["id"])["state"] == "awaiting_deposit"
    with Session(world.engine) as s:
        assert confirmed_collateral_sats(s, loan["id"]) == 0
    blocked = world.call("auditor", "GET", "/v1/screening-decisions?result=block").json()
    [decision] = [d for d in blocked if d["txid"] == txid]
    assert (decision["status"], decision["vout"], decision["score"]) == ("block", vout, 100)
    assert faucet.address in {i["address"] for i in decision["inputs"]}
    assert "OFAC" in decision["reasons"][0]
    actions = audit_actions(world.engine, loan_id=loan["id"])
    assert "screening.decided" in actions and "alert.screening_block" in actions
    assert "deposit.confirmed" not in actions

    # A forged or wrong-role resolution, and one naming no outcome, change nothing.
    path = f"/v1/screening-decisions/{decision['id']}/resolution"
    clear = {"outcome": "clear", "reason": "funds traced to a licensed exchange"}
    for who in ("miner", "bank_operator", "bank_approver", "auditor", "admin", None):
        assert world.call(who, "POST", path, json=clear).status_code in (401, 403), who
    assert world.call("compliance_officer", "POST", path, json={"outcome": "ok"}).status_code == 422
    watcher.step()
    assert _decision(world.engine, txid).status == ScreeningStatus.block
    assert _loan(world, loan["id"])["state"] == "awaiting_deposit"

    r = world.call("compliance_officer", "POST", path, json=clear)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cleared"
    replay = world.call("compliance_officer", "POST", path, json={**clear, "outcome": "block"})
    assert replay.status_code == 409 and replay.json()["error"] == "screening_already_resolved"
    assert _decision(world.engine, txid).status == ScreeningStatus.cleared

    watcher.step()  # no new block: the clearance alone lets it count
    assert _deposit(world.engine, txid).state == "confirmed"
    view = _loan(world, loan["id"])
    assert view["state"] == "active" and view["collateral"]["confirmed_sats"] == 50_000_000

    # The bank's filing keeps the block and says who cleared it.
    r = world.call("compliance_officer", "GET", "/v1/screening-decisions.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    [row] = [row for row in csv.DictReader(io.StringIO(r.text)) if row["txid"] == txid]
    assert (row["status"], row["result"], row["loan_id"]) == ("cleared", "block", str(loan["id"]))
    assert row["miner"] == "party-miner"
    assert row["amount_sats"] == "50000000" and faucet.address in row["input_addresses"]
    assert row["resolved_by"] == "compliance_officer:user-compliance_officer"
    assert row["resolution_reason"] == clear["reason"]
    assert world.call("miner", "GET", "/v1/screening-decisions.csv").status_code == 403


class _DiesWhileScreening(Screener):
    """The process dies while a provider that calls out (so asked with no transaction
    open, after the pending screening was committed) is asked."""

    def offline(self, lists: Any) -> bool:
        return False

    def screen_deposit(self, *args: Any, **kwargs: Any) -> Any:
        raise SystemExit("killed while the provider was asked")


class _DiesDecidingWithTheBlock(Screener):
    """The process dies while the bank's lists decide a deposit inside its block's
    transaction (nothing is called out, so nothing is committed pending first)."""

    def screen_deposit(self, *args: Any, **kwargs: Any) -> Any:
        raise SystemExit("killed while deciding with the block")


def _successor_step(engine: Engine, regtest_node: RegtestNode) -> int:
    """A fresh watcher's one step; returns how many screenings it decided."""
    settings = Settings(network="regtest")
    successor = Root.assemble(settings, engine=engine, node=regtest_node.rpc).watcher()
    successor.acquire()
    try:
        return successor.step().screened
    finally:
        successor.release()


def test_a_crash_between_pending_and_decided_is_retried(
    world: World, engine: Engine, watcher: Watcher, regtest_node: RegtestNode
) -> None:
    loan = world.keyed_loan(required_collateral_sats=20_000_000)
    txid, _ = regtest_node.faucet.pay(loan["collateral_address"], 20_000_000)
    regtest_node.mine(1)
    watcher.screener = _DiesWhileScreening(ScreeningConfig(), regtest_node.rpc)
    with pytest.raises(SystemExit):
        watcher.step()
    assert _decision(engine, txid).status == ScreeningStatus.pending
    assert _deposit(engine, txid).state == "pending"
    assert _loan(world, loan["id"])["state"] == "awaiting_deposit"
    watcher.release()

    assert _successor_step(engine, regtest_node) == 1
    assert _decision(engine, txid).status == ScreeningStatus.clear
    assert _deposit(engine, txid).state == "confirmed"
    assert _loan(world, loan["id"])["state"] == "active"
    assert audit_actions(engine, loan_id=loan["id"]).count("screening.decided") == 1


def test_a_deposit_decided_with_its_block_counts_in_that_step_and_a_crash_undoes_the_block(
    world: World, engine: Engine, watcher: Watcher, regtest_node: RegtestNode
) -> None:
    """With only the bank's lists (no provider calls out) a deposit is screened in its
    block's transaction: it counts in the same step, and a crash while deciding leaves
    nothing of the block (no deposit, no decision, the cursor where it was), which the
    next watcher applies once."""
    loan = world.keyed_loan(required_collateral_sats=20_000_000)
    txid, _ = regtest_node.faucet.pay(loan["collateral_address"], 20_000_000)
    watcher.screener = _DiesDecidingWithTheBlock(ScreeningConfig(), regtest_node.rpc)
    with pytest.raises(SystemExit):
        watcher.step()  # the mempool pass decides with its write: nothing of it is kept
    with Session(engine) as s:
        assert s.exec(select(Deposit).where(Deposit.txid == txid)).first() is None
        assert s.exec(select(ScreeningDecision)).first() is None
    regtest_node.mine(1)
    with pytest.raises(SystemExit):
        watcher.step()
    with Session(engine) as s:
        assert s.exec(select(Deposit).where(Deposit.txid == txid)).first() is None
        assert s.exec(select(ScreeningDecision)).first() is None
    assert _loan(world, loan["id"])["state"] == "awaiting_deposit"
    watcher.release()

    assert _successor_step(engine, regtest_node) == 1
    decision = _decision(engine, txid)
    assert (decision.status, decision.settle_pending) == (ScreeningStatus.clear, False)
    assert _deposit(engine, txid).state == "confirmed"
    assert _loan(world, loan["id"])["state"] == "active"
    actions = audit_actions(engine, loan_id=loan["id"])
    assert [actions.count(a) for a in ("deposit.seen", "screening.decided")] == [1, 1]
    assert actions.index("deposit.seen") < actions.index("screening.decided")


def test_an_unreachable_provider_holds_the_deposit_for_review(
    world: World, engine: Engine, watcher: Watcher, regtest_node: RegtestNode
) -> None:
    """Fail closed: a commercial provider that cannot be reached is `review`, never clear."""
    watcher.screener = Screener(
        ScreeningConfig(http_url="http://127.0.0.1:9", http_timeout=1.0), regtest_node.rpc
    )
    loan = world.keyed_loan(required_collateral_sats=20_000_000)
    txid, _ = regtest_node.faucet.pay(loan["collateral_address"], 20_000_000)
    regtest_node.mine(1)
    watcher.step()
    decision = _decision(engine, txid)
    assert decision.status == ScreeningStatus.review and "provider unavailable" in decision.reasons
    assert _loan(world, loan["id"])["state"] == "awaiting_deposit"
    queue = world.call("compliance_officer", "GET", "/v1/screening-decisions?result=review").json()
    assert decision.id in {d["id"] for d in queue}
