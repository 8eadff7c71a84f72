"""The export of screening decisions that were not clear (review or block, resolved or
not) for the bank's own filing: CSV, one row per decision, oldest first."""

from __future__ import annotations

import csv
import io
import json

from sqlmodel import Session

from custody.auth.context import Context
from custody.auth.policy import require_role
from custody.db.models import as_utc
from custody.screening import repository
from custody.screening.service import READERS

COLUMNS = (
    "decision_id",
    "status",
    "result",
    "subject",
    "purpose",
    "loan_id",
    "miner",
    "miner_party_id",
    "txid",
    "vout",
    "address",
    "input_outpoints",
    "input_addresses",
    "amount_sats",
    "score",
    "reasons",
    "providers",
    "reference",
    "decided_at",
    "resolved_by",
    "resolved_at",
    "resolution_reason",
)


def _formula_safe(value: str) -> str:
    """A cell a spreadsheet would run as a formula (=, +, -, @ first) is quoted with '."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def flagged_csv(session: Session, ctx: Context) -> str:
    require_role(ctx.principal, *READERS)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for row, loan, miner in repository.flagged_decisions(session):
        inputs = json.loads(row.inputs)
        cells = [
            row.id,
            row.status,
            row.result,
            row.subject,
            row.purpose,
            loan.id,
            miner.name,
            miner.id,
            row.txid or "",
            "" if row.vout is None else row.vout,
            row.address or "",
            " ".join(f"{i['txid']}:{i['vout']}" for i in inputs),
            " ".join(str(i["address"]) for i in inputs if i.get("address")),
            "" if row.amount_sats is None else row.amount_sats,
            "" if row.score is None else row.score,
            " | ".join(json.loads(row.reasons)),
            row.providers,
            row.reference or "",
            "" if row.decided_at is None else as_utc(row.decided_at).isoformat(),
            row.resolved_by or "",
            "" if row.resolved_at is None else as_utc(row.resolved_at).isoformat(),
            row.resolution_reason or "",
        ]
        writer.writerow([_formula_safe(str(c)) for c in cells])
    return out.getvalue()
