"""The collateral register as files: CSV (UTF-8, one header row, integer sats and kopecks,
ISO 8601 UTC) written a row at a time, and XLSX (typed cells; a sheet with the register,
one with the parameters it was made with), written by openpyxl's streaming writer."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Final

from openpyxl import Workbook

from custody.reports.service import Register, RegisterRow

COLUMNS: Final = (
    "at",
    "height_at",
    "loan_id",
    "loan_state",
    "miner",
    "miner_inn",
    "descriptor",
    "outpoint",
    "txid",
    "vout",
    "amount_sats",
    "block_height",
    "confirmations",
    "price_rub_per_btc",
    "price_source",
    "value_kopecks",
    "debt_kopecks",
    "ltv_bps",
)
TOTAL: Final = "total"  # the totals row's loan_id cell
CSV_TYPE: Final = "text/csv; charset=utf-8"
XLSX_TYPE: Final = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


def iso(moment: datetime) -> str:
    """ISO 8601 in UTC, `Z` for the zone."""
    return moment.isoformat().replace("+00:00", "Z")


Cell = str | int | Decimal | datetime | None


def _cells(register: Register, row: RegisterRow) -> list[Cell]:
    return [
        register.at,
        register.height,
        row.loan_id,
        row.loan_state,
        row.miner,
        row.miner_inn,
        row.descriptor,
        row.outpoint,
        row.txid,
        row.vout,
        row.amount_sats,
        row.block_height,
        row.confirmations,
        row.price_rub_per_btc,
        row.price_source,
        row.value_kopecks,
        row.debt_kopecks,
        row.ltv_bps,
    ]


def _total_cells(register: Register) -> list[Cell]:
    t = register.totals
    price = register.price
    cells: dict[str, Cell] = {
        "at": register.at,
        "height_at": register.height,
        "loan_id": TOTAL,
        "loan_state": f"{t.loans} loans",
        "outpoint": f"{t.outpoints} outpoints",
        "amount_sats": t.amount_sats,
        "price_rub_per_btc": price.price_rub_per_btc if price else None,
        "price_source": price.source if price else None,
        "value_kopecks": t.value_kopecks,
        "debt_kopecks": t.debt_kopecks,
        "ltv_bps": t.ltv_bps,
    }
    return [cells.get(name) for name in COLUMNS]


def _text(cell: Cell) -> str:
    if cell is None:
        return ""
    if isinstance(cell, datetime):
        return iso(cell)
    return str(cell)


def csv_chunks(register: Register, rows_per_chunk: int = 200) -> Iterator[bytes]:
    """The register as CSV, in chunks of rows (a response streams them)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for n, row in enumerate(register.rows, start=1):
        writer.writerow([_text(c) for c in _cells(register, row)])
        if n % rows_per_chunk == 0:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    writer.writerow([_text(c) for c in _total_cells(register)])
    yield buffer.getvalue().encode()


def _naive(cell: Cell) -> Cell:
    # Excel has no time zones: the cell holds the UTC time, the header says so.
    return cell.replace(tzinfo=None) if isinstance(cell, datetime) else cell


def xlsx_bytes(register: Register) -> bytes:
    """The register and its parameters as an XLSX workbook."""
    book = Workbook(write_only=True)
    sheet = book.create_sheet("Register")
    sheet.append([f"{name} (UTC)" if name == "at" else name for name in COLUMNS])
    for row in register.rows:
        sheet.append([_naive(c) for c in _cells(register, row)])
    sheet.append([_naive(c) for c in _total_cells(register)])
    params = book.create_sheet("Parameters")
    price = register.price
    for name, value in (
        ("at (UTC)", register.at),
        ("height at", register.height),
        ("price_rub_per_btc", price.price_rub_per_btc if price else None),
        ("price source", price.source if price else "no price recorded by then"),
        ("price in effect since (UTC)", price.since if price else None),
        ("loans", register.totals.loans),
        ("outpoints", register.totals.outpoints),
        ("generated at (UTC)", register.generated_at),
    ):
        params.append([name, _naive(value)])
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()
