"""Automatic liquidation end to end on regtest with the real SoftHSM2 bank signer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlmodel import Session, select
from support.lending import COLLATERAL, funded_loan, sign, the_psbt, upload
from support.world import World, audit_actions

from custody.chain.watcher import Watcher
from custody.db.models import AuditEvent
from custody.risk.engine import RiskEngine
from custody.risk.prices import Consensus, ManualPriceSource, MedianPriceSource
from custody.signing.service import FeePolicy
from hsm.pkcs11_backend import Pkcs11Signer
from pledge.amounts import sats_for_kopecks
from regtest.node import RegtestNode

DEBT = 1_500_000_00  # kopecks, no interest


class Board:
    """The bank desk's price (the real manual source) behind the real median: the test
    moves the price, or lets it go stale."""

    def __init__(self) -> None:
        self.desk = ManualPriceSource("desk")
        self.median = MedianPriceSource(
            [self.desk], max_age=timedelta(minutes=10), max_spread_bps=200
        )
        self.set(6_000_000)

    def set(self, price: int, *, age: timedelta = timedelta(0)) -> None:
        self.desk.set(Decimal(price), datetime.now(UTC) - age, "bank_operator:test")

    def consensus(self) -> Consensus:
        return self.median.consensus()


def _engine(world: World, node: RegtestNode, signer: Pkcs11Signer, board: Board) -> RiskEngine:
    return RiskEngine(
        world.engine,
        network="regtest",
        prices=board,
        chain=node.rpc,
        signer=signer,
        fees=FeePolicy(),
        daily_limit_sats=10 * 10**8,
    )


def _loan(world: World, lid: int) -> dict[str, Any]:
    out: dict[str, Any] = world.call("miner", "GET", f"/v1/loans/{lid}").json()
    return out


def test_margin_call_cure_then_automatic_liquidation(
    world: World, regtest_node: RegtestNode, watcher: Watcher, pkcs11_signer: Pkcs11Signer
) -> None:
    f = funded_loan(world, regtest_node, watcher, principal_kopecks=DEBT, interest_rate_bps=0)
    lid = f.loan["id"]
    board = Board()
    risk = _engine(world, regtest_node, pkcs11_signer, board)

    assert risk.run_once().margin_calls == []  # 50% LTV
    board.set(4_000_000)  # 75%: exactly the margin call
    assert risk.run_once().margin_calls == [lid]
    assert _loan(world, lid)["state"] == "margin_call"

    top_up = world.call("miner", "POST", f"/v1/loans/{lid}/addresses").json()["address"]
    regtest_node.faucet.pay(top_up, COLLATERAL // 2)
    regtest_node.mine(1)
    watcher.step()
    assert risk.run_once().cured == [lid]  # 1.5M / (0.75 BTC x 4M) = 50%
    assert _loan(world, lid)["state"] == "active"

    board.set(2_200_000, age=timedelta(minutes=11))  # a crash, but the quote is stale
    paused = risk.run_once()
    assert paused.paused and "stale" in paused.paused and paused.liquidations == []
    board.set(2_200_000)  # fresh: 1.5M / (0.75 x 2.2M) = 91%
    report = risk.run_once()
    [rid] = report.liquidations
    assert _loan(world, lid)["state"] == "liquidating"
    req = world.call("arbiter", "GET", f"/v1/signing-requests/{rid}").json()
    assert req["signed_seats"] == ["bank"], req  # the HSM signed under its policy
    assert req["evidence"]["risk"]["ltv_bps"] >= 9_000
    owed = sats_for_kopecks(DEBT, Decimal(2_200_000))
    bank_out, miner_out = req["outputs"]
    assert bank_out["amount_sats"] == owed

    r = upload(world, "arbiter", rid, sign(the_psbt(world, "arbiter", rid), f.roots["arbiter"]))
    assert r.status_code == 200 and r.json()["state"] == "broadcast", r.text
    regtest_node.mine(1)
    watcher.step()
    assert _loan(world, lid)["state"] == "liquidated"
    txid = req["unsigned_txid"]
    to_bank = regtest_node.rpc.get_tx_out(txid, 0, include_mempool=False)
    to_miner = regtest_node.rpc.get_tx_out(txid, 1, include_mempool=False)
    assert to_bank and to_bank["value_sat"] == owed
    assert to_miner and to_miner["value_sat"] == miner_out["amount_sats"]
    total_in = COLLATERAL + COLLATERAL // 2
    assert owed + miner_out["amount_sats"] + req["fee_sats"] == total_in

    actions = audit_actions(world.engine, loan_id=lid)
    for expected in ("loan.state_changed", "signer.signed", "signing_request.confirmed"):
        assert expected in actions, expected
    with Session(world.engine) as s:
        paused = s.exec(select(AuditEvent).where(AuditEvent.action == "risk.paused")).one()
        assert paused.reason and "stale" in paused.reason


def test_default_at_maturity_liquidates(
    world: World, regtest_node: RegtestNode, watcher: Watcher, pkcs11_signer: Pkcs11Signer
) -> None:
    f = funded_loan(
        world,
        regtest_node,
        watcher,
        principal_kopecks=DEBT,
        interest_rate_bps=0,
        maturity_at=(datetime.now(UTC) + timedelta(days=1)).isoformat(),
    )
    board = Board()
    risk = _engine(world, regtest_node, pkcs11_signer, board)
    assert risk.run_once().liquidations == []
    risk.clock = lambda: datetime.now(UTC) + timedelta(days=1, seconds=1)
    [rid] = risk.run_once().liquidations
    req = world.call("arbiter", "GET", f"/v1/signing-requests/{rid}").json()
    assert "default" in req["evidence"]["risk"]["reason"]
    assert _loan(world, f.loan["id"])["state"] == "liquidating"
