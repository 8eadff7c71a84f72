"""The screening domain's queries: decisions, the deposits they hold out of collateral,
and the bank's lists. Queries only; the rules are in `service.py`."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from custody.db.models import (
    Deposit,
    DepositState,
    Loan,
    Party,
    ScreeningDecision,
    ScreeningListEntry,
    ScreeningStatus,
)

# A deposit held in one of these does not count as collateral.
HELD = (
    ScreeningStatus.pending,
    ScreeningStatus.review,
    ScreeningStatus.block,
    ScreeningStatus.blocked,
)
CHUNK = 500


def decision(session: Session, decision_id: int) -> ScreeningDecision | None:
    return session.get(ScreeningDecision, decision_id)


def decision_locked(session: Session, decision_id: int) -> ScreeningDecision | None:
    """The row as committed now, locked until the caller's transaction ends (FOR UPDATE on
    PostgreSQL; a SQLite write transaction is BEGIN IMMEDIATE already)."""
    return session.get(ScreeningDecision, decision_id, with_for_update=True, populate_existing=True)


def decisions_locked(
    session: Session,
    *,
    ids: Sequence[int] = (),
    deposit_keys: Sequence[str] = (),
) -> list[ScreeningDecision]:
    """Many rows as committed now (by id, or by a deposit's `txid:vout`), locked as
    `decision_locked` locks one: a query per `CHUNK`, in id order (two lockers of
    overlapping sets never wait on each other crosswise)."""
    wheres = [
        col(ScreeningDecision.id).in_(ids[i : i + CHUNK]) for i in range(0, len(ids), CHUNK)
    ] + [
        col(ScreeningDecision.deposit_key).in_(deposit_keys[i : i + CHUNK])
        for i in range(0, len(deposit_keys), CHUNK)
    ]
    found: list[ScreeningDecision] = []
    for where in wheres:
        found += session.exec(
            select(ScreeningDecision)
            .where(where)
            .order_by(col(ScreeningDecision.id))
            .with_for_update()
            .execution_options(populate_existing=True)
        ).all()
    return found


def held_outpoints(session: Session, loan_ids: Sequence[int]) -> set[tuple[str, int]]:
    """(txid, vout) of these loans' deposits that screening holds out of collateral."""
    held: set[tuple[str, int]] = set()
    for i in range(0, len(loan_ids), CHUNK):
        for txid, vout in session.exec(
            select(ScreeningDecision.txid, ScreeningDecision.vout).where(
                col(ScreeningDecision.loan_id).in_(loan_ids[i : i + CHUNK]),
                ScreeningDecision.subject == "deposit",
                col(ScreeningDecision.status).in_(HELD),
            )
        ).all():
            assert txid is not None and vout is not None
            held.add((txid, vout))
    return held


def pending_deposit_decisions(session: Session, limit: int) -> list[ScreeningDecision]:
    """Deposit screenings not decided yet whose deposit is still live, oldest first."""
    return list(
        session.exec(
            select(ScreeningDecision)
            .join(
                Deposit,
                (col(Deposit.txid) == col(ScreeningDecision.txid))
                & (col(Deposit.vout) == col(ScreeningDecision.vout)),
            )
            .where(
                ScreeningDecision.status == ScreeningStatus.pending,
                ScreeningDecision.subject == "deposit",
                col(Deposit.state).in_((DepositState.pending, DepositState.confirmed)),
            )
            .order_by(col(ScreeningDecision.id))
            .limit(limit)
        ).all()
    )


def decisions_to_settle(session: Session) -> list[ScreeningDecision]:
    """Deposit decisions that now let their deposit count, their loan not yet settled."""
    return list(
        session.exec(
            select(ScreeningDecision).where(col(ScreeningDecision.settle_pending).is_(True))
        ).all()
    )


def any_to_settle(session: Session) -> bool:
    return (
        session.exec(
            select(ScreeningDecision.id)
            .where(col(ScreeningDecision.settle_pending).is_(True))
            .limit(1)
        ).first()
        is not None
    )


def decisions_of_loans(session: Session, loan_ids: Sequence[int]) -> list[ScreeningDecision]:
    return list(
        session.exec(
            select(ScreeningDecision)
            .where(col(ScreeningDecision.loan_id).in_(loan_ids))
            .order_by(col(ScreeningDecision.id))
        ).all()
    )


def latest_payout_decision(
    session: Session, loan_id: int, address: str
) -> ScreeningDecision | None:
    """The last decided screening of `address` as a payout of this loan."""
    return session.exec(
        select(ScreeningDecision)
        .where(
            ScreeningDecision.loan_id == loan_id,
            ScreeningDecision.subject == "payout",
            ScreeningDecision.address == address,
        )
        .order_by(col(ScreeningDecision.id).desc())
        .limit(1)
    ).first()


def decisions_with(
    session: Session,
    statuses: Collection[ScreeningStatus] | None,
    *,
    limit: int,
    offset: int,
) -> list[tuple[ScreeningDecision, Loan, Party]]:
    """Decisions (in `statuses`, or all), newest first, each with its loan and miner."""
    query = (
        select(ScreeningDecision, Loan, Party)
        .join(Loan, col(Loan.id) == col(ScreeningDecision.loan_id))
        .join(Party, col(Party.id) == col(Loan.miner_party_id))
    )
    if statuses is not None:
        query = query.where(col(ScreeningDecision.status).in_(statuses))
    return [
        (d, loan, party)
        for d, loan, party in session.exec(
            query.order_by(col(ScreeningDecision.id).desc()).limit(limit).offset(offset)
        ).all()
    ]


def list_entries(session: Session) -> list[ScreeningListEntry]:
    return list(session.exec(select(ScreeningListEntry).order_by(col(ScreeningListEntry.id))).all())


def list_entry(session: Session, entry_id: int) -> ScreeningListEntry | None:
    return session.get(ScreeningListEntry, entry_id)


def list_entry_of(session: Session, kind: str, value: str) -> ScreeningListEntry | None:
    return session.exec(
        select(ScreeningListEntry).where(
            ScreeningListEntry.kind == kind, ScreeningListEntry.value == value
        )
    ).first()


def delete_entry(session: Session, entry: ScreeningListEntry) -> None:
    session.delete(entry)


def insert_decisions(session: Session, rows: Sequence[dict[str, object]]) -> dict[str, int]:
    """New deposit decisions in one INSERT (each dict names every column but the id), each
    only if its deposit has none yet (a replayed block): the watcher writes a block's
    deposits, and their screenings, this way. Returns the ids of those inserted, by
    `deposit_key`."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    table = ScreeningDecision.__table__  # type: ignore[attr-defined]
    statement = (
        insert(table)
        .on_conflict_do_nothing(index_elements=["deposit_key"])
        .returning(table.c.deposit_key, table.c.id)
    )
    return {key: decision_id for key, decision_id in session.execute(statement, list(rows))}


def flagged_decisions(session: Session) -> list[tuple[ScreeningDecision, Loan, Party]]:
    """Every decision providers did not call clear (review or block, resolved or not),
    oldest first, with its loan and miner: the bank's filing."""
    return [
        (d, loan, party)
        for d, loan, party in session.exec(
            select(ScreeningDecision, Loan, Party)
            .join(Loan, col(Loan.id) == col(ScreeningDecision.loan_id))
            .join(Party, col(Party.id) == col(Loan.miner_party_id))
            .where(col(ScreeningDecision.result).in_(("review", "block")))
            .order_by(col(ScreeningDecision.id))
        ).all()
    ]
