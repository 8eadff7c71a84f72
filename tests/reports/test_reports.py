"""The reports' files and figures on the offline world (no node: its chain answers one
block), on both databases: the register as CSV and XLSX read back, the statement PDF read
back with pypdf, the moment `at` refused when it is not one. The figures against a real
node and the risk engine are in test_register_regtest.py."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from openpyxl import load_workbook
from pypdf import PdfReader
from sqlalchemy.engine import Engine
from sqlmodel import select
from support.offline import offline_world
from support.world import World

from custody.audit.service import record
from custody.db.models import CollateralAddress, Deposit, DepositState, Loan, LoanState, Party
from custody.db.session import transaction
from custody.loans.service import change_state
from pledge import debt
from pledge.amounts import kopecks_for_sats, ltv_bps

PRICE = Decimal("8000000")
# A Russian legal entity's name, in Cyrillic (its "OOO" is Cyrillic on purpose).
MINER_NAME = "ООО «Майнинг Сибирь»"  # noqa: RUF001
TXID = "ab" * 32
AMOUNT = 50_000_000


@pytest.fixture
def world(engine: Engine) -> World:
    return offline_world(engine)


def _confirm_price(world: World, price: Decimal) -> None:
    r = world.call("bank_operator", "POST", "/v1/prices", json={"price_rub_per_btc": str(price)})
    assert r.status_code == 201, r.text
    r = world.call("bank_approver", "POST", f"/v1/prices/{r.json()['id']}/confirm")
    assert r.status_code == 200, r.text


def _held_loan(world: World) -> Loan:
    """A loan holding one confirmed deposit, its miner named in Russian, written as the
    watcher writes it (the deposit row and its `deposit.confirmed` event, the loan active)."""
    loan_id: int = world.funded_ready_loan()["id"]
    with transaction(world.engine) as s:
        party = s.get(Party, world.party_ids["miner"])
        assert party is not None
        party.name = MINER_NAME
        s.add(party)
        addr = s.exec(select(CollateralAddress).where(CollateralAddress.loan_id == loan_id)).one()
        s.add(
            Deposit(
                loan_id=loan_id,
                address_id=addr.id or 0,
                txid=TXID,
                vout=0,
                amount_sats=AMOUNT,
                state=DepositState.confirmed,
                block_height=1,
                block_hash="00" * 32,
                required_confirmations=1,
            )
        )
        data = {"txid": TXID, "vout": 0, "amount_sats": AMOUNT, "block_height": 1}
        record(
            s,
            actor="watcher",
            action="deposit.confirmed",
            loan_id=loan_id,
            data={**data, "state": "confirmed", "confirmations": 1},
        )
        loan = s.get(Loan, loan_id)
        assert loan is not None
        change_state(s, "watcher", loan, LoanState.active, reason="block")
    with transaction(world.engine, write=False) as s:
        out = s.get(Loan, loan_id)
        assert out is not None
        return out


def _expected_debt(loan: Loan, at: datetime) -> int:
    return debt.outstanding_debt_kopecks(
        loan.principal_kopecks, loan.interest_rate_bps, loan.created_at, at
    )


def _get(world: World, who: str, path: str, **params: Any) -> Any:
    r = world.call(who, "GET", path, params=params)
    assert r.status_code == 200, r.text
    return r


def test_the_register_as_csv_and_xlsx_has_the_figures(world: World) -> None:
    _confirm_price(world, PRICE)
    loan = _held_loan(world)
    at = datetime.now(UTC)
    owed = _expected_debt(loan, at)
    ltv = ltv_bps(owed, AMOUNT, PRICE)

    r = _get(world, "auditor", "/v1/reports/collateral-register.csv", at=at.isoformat())
    assert r.headers["content-type"] == "text/csv; charset=utf-8"
    assert "attachment" in r.headers["content-disposition"]
    row, total = list(csv.DictReader(io.StringIO(r.content.decode("utf-8"))))
    assert row["loan_id"] == str(loan.id) and row["loan_state"] == "active"
    record = world.call("auditor", "GET", f"/v1/parties/{loan.miner_party_id}/miner-record")
    assert record.status_code == 200, record.text
    assert row["miner"] == MINER_NAME and row["miner_inn"] == record.json()["inn"] != ""
    assert row["descriptor"] == loan.descriptor and row["outpoint"] == f"{TXID}:0"
    assert row["amount_sats"] == str(AMOUNT) and row["confirmations"] == "1"
    assert Decimal(row["price_rub_per_btc"]) == PRICE and row["price_source"].startswith("manual#")
    assert row["value_kopecks"] == str(kopecks_for_sats(AMOUNT, PRICE)) == "400000000"
    assert row["debt_kopecks"] == str(owed) and row["ltv_bps"] == str(ltv)
    assert row["at"] == at.isoformat().replace("+00:00", "Z") and row["height_at"] == "1"
    assert total["loan_id"] == "total" and total["amount_sats"] == str(AMOUNT)
    assert total["debt_kopecks"] == str(owed) and total["ltv_bps"] == str(ltv)

    r = _get(world, "compliance_officer", "/v1/reports/collateral-register.xlsx", at=at.isoformat())
    book = load_workbook(io.BytesIO(r.content))
    assert book.sheetnames == ["Register", "Parameters"]
    header, cells, totals = [list(r) for r in book["Register"].iter_rows(values_only=True)]
    got = dict(zip(header, cells, strict=True))
    assert got["amount_sats"] == AMOUNT and isinstance(got["amount_sats"], int)
    assert got["value_kopecks"] == 400_000_000 and got["ltv_bps"] == ltv
    assert got["debt_kopecks"] == owed and got["confirmations"] == 1
    assert got["miner"] == MINER_NAME and got["loan_id"] == loan.id
    # A date cell, not a string (Excel keeps milliseconds).
    assert isinstance(got["at (UTC)"], datetime)
    assert abs(got["at (UTC)"] - at.replace(tzinfo=None)) < timedelta(milliseconds=1)
    assert dict(zip(header, totals, strict=True))["amount_sats"] == AMOUNT
    params = {name: value for name, value in book["Parameters"].iter_rows(values_only=True)}
    assert params["height at"] == 1 and params["price_rub_per_btc"] == int(PRICE)
    assert str(params["price source"]).startswith("manual#")


def test_a_register_before_the_deposit_is_empty(world: World) -> None:
    before = datetime.now(UTC)
    _held_loan(world)
    r = _get(world, "auditor", "/v1/reports/collateral-register.csv", at=before.isoformat())
    [total] = list(csv.DictReader(io.StringIO(r.text)))
    assert total["loan_id"] == "total" and total["amount_sats"] == "0"
    assert total["price_rub_per_btc"] == ""  # no price had been confirmed then


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # refused before any query
@pytest.mark.parametrize(
    "at",
    ["yesterday", "2026-12-01T00:00:00", (datetime.now(UTC) + timedelta(days=1)).isoformat()],
    ids=["not-a-time", "no-zone", "future"],
)
def test_a_bad_moment_is_refused_naming_the_field(world: World, at: str) -> None:
    for path in ("/v1/reports/collateral-register.csv", "/v1/reports/collateral-register.xlsx"):
        r = world.call("auditor", "GET", path, params={"at": at})
        assert r.status_code == 422, r.text
        assert r.json()["field"] == "at"


def test_the_statement_pdf_reads_back(world: World) -> None:
    _confirm_price(world, PRICE)
    loan = _held_loan(world)
    r = _get(world, "auditor", f"/v1/loans/{loan.id}/statement.pdf")
    assert r.headers["content-type"] == "application/pdf"
    text = " ".join(page.extract_text() for page in PdfReader(io.BytesIO(r.content)).pages)
    flat = " ".join(text.split())
    assert f"Loan {loan.id}: statement at" in flat
    assert MINER_NAME in flat  # the embedded font has Cyrillic
    assert f"Principal: {loan.principal_kopecks} kopecks" in flat
    assert f"{TXID}:0 {AMOUNT} sats" in flat
    assert "deposit.confirmed" in flat and "loan.state_changed" in flat
    assert "collateral 50000000 sats" in flat and "value 400000000 kopecks" in flat
    assert loan.descriptor is not None and loan.descriptor[:40] in flat


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_statement_of_no_loan_is_404_and_only_readers_get_one(world: World) -> None:
    r = world.call("auditor", "GET", "/v1/loans/999999/statement.pdf")
    assert r.status_code == 404 and r.json()["error"] == "loan_not_found"
    r = world.call("miner", "GET", "/v1/loans/999999/statement.pdf")
    assert r.status_code == 403
