"""Automatic liquidation end to end on regtest with the real bank's signer (SoftHSM2): the
risk engine's ladder proposes, the signer's own valuation (its price feed, its records of
the loan, its clock) decides, prices and signs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlmodel import Session, select
from support.lending import COLLATERAL, funded_loan, sign, the_psbt, upload
from support.signer_world import SignerWorld
from support.world import World, audit_actions

from custody.db.models import AuditEvent, KeyRole, LoanKey
from custody.risk.engine import RiskEngine
from custody.risk.prices import Consensus, HttpJsonPriceSource, MedianPriceSource
from custody.root import Root
from custody.watcher.service import Watcher
from hsm.client import InProcessTransport
from pledge.amounts import sats_for_kopecks
from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed

DEBT = 1_500_000_00  # kopecks, no interest


class Board:
    """The BTC/RUB feed the bank's signer reads, read by the service's real median too
    (each through its own HTTP price source): the test moves the price, or lets it go
    stale, for both at once. `offset` moves the service's price clock (and the feed's
    timestamps with it) for a test that lets time pass."""

    def __init__(self, feed: PriceFeed) -> None:
        self.feed = feed
        self.offset = timedelta(0)
        source = HttpJsonPriceSource(
            "feed", feed.url, field_path="data.price", time_path="data.time", clock=self.now
        )
        self.median = MedianPriceSource(
            [source], max_age=timedelta(minutes=10), max_spread_bps=200, clock=self.now
        )
        self.set(6_000_000)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def set(self, price: int, *, age: timedelta = timedelta(0)) -> None:
        self.price = price
        fresh = not age and not self.offset  # None: the feed dates each answer "now"
        self.feed.set(str(price), None if fresh else self.now() - age)

    def consensus(self) -> Consensus:
        return self.median.consensus()


def _engine(world: World, node: RegtestNode, signer: SignerWorld, board: Board) -> RiskEngine:
    parts = Root.assemble(
        world.settings, engine=world.engine, node=node.rpc, signer=signer.client, prices=board
    )
    return parts.risk_engine()


def _loan(world: World, lid: int) -> dict[str, Any]:
    out: dict[str, Any] = world.call("miner", "GET", f"/v1/loans/{lid}").json()
    return out


@contextmanager
def time_passes(
    delta: timedelta, board: Board, risk: RiskEngine, signer: SignerWorld
) -> Iterator[None]:
    """`delta` later for everyone: the feed dates its quotes then, the service's price
    median and risk engine judge by then, and so does the signer (in process: its one
    clock), which decides maturity from its registered terms by its own clock."""
    transport = signer.client.transport
    assert isinstance(transport, InProcessTransport)
    core = transport.core
    real, real_risk = core.clock, risk.clock
    board.offset = delta
    board.set(board.price)
    core.clock = lambda: real() + delta
    risk.clock = lambda: real_risk() + delta
    try:
        yield
    finally:
        core.clock, risk.clock = real, real_risk
        board.offset = timedelta(0)
        board.set(board.price)


def test_margin_call_cure_then_automatic_liquidation(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    bank_signer: SignerWorld,
    feed: PriceFeed,
) -> None:
    f = funded_loan(world, regtest_node, watcher, principal_kopecks=DEBT, interest_rate_bps=0)
    lid = f.loan["id"]
    board = Board(feed)
    risk = _engine(world, regtest_node, bank_signer, board)

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
    before = bank_signer.bank_signatures()
    report = risk.run_once()
    [rid] = report.liquidations
    assert report.errors == {}
    assert _loan(world, lid)["state"] == "liquidating"
    req = world.call("arbiter", "GET", f"/v1/signing-requests/{rid}").json()
    assert req["signed_seats"] == ["bank"], req  # the signer signed on its own valuation
    assert req["signer_statement_id"] is None  # nobody's approval: the signer decided
    assert bank_signer.bank_signatures() == before + 2  # one per input: deposit and top-up
    assert req["evidence"]["risk"]["ltv_bps"] >= 9_000
    # priced by the signer's valuation (its feed, its debt), which it cites by id
    assert req["evidence"]["price_source"].startswith("bank signer valuation")
    assert req["evidence"]["valuation_id"] and req["evidence"]["price_rub_per_btc"] == "2200000"
    assert req["evidence"]["debt_kopecks"] == DEBT
    assert any("LTV" in why for why in req["evidence"]["risk"]["signer_reasons"])
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
    assert "risk.signer_disagrees" not in actions
    with Session(world.engine) as s:
        paused_event = s.exec(select(AuditEvent).where(AuditEvent.action == "risk.paused")).one()
        assert paused_event.reason and "stale" in paused_event.reason


def test_default_at_maturity_liquidates(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    bank_signer: SignerWorld,
    feed: PriceFeed,
) -> None:
    """The service's clock alone cannot call a default: the signer decides maturity from
    the terms it registered, by its own clock."""
    f = funded_loan(
        world,
        regtest_node,
        watcher,
        principal_kopecks=DEBT,
        interest_rate_bps=0,
        maturity_at=(datetime.now(UTC) + timedelta(days=1)).isoformat(),
    )
    lid = f.loan["id"]
    board = Board(feed)  # 50% LTV: only the maturity can end this loan
    risk = _engine(world, regtest_node, bank_signer, board)
    assert risk.run_once().liquidations == []
    later = timedelta(days=1, seconds=1)

    # Only the service's risk clock runs ahead (its prices, and the signer, are today).
    risk.clock = lambda: datetime.now(UTC) + later
    before = bank_signer.bank_signatures()
    report = risk.run_once()
    assert report.liquidations == [] and report.errors == {}
    assert _loan(world, lid)["state"] == "active"
    assert bank_signer.bank_signatures() == before
    with Session(world.engine) as s:
        disagrees = s.exec(
            select(AuditEvent).where(
                AuditEvent.loan_id == lid, AuditEvent.action == "risk.signer_disagrees"
            )
        ).one()
        assert disagrees.decision == "not_liquidated"
        assert (disagrees.reason or "").endswith(": ok"), disagrees.reason  # its verdict
    assert world.call("arbiter", "GET", f"/v1/loans/{lid}/signing-requests").json() == []

    risk.clock = lambda: datetime.now(UTC)
    with time_passes(later, board, risk, bank_signer):  # past maturity for the signer too
        report = risk.run_once()
    assert report.errors == {} and report.paused is None, report
    [rid] = report.liquidations
    req = world.call("arbiter", "GET", f"/v1/signing-requests/{rid}").json()
    assert "default" in req["evidence"]["risk"]["reason"]
    assert any("maturity" in why for why in req["evidence"]["risk"]["signer_reasons"])
    assert req["signed_seats"] == ["bank"]
    assert bank_signer.bank_signatures() == before + 1
    assert _loan(world, lid)["state"] == "liquidating"


def test_a_crash_liquidates_several_loans_at_once_each_once(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    bank_signer: SignerWorld,
    feed: PriceFeed,
) -> None:
    """A pass working on three loans at a time (`risk_concurrency`) over five crashed
    loans: each gets exactly one liquidation, signed once, and the report lists them in
    the loans' order; the one whose key the signer does not know is refused by it alone;
    the next pass finds nothing more to do."""
    loans = [
        funded_loan(world, regtest_node, watcher, principal_kopecks=DEBT, interest_rate_bps=0)
        for _ in range(5)
    ]
    lids = [f.loan["id"] for f in loans]
    board = Board(feed)
    risk = _engine(world, regtest_node, bank_signer, board)
    risk.concurrency = 3
    assert risk.run_once().liquidations == []  # 50% LTV
    with Session(world.engine) as s:  # the signer never registered this loan's key
        key = s.exec(
            select(LoanKey).where(LoanKey.loan_id == lids[2], LoanKey.role == KeyRole.bank)
        ).one()
        key.hsm_key_label = "not-a-key-the-signer-holds"
        s.add(key)
        s.commit()
    board.set(2_000_000)  # 1.5M / (0.5 BTC x 2M) = 150%: every loan
    before = bank_signer.bank_signatures()
    report = risk.run_once()
    assert report.errors == {} and len(report.liquidations) == 4, report
    by_loan = {
        world.call("arbiter", "GET", f"/v1/signing-requests/{rid}").json()["loan_id"]: rid
        for rid in report.liquidations
    }
    assert list(by_loan) == [lid for lid in lids if lid != lids[2]]  # the loans' order
    assert [by_loan[lid] for lid in by_loan] == report.liquidations
    assert bank_signer.bank_signatures() == before + 4
    for lid in by_loan:
        assert _loan(world, lid)["state"] == "liquidating"
        requests = world.call("arbiter", "GET", f"/v1/loans/{lid}/signing-requests").json()
        assert [r["signed_seats"] for r in requests] == [["bank"]]
    assert _loan(world, lids[2])["state"] == "active"
    assert "signer.refused" in audit_actions(world.engine, loan_id=lids[2])
    again = risk.run_once()
    assert again.liquidations == [] and again.errors == {}
    assert bank_signer.bank_signatures() == before + 4
