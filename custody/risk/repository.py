"""The risk domain's queries: the loans a pass looks at, their confirmed collateral, the
automatic liquidations it may have to rebuild, and the manual price. Queries only: the
ladder and what a pass does are in `engine.py` and `ladder.py`."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlmodel import Session, col, func, select

from custody.db.models import (
    Deposit,
    DepositState,
    Loan,
    LoanState,
    PriceRecord,
    RequestState,
    SigningAction,
    SigningRequest,
)


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
    """The price staff set last."""
    return session.exec(select(PriceRecord).order_by(col(PriceRecord.id).desc()).limit(1)).first()
