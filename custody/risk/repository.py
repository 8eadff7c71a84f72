"""The risk domain's queries: the loans a pass looks at, their confirmed collateral, the
automatic liquidations it may have to rebuild, and the manual prices. Queries only: the
ladder and what a pass does are in `engine.py` and `ladder.py`."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import text
from sqlmodel import Session, col, func, select

from custody.db.models import (
    AuditEvent,
    Deposit,
    DepositState,
    Loan,
    LoanState,
    PriceRecord,
    PriceState,
    RequestState,
    SigningAction,
    SigningRequest,
)

_PG_PRICE_LOCK = 0x5C0A_9121  # advisory lock key reserved for manual price decisions


def loan_ids_in_states(session: Session, states: Collection[LoanState]) -> list[int | None]:
    return list(session.exec(select(Loan.id).where(col(Loan.state).in_(states))).all())


def confirmed_collateral_sats(session: Session, loan_id: int) -> int:
    """The sum of the loan's confirmed deposits (0 for none)."""
    total = session.exec(
        select(func.coalesce(func.sum(Deposit.amount_sats), 0)).where(
            Deposit.loan_id == loan_id, Deposit.state == DepositState.confirmed
        )
    ).one()
    return int(total)


def automatic_liquidations_awaiting_since(
    session: Session, updated_before: datetime
) -> list[SigningRequest]:
    """Liquidations the risk engine created that still await signatures and were last
    touched before `updated_before`."""
    return list(
        session.exec(
            select(SigningRequest).where(
                SigningRequest.action == SigningAction.liquidation,
                SigningRequest.state == RequestState.awaiting_signatures,
                col(SigningRequest.created_by).startswith("risk_engine:"),
                col(SigningRequest.updated_at) < updated_before,
            )
        ).all()
    )


def open_liquidation(session: Session, loan_id: int) -> SigningRequest | None:
    """The request holding the loan's open slot, if any."""
    return session.exec(
        select(SigningRequest).where(SigningRequest.open_key == f"loan:{loan_id}")
    ).first()


def latest_price(session: Session) -> PriceRecord | None:
    """The manual price in effect: the one confirmed last (proposals, rejected and
    legacy prices never are)."""
    return session.exec(
        select(PriceRecord)
        .where(PriceRecord.state == PriceState.confirmed)
        .order_by(col(PriceRecord.confirmed_at).desc(), col(PriceRecord.id).desc())
        .limit(1)
    ).first()


def price_by_id(session: Session, price_id: int) -> PriceRecord | None:
    return session.get(PriceRecord, price_id)


def price_history(session: Session, *, limit: int, offset: int) -> list[PriceRecord]:
    """Manual prices, newest proposal first."""
    return list(
        session.exec(
            select(PriceRecord).order_by(col(PriceRecord.id).desc()).limit(limit).offset(offset)
        ).all()
    )


def lock_price_decisions(session: Session) -> None:
    """Serialize the decisions on manual prices, so a second confirmation of a proposal
    (or one racing another proposal's) waits and then sees the first's outcome. PostgreSQL:
    a transaction-level advisory lock, taken before the proposal is read; SQLite's write
    transaction (BEGIN IMMEDIATE) already holds the database."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=_PG_PRICE_LOCK))


def last_pause_change(session: Session) -> AuditEvent | None:
    """The risk engine's last `risk.paused` or `risk.resumed` event: it records a pause
    (and its end) once per change, so the latest says whether it is paused now."""
    return session.exec(
        select(AuditEvent)
        .where(col(AuditEvent.action).in_(("risk.paused", "risk.resumed")))
        .order_by(col(AuditEvent.id).desc())
        .limit(1)
    ).first()
