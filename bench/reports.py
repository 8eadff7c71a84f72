"""Benchmark: the collateral register of a big book (issue 15's reports).

Set-up (not timed): a fresh migrated SQLite database, 200 loans made through the loans
service, 1,000 confirmed deposits (five a loan) written as the watcher writes them (the
deposit row and its `deposit.confirmed` event; each loan's move to active), a confirmed
manual price. Timed: the register replayed from the audit log at now, then as CSV, then
as XLSX, and one loan's statement as PDF. The node is a stand-in answering one height
(the register asks it only for the tip): what is measured is the database and the files.

Target: the CSV of 1,000 rows within 5 s (a person waits for it in a browser).

``python -m bench reports [--rows N]`` runs it alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import select

from bench import Figure
from bench.catchup import make_loans
from custody.audit.service import record
from custody.auth.context import Context
from custody.auth.service import create_principal
from custody.db.migrate import upgrade
from custody.db.models import (
    CollateralAddress,
    Deposit,
    DepositState,
    Loan,
    LoanState,
    PriceRecord,
    PriceState,
    Role,
)
from custody.db.session import make_engine, transaction
from custody.loans.service import change_state
from custody.reports import formats, pdf, service

ROWS = 1_000
LOANS = 200
TARGET_CSV_S = 5.0
TIP = 1_000


class _Tip:
    """The node's tip, all a register at now asks of it."""

    def get_block_count(self) -> int:
        return TIP

    def get_block_hash(self, height: int) -> str:
        return f"{height:064x}"

    def get_block_header(self, block_hash: str) -> dict[str, Any]:
        return {"hash": block_hash, "time": 0}


def populate(engine: Engine, rows: int, loans: int) -> Context:
    """`loans` loans holding `rows` confirmed deposits between them; the auditor's context."""
    make_loans(engine, loans)
    now = datetime.now(UTC)
    with transaction(engine) as session:
        addresses = list(session.exec(select(CollateralAddress)).all())
        for n in range(rows):
            addr = addresses[n % len(addresses)]
            txid = f"{n:064x}"
            data = {"txid": txid, "vout": 0, "amount_sats": 100_000, "block_height": 10 + n % 50}
            session.add(
                Deposit(
                    loan_id=addr.loan_id,
                    address_id=addr.id or 0,
                    state=DepositState.confirmed,
                    required_confirmations=1,
                    block_hash="00" * 32,
                    **data,  # type: ignore[arg-type]
                )
            )
            record(
                session,
                actor="watcher",
                action="deposit.confirmed",
                loan_id=addr.loan_id,
                data={**data, "state": "confirmed", "confirmations": 1},
            )
        for loan in session.exec(select(Loan)).all():
            change_state(session, "watcher", loan, LoanState.active, reason="block")
        session.add(
            PriceRecord(
                price_rub_per_btc="8000000",
                source="manual",
                quoted_at=now,
                state=PriceState.confirmed,
                proposed_by="bank_operator:bench",
                confirmed_by="bank_approver:bench",
                confirmed_at=now,
            )
        )
        auditor, _ = create_principal(
            session, name="bench-auditor", role=Role.auditor, party_id=None, actor="bench"
        )
        return Context(principal=auditor, network="regtest")


def measure(rows: int = ROWS, loans: int = LOANS) -> dict[str, float]:
    """Seconds for the register (replay), its CSV, its XLSX and one statement."""
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'reports.db'}")
        upgrade(engine)
        try:
            return measure_on(engine, rows, loans)
        finally:
            engine.dispose()


def measure_on(engine: Engine, rows: int, loans: int) -> dict[str, float]:
    """`measure` on a migrated, empty database of the caller's."""
    ctx = populate(engine, rows, loans)
    tip = _Tip()
    t0 = time.perf_counter()
    register = service.collateral_register(engine, ctx, tip)
    t1 = time.perf_counter()
    csv_bytes = b"".join(formats.csv_chunks(register))
    t2 = time.perf_counter()
    xlsx = formats.xlsx_bytes(register)
    t3 = time.perf_counter()
    statement = pdf.statement_pdf(service.loan_statement(engine, ctx, register.rows[0].loan_id))
    t4 = time.perf_counter()
    assert len(register.rows) == rows, (len(register.rows), rows)
    print(
        f"reports: {rows} rows, CSV {len(csv_bytes)} B, XLSX {len(xlsx)} B, "
        f"statement {len(statement)} B"
    )
    return {
        "register": t1 - t0,
        "csv": t1 - t0 + t2 - t1,
        "xlsx": t1 - t0 + t3 - t2,
        "statement": t4 - t3,
    }


def run(rows: int = ROWS) -> list[Figure]:
    took = measure(rows)
    for name, seconds in took.items():
        print(f"reports: {name} {seconds * 1000:.0f} ms")
    return [
        Figure(
            f"reports.register_csv_{rows}_rows",
            took["csv"],
            "s",
            f"<= {TARGET_CSV_S:.0f} s",
            took["csv"] <= TARGET_CSV_S,
        ),
        Figure(f"reports.register_xlsx_{rows}_rows", took["xlsx"], "s", "reported", True),
        Figure("reports.statement_pdf", took["statement"], "s", "reported", True),
    ]


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench reports")
    parser.add_argument("--rows", type=int, default=ROWS)
    args = parser.parse_args(argv)
    figures = run(args.rows)
    for figure in figures:
        print(figure.line())
    return 0 if all(f.passed for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
