"""The signing domain's queries: signing requests (by id with the caller's view rights, per loan,
by txid, an RBF family), the loan and collateral a request is built from, approvals, and the bank
keys and statements of the bank's signer. Queries only: the rules are in the modules that call
these."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, func, select

from custody.auth.context import Context
from custody.auth.policy import can_view_loan, ensure_can_view
from custody.db.models import (
    Approval,
    CollateralAddress,
    Deposit,
    DepositState,
    KeyRole,
    Loan,
    LoanKey,
    SignerStatement,
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
        raise SigningRequestNotFound()
    return req


def list_requests(session: Session, ctx: Context, loan_id: int) -> list[SigningRequest]:
    ensure_can_view(ctx.principal, session.get(Loan, loan_id))
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


def request_by_id(session: Session, request_id: int) -> SigningRequest | None:
    """The request, whoever asks (callers that answer a person use `get_request`)."""
    return session.get(SigningRequest, request_id)


def open_request_id(session: Session, open_key: str) -> int | None:
    """The id of the request holding a loan's open slot (`SigningRequest.open_key`), if any."""
    return session.exec(
        select(SigningRequest.id).where(SigningRequest.open_key == open_key)
    ).first()


def confirmed_collateral(
    session: Session, loan_id: int | None
) -> list[tuple[Deposit, CollateralAddress]]:
    """The loan's confirmed deposits with the address each paid, oldest first."""
    return list(
        session.exec(
            select(Deposit, CollateralAddress)
            .where(
                Deposit.loan_id == loan_id,
                Deposit.state == DepositState.confirmed,
                col(Deposit.address_id) == col(CollateralAddress.id),
            )
            .order_by(col(Deposit.id))
        ).all()
    )


def confirmed_txids(session: Session, loan_id: int | None) -> list[str]:
    """The txids of the loan's confirmed deposits (what the node is asked before building)."""
    return list(
        session.exec(
            select(Deposit.txid).where(
                Deposit.loan_id == loan_id, Deposit.state == DepositState.confirmed
            )
        ).all()
    )


def approval_by(
    session: Session, request_id: int | None, unsigned_txid: str, principal: str
) -> int | None:
    """The id of `principal`'s approval of this exact transaction of the request, if any."""
    return session.exec(
        select(Approval.id).where(
            Approval.request_id == request_id,
            Approval.principal == principal,
            Approval.unsigned_txid == unsigned_txid,
        )
    ).first()


def approval_not_by(
    session: Session, request_id: int | None, unsigned_txid: str, principal: str
) -> int | None:
    """The id of an approval of this exact transaction of the request by anyone but
    `principal`, if any."""
    return session.exec(
        select(Approval.id).where(
            Approval.request_id == request_id,
            Approval.unsigned_txid == unsigned_txid,
            Approval.principal != principal,
        )
    ).first()


def bank_key(session: Session, loan_id: int) -> LoanKey | None:
    """The loan's registered bank key, whoever holds it."""
    return session.exec(
        select(LoanKey).where(LoanKey.loan_id == loan_id, LoanKey.role == KeyRole.bank)
    ).first()


def transaction_statement_of(session: Session, request_id: int) -> SignerStatement | None:
    """The newest signer statement issued for the request's transaction."""
    return session.exec(
        select(SignerStatement)
        .where(SignerStatement.request_id == request_id, SignerStatement.kind == "transaction")
        .order_by(col(SignerStatement.id).desc())
    ).first()


def requests_by_state(session: Session) -> dict[str, int]:
    """How many signing requests are in each state (a state with none is absent)."""
    rows = session.exec(
        select(SigningRequest.state, func.count()).group_by(col(SigningRequest.state))
    ).all()
    return {str(state): int(count) for state, count in rows}


def oldest_open_request_at(session: Session) -> datetime | None:
    """When the oldest request still open (awaiting signatures, ready or broadcast) was made."""
    return session.exec(
        select(func.min(SigningRequest.created_at)).where(col(SigningRequest.state).in_(OPEN))
    ).one()
