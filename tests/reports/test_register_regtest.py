"""The collateral register against the chain: on regtest btcd with the real watcher, its
outpoints, amounts and confirmations are what the node says; a register at a past moment
holds a deposit spent since (its loan released after) and not one made later; its LTV is
the risk engine's. SQLite only: the queries run on both databases in test_reports.py."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from embit.transaction import Transaction
from pypdf import PdfReader
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from support.lending import funded_loan, request, sign, the_psbt, upload
from support.world import World, build_world

from custody.config import Settings
from custody.db.models import AuditEvent, as_utc
from custody.root import Root
from custody.watcher.service import Watcher
from regtest.node import RegtestNode

PRICE = Decimal("8000000")
pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def world(engine: Engine, regtest_node: RegtestNode) -> World:
    return build_world(engine, chain=regtest_node.rpc)


def _register(world: World, at: datetime | None = None) -> list[dict[str, str]]:
    params = {"at": at.isoformat()} if at is not None else {}
    r = world.call("auditor", "GET", "/v1/reports/collateral-register.csv", params=params)
    assert r.status_code == 200, r.text
    rows = list(csv.DictReader(io.StringIO(r.content.decode("utf-8"))))
    assert rows[-1]["loan_id"] == "total"
    return rows


def _release(world: World, node: RegtestNode, watcher: Watcher, funded: Any) -> None:
    """The miner and the bank (its own device, after an approver's sign-off) release."""
    lid = funded.loan["id"]
    req = request(world, "bank_operator", lid, action="release")
    rid = req["id"]
    r = upload(world, "miner", rid, sign(the_psbt(world, "miner", rid), funded.roots["miner"]))
    assert r.status_code == 200, r.text
    assert (
        world.call("bank_approver", "POST", f"/v1/signing-requests/{rid}/approve").status_code
        == 200
    )
    r = upload(
        world, "bank_operator", rid, sign(the_psbt(world, "miner", rid), funded.roots["bank"])
    )
    assert r.status_code == 200 and r.json()["state"] == "broadcast", r.text
    node.mine(1)
    watcher.step()
    assert world.call("miner", "GET", f"/v1/loans/{lid}").json()["state"] == "released"


def test_the_register_is_what_the_node_and_the_risk_engine_say(
    world: World, regtest_node: RegtestNode, watcher: Watcher
) -> None:
    rpc = regtest_node.rpc
    r = world.call("bank_operator", "POST", "/v1/prices", json={"price_rub_per_btc": str(PRICE)})
    assert r.status_code == 201, r.text
    assert (
        world.call("bank_approver", "POST", f"/v1/prices/{r.json()['id']}/confirm").status_code
        == 200
    )

    # Loan A holds 0.5 BTC at T; it is released after T. Loan B's deposit comes after T.
    a = funded_loan(world, regtest_node, watcher, hsm_bank=False, principal_kopecks=200_000_000)
    a_height = rpc.get_block_count()
    t = datetime.now(UTC)
    _release(world, regtest_node, watcher, a)
    # 0.5 BTC at 8,000,000 RUB/BTC is 4,000,000 RUB: a debt of 3,200,000 is LTV 80 %,
    # past the margin call (75 %), short of liquidation (90 %).
    b = funded_loan(
        world,
        regtest_node,
        watcher,
        hsm_bank=False,
        principal_kopecks=320_000_000,
        interest_rate_bps=0,
    )
    regtest_node.mine(2)
    watcher.step()

    # Now: B's outpoint only, as the node has it (A's is spent).
    *rows, total = _register(world)
    assert [(row["loan_id"], row["outpoint"]) for row in rows] == [
        (str(b.loan["id"]), f"{b.deposit[0]}:{b.deposit[1]}")
    ]
    [row] = rows
    out = rpc.get_tx_out(b.deposit[0], b.deposit[1], include_mempool=False)
    assert out is not None
    assert int(row["amount_sats"]) == out["value_sat"] == int(total["amount_sats"])
    assert int(row["confirmations"]) == out["confirmations"] == 3
    assert int(row["height_at"]) == rpc.get_block_count()
    assert rpc.get_tx_out(a.deposit[0], a.deposit[1], include_mempool=False) is None

    # At T: A's outpoint, active, with its amount in its transaction and one confirmation
    # (T came right after its block); B's deposit did not exist yet.
    *then, _ = _register(world, t)
    assert [(x["loan_id"], x["outpoint"], x["loan_state"]) for x in then] == [
        (str(a.loan["id"]), f"{a.deposit[0]}:{a.deposit[1]}", "active")
    ]
    paid = Transaction.parse(rpc.get_raw_transaction(a.deposit[0])).vout[a.deposit[1]]
    assert int(then[0]["amount_sats"]) == paid.value
    assert int(then[0]["height_at"]) == a_height and then[0]["confirmations"] == "1"

    # A's statement names the release: its transaction, who signed and who approved.
    r = world.call("compliance_officer", "GET", f"/v1/loans/{a.loan['id']}/statement.pdf")
    assert r.status_code == 200, r.text
    text = " ".join(
        " ".join(p.extract_text() for p in PdfReader(io.BytesIO(r.content)).pages).split()
    )
    [release] = world.call("auditor", "GET", f"/v1/loans/{a.loan['id']}/signing-requests").json()
    assert f"release [confirmed]: txid {release['unsigned_txid']}" in text
    assert "signed miner,bank of miner,bank" in text
    assert "approved by bank_approver:user-bank_approver" in text
    assert "[released]" in text and "deposit.spent" in text

    # The risk engine prices B, calls the margin, and writes its figures in the audit log:
    # the register at that moment has the same LTV, debt, collateral and price.
    settings = Settings(network="regtest", database_url="sqlite://")
    engine_report = Root.assemble(settings, engine=world.engine, node=rpc).risk_engine().run_once()
    assert engine_report.margin_calls == [b.loan["id"]], engine_report
    with Session(world.engine) as s:
        event = s.exec(
            select(AuditEvent)
            .where(AuditEvent.loan_id == b.loan["id"], AuditEvent.action == "loan.state_changed")
            .order_by(col(AuditEvent.id).desc())
        ).first()
    assert event is not None
    evidence = json.loads(event.data)
    assert evidence["to"] == "margin_call"
    *at_call, _ = _register(world, as_utc(event.at))
    [row] = at_call
    assert row["loan_state"] == "margin_call"
    assert int(row["ltv_bps"]) == evidence["ltv_bps"] == 8_000
    assert int(row["debt_kopecks"]) == evidence["debt_kopecks"]
    assert int(row["amount_sats"]) == evidence["collateral_sats"]
    assert Decimal(row["price_rub_per_btc"]) == Decimal(evidence["price_rub_per_btc"])
    assert row["price_source"] == evidence["price_source"]
