"""Screening bodies: a decision as the compliance officer and auditor see it, a
resolution, and the bank's list entries."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel

from custody.db.models import ScreeningDecision, ScreeningListEntry, as_utc
from custody.schemas import Strict, Text

Reason = Annotated[str, Text(2000)]


class ResolutionIn(Strict):
    outcome: Literal["clear", "block"]
    reason: Reason


class ListEntryIn(Strict):
    kind: Literal["address", "txid", "outpoint"]
    value: Annotated[str, Text(100)]
    action: Literal["block", "review"]
    note: Reason


class ListRemovalIn(Strict):
    reason: Reason


class ListEntryOut(BaseModel):
    id: int
    kind: str
    value: str
    action: str
    note: str
    created_by: str
    created_at: datetime


class DecisionOut(BaseModel):
    """One screening: its subject (a deposit's funding transaction or a payout address),
    what the providers said, where it stands and who resolved it."""

    id: int
    subject: str
    purpose: str
    loan_id: int
    miner: str | None = None
    txid: str | None
    vout: int | None
    address: str | None
    amount_sats: int | None
    status: str
    result: str | None
    score: int | None
    reasons: list[str]
    providers: str
    reference: str | None
    inputs: list[dict[str, Any]]
    created_at: datetime
    decided_at: datetime | None
    resolution_reason: str | None
    resolved_by: str | None
    resolved_at: datetime | None


def decision_out(row: ScreeningDecision, miner: str | None = None) -> DecisionOut:
    assert row.id is not None
    return DecisionOut(
        id=row.id,
        subject=row.subject,
        purpose=row.purpose,
        loan_id=row.loan_id,
        miner=miner,
        txid=row.txid,
        vout=row.vout,
        address=row.address,
        amount_sats=row.amount_sats,
        status=str(row.status),
        result=row.result,
        score=row.score,
        reasons=json.loads(row.reasons),
        providers=row.providers,
        reference=row.reference,
        inputs=json.loads(row.inputs),
        created_at=as_utc(row.created_at),
        decided_at=as_utc(row.decided_at),
        resolution_reason=row.resolution_reason,
        resolved_by=row.resolved_by,
        resolved_at=as_utc(row.resolved_at),
    )


def entry_out(entry: ScreeningListEntry) -> ListEntryOut:
    assert entry.id is not None
    return ListEntryOut(
        id=entry.id,
        kind=entry.kind,
        value=entry.value,
        action=entry.action,
        note=entry.note,
        created_by=entry.created_by,
        created_at=as_utc(entry.created_at),
    )
