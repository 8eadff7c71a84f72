"""The proof's queries: the watcher's cursor, and every deposit that was collateral at a
height (with its address's index), for all loans or one."""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session, col, select

from custody.db.models import ChainCursor, CollateralAddress, Deposit, DepositState, Loan


@dataclass(frozen=True)
class CollateralRow:
    loan_id: int
    descriptor: str
    txid: str
    vout: int
    amount_sats: int
    block_height: int
    block_hash: str
    address_index: int
    change: bool


def cursor(session: Session) -> ChainCursor | None:
    return session.get(ChainCursor, 1)


def loan(session: Session, loan_id: int) -> Loan | None:
    return session.get(Loan, loan_id)


def collateral_at(session: Session, height: int) -> list[CollateralRow]:
    """Deposits mined at or below `height` with their required confirmations by then and
    not spent in a block at or below it (removed ones never happened), by loan and outpoint."""
    rows = session.exec(
        select(Deposit, CollateralAddress, Loan)
        .join(CollateralAddress, col(CollateralAddress.id) == col(Deposit.address_id))
        .join(Loan, col(Loan.id) == col(Deposit.loan_id))
        .where(col(Deposit.state) != DepositState.removed)
        .where(col(Deposit.block_height).is_not(None))
        .where(col(Deposit.block_height) <= height)
        .where(col(Deposit.block_height) + col(Deposit.required_confirmations) - 1 <= height)
        .where(col(Deposit.spent_height).is_(None) | (col(Deposit.spent_height) > height))
        .where(col(Loan.descriptor).is_not(None))
        .order_by(col(Deposit.loan_id), col(Deposit.txid), col(Deposit.vout))
    ).all()
    out = []
    for dep, address, owner in rows:
        assert owner.id is not None and owner.descriptor is not None
        assert dep.block_height is not None and dep.block_hash is not None
        out.append(
            CollateralRow(
                loan_id=owner.id,
                descriptor=owner.descriptor,
                txid=dep.txid,
                vout=dep.vout,
                amount_sats=dep.amount_sats,
                block_height=dep.block_height,
                block_hash=dep.block_hash,
                address_index=address.index,
                change=address.change,
            )
        )
    return out
