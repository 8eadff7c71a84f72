"""The reports' queries: the audit events a register or a statement replays up to a moment,
the rows they name (loans, parties, deposits, signing requests and their sign-offs) and
the prices recorded by then. Queries only: the replay is in `history.py`."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Final

from sqlmodel import Session, col, select

from custody.db.models import (
    Approval,
    AuditEvent,
    Deposit,
    Loan,
    LoanKey,
    Party,
    PriceRecord,
    PriceState,
    SignerEndorsement,
    SignerStatement,
    SigningRequest,
)

# What moves an outpoint in or out of a loan's collateral (the watcher writes them).
DEPOSIT_ACTIONS: Final = (
    "deposit.mined",
    "deposit.confirmed",
    "deposit.unconfirmed",
    "deposit.reorged",
    "deposit.removed",
    "deposit.spent",
    "deposit.unspent",
)
STATE_ACTIONS: Final = ("loan.created", "loan.state_changed")
# What moves a loan's debt besides time: repayments and partial liquidations mined or unmined.
CREDIT_ACTIONS: Final = (
    "loan.repayment_recorded",
    "signing_request.confirmed",
    "signing_request.unconfirmed",
)
PRICE_KEY: Final = '"price_rub_per_btc"'  # a risk pass's evidence names its price


def events_until(
    session: Session,
    at: datetime,
    actions: Collection[str],
    loan_ids: Sequence[int] | None = None,
) -> list[AuditEvent]:
    """The events of these kinds written at or before `at` (of these loans, or every
    loan's), in the chain's order."""
    query = select(AuditEvent).where(
        col(AuditEvent.action).in_(list(actions)), col(AuditEvent.at) <= at
    )
    if loan_ids is not None:
        query = query.where(col(AuditEvent.loan_id).in_(list(loan_ids)))
    return list(session.exec(query.order_by(col(AuditEvent.id))).all())


def events_of_loan(session: Session, loan_id: int, at: datetime) -> list[AuditEvent]:
    """The loan's whole timeline up to `at`, in the chain's order."""
    return list(
        session.exec(
            select(AuditEvent)
            .where(AuditEvent.loan_id == loan_id, col(AuditEvent.at) <= at)
            .order_by(col(AuditEvent.id))
        ).all()
    )


def loans_by_ids(session: Session, loan_ids: Collection[int]) -> dict[int, Loan]:
    if not loan_ids:
        return {}
    rows = session.exec(select(Loan).where(col(Loan.id).in_(list(loan_ids)))).all()
    return {loan.id: loan for loan in rows if loan.id is not None}


def parties_by_ids(session: Session, party_ids: Collection[int]) -> dict[int, Party]:
    if not party_ids:
        return {}
    rows = session.exec(select(Party).where(col(Party.id).in_(list(party_ids)))).all()
    return {party.id: party for party in rows if party.id is not None}


def deposits_of_loan(session: Session, loan_id: int) -> list[Deposit]:
    return list(
        session.exec(select(Deposit).where(Deposit.loan_id == loan_id).order_by(col(Deposit.id)))
    )


def keys_of_loan(session: Session, loan_id: int) -> list[LoanKey]:
    return list(
        session.exec(select(LoanKey).where(LoanKey.loan_id == loan_id).order_by(col(LoanKey.id)))
    )


def requests_by_ids(session: Session, request_ids: Collection[int]) -> dict[int, SigningRequest]:
    if not request_ids:
        return {}
    rows = session.exec(
        select(SigningRequest).where(col(SigningRequest.id).in_(list(request_ids)))
    ).all()
    return {req.id: req for req in rows if req.id is not None}


def requests_of_loan(session: Session, loan_id: int) -> list[SigningRequest]:
    return list(
        session.exec(
            select(SigningRequest)
            .where(SigningRequest.loan_id == loan_id)
            .order_by(col(SigningRequest.id))
        )
    )


def approvals_of_requests(session: Session, request_ids: Collection[int]) -> list[Approval]:
    if not request_ids:
        return []
    return list(
        session.exec(
            select(Approval)
            .where(col(Approval.request_id).in_(list(request_ids)))
            .order_by(col(Approval.id))
        )
    )


def statements_of_loan(session: Session, loan_id: int) -> list[SignerStatement]:
    return list(
        session.exec(
            select(SignerStatement)
            .where(SignerStatement.loan_id == loan_id)
            .order_by(col(SignerStatement.id))
        )
    )


def endorsements_of(session: Session, statement_ids: Collection[int]) -> list[SignerEndorsement]:
    if not statement_ids:
        return []
    return list(
        session.exec(
            select(SignerEndorsement)
            .where(col(SignerEndorsement.statement_id).in_(list(statement_ids)))
            .order_by(col(SignerEndorsement.id))
        )
    )


def manual_prices_until(session: Session, at: datetime, *, last_only: bool) -> list[PriceRecord]:
    """Manual prices confirmed at or before `at`, oldest first (`last_only`: the one in
    effect at `at`, the one confirmed last, as `risk.repository.latest_price` picks it)."""
    query = select(PriceRecord).where(
        PriceRecord.state == PriceState.confirmed, col(PriceRecord.confirmed_at) <= at
    )
    if last_only:
        query = query.order_by(
            col(PriceRecord.confirmed_at).desc(), col(PriceRecord.id).desc()
        ).limit(1)
        return list(session.exec(query).all())
    return list(
        session.exec(query.order_by(col(PriceRecord.confirmed_at), col(PriceRecord.id))).all()
    )


def price_evidence_until(session: Session, at: datetime, *, last_only: bool) -> list[AuditEvent]:
    """Loan state changes a risk pass made at or before `at`, each naming the price it
    used, oldest first (`last_only`: the latest)."""
    query = select(AuditEvent).where(
        AuditEvent.action == "loan.state_changed",
        col(AuditEvent.at) <= at,
        col(AuditEvent.data).contains(PRICE_KEY, autoescape=True),
    )
    if last_only:
        return list(session.exec(query.order_by(col(AuditEvent.id).desc()).limit(1)).all())
    return list(session.exec(query.order_by(col(AuditEvent.id))).all())
