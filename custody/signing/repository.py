"""Reading signing requests: by id (with the caller's view rights), per loan, by txid, and an RBF
family."""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import Session, col, select

from custody.auth.context import Context
from custody.auth.policy import can_view_loan, ensure_can_view
from custody.db.models import (
    Loan,
    SigningRequest,
)
from custody.errors import SigningRequestNotFound
from custody.signing.psbt import (
    CollateralInput,
)
from custody.signing.rules import OPEN


def get_request(session: Session, ctx: Context, request_id: int) -> SigningRequest:
    """The request, if the caller may see its loan; else 404 as if it did not exist (naming
    neither the loan nor that the request exists)."""
    req = session.get(SigningRequest, request_id)
    loan = session.get(Loan, req.loan_id) if req is not None else None
    if req is None or loan is None or not can_view_loan(ctx.principal, loan):
        raise SigningRequestNotFound(f"signing request {request_id} not found")
    return req


def list_requests(session: Session, ctx: Context, loan_id: int) -> list[SigningRequest]:
    ensure_can_view(ctx.principal, session.get(Loan, loan_id), loan_id)
    return list(
        session.exec(
            select(SigningRequest)
            .where(SigningRequest.loan_id == loan_id)
            .order_by(col(SigningRequest.id))
        ).all()
    )


def request_inputs(req: SigningRequest) -> list[CollateralInput]:
    return [
        CollateralInput(
            txid=i["txid"],
            vout=i["vout"],
            amount_sats=i["amount_sats"],
            address_index=i["address_index"],
            change=i["change"],
            prev_tx=bytes.fromhex(i["prev_tx"]),
        )
        for i in json.loads(req.inputs_json)
    ]


def evidence(req: SigningRequest) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(req.evidence_json)
    return value


def request_for_txid(session: Session, txid: str) -> SigningRequest | None:
    """The request whose transaction this is: an open one if any, else the newest."""
    rows = session.exec(
        select(SigningRequest)
        .where(SigningRequest.unsigned_txid == txid)
        .order_by(col(SigningRequest.id).desc())
    ).all()
    return next((r for r in rows if r.state in OPEN), rows[0] if rows else None)


def rbf_family(session: Session, req: SigningRequest) -> list[SigningRequest]:
    """The request and every RBF sibling spending the same collateral."""
    rows = session.exec(
        select(SigningRequest).where(
            SigningRequest.loan_id == req.loan_id, col(SigningRequest.id) != req.id
        )
    ).all()
    mine = {i["txid"] + ":" + str(i["vout"]) for i in json.loads(req.inputs_json)}
    return [
        r
        for r in rows
        if mine & {i["txid"] + ":" + str(i["vout"]) for i in json.loads(r.inputs_json)}
    ]
