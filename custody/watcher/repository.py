"""The watcher's queries: its lease and cursor, the applied blocks, the deposits, addresses
and loans a block touches, and the advisory lock that keeps one watcher per PostgreSQL
database. Queries only: what a block, a reorg or the mempool does to them is in
`service.py`. IN lists are sent in chunks of `CHUNK` ids (SQLite's bound-parameter limit)."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import bindparam, func, insert, text, update
from sqlalchemy.engine import Connection
from sqlmodel import Session, col, select

from custody.db.models import (
    ChainBlock,
    ChainCursor,
    CollateralAddress,
    Deposit,
    DepositState,
    Loan,
    SigningRequest,
    WatcherLease,
)

CHUNK = 500
_PG_WATCHER_LOCK = 0x5C0A_3A7C  # advisory lock key reserved for the watcher
T = TypeVar("T")


def _chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# -- the single watcher ------------------------------------------------------------------


def try_watcher_lock(conn: Connection) -> bool:
    """Take the watcher's session-level advisory lock (PostgreSQL) if it is free: held as
    long as `conn` is open."""
    return bool(
        conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _PG_WATCHER_LOCK}).scalar()
    )


def release_watcher_lock(conn: Connection) -> None:
    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_WATCHER_LOCK})


def holds_watcher_lock(conn: Connection) -> bool:
    """Whether `conn`'s own session still holds the watcher's advisory lock (a query on
    it: raises if the connection died)."""
    return bool(
        conn.execute(
            text(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
                " AND granted AND pid = pg_backend_pid()"
                " AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = :k)"
            ),
            {"k": _PG_WATCHER_LOCK},
        ).scalar()
    )


def backend_pid(conn: Connection) -> int:
    """The PostgreSQL session (server process) of `conn`."""
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def end_session(conn: Connection, pid: int) -> bool:
    """End PostgreSQL session `pid`, and with it its session-level locks."""
    return bool(conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar())


def lease(session: Session) -> WatcherLease | None:
    return session.get(WatcherLease, 1)


def lease_locked(session: Session) -> WatcherLease | None:
    """The lease row as committed now, locked until the caller's transaction ends: FOR
    UPDATE on PostgreSQL; on SQLite every write transaction is BEGIN IMMEDIATE, so a
    read inside one is already serialized with every other writer."""
    return session.get(WatcherLease, 1, with_for_update=True, populate_existing=True)


# -- the cursor and applied blocks -------------------------------------------------------


def cursor(session: Session) -> ChainCursor | None:
    return session.get(ChainCursor, 1)


def blocks_at_or_below(session: Session, height: int) -> list[ChainBlock]:
    """Applied blocks at or below `height`, newest first."""
    return list(
        session.exec(
            select(ChainBlock)
            .where(col(ChainBlock.height) <= height)
            .order_by(col(ChainBlock.height).desc())
        ).all()
    )


def blocks_above(session: Session, height: int) -> list[ChainBlock]:
    """Applied blocks above `height`, newest first."""
    return list(
        session.exec(
            select(ChainBlock)
            .where(col(ChainBlock.height) > height)
            .order_by(col(ChainBlock.height).desc())
        ).all()
    )


# -- what a block touches ------------------------------------------------------------------


def addresses_of_scripts(
    session: Session, scripts: Sequence[bytes]
) -> dict[bytes, tuple[int, Loan]]:
    """scriptPubKey -> (address id, its loan), for those of `scripts` that are collateral
    addresses (by the unique script column): one query for both kinds of row."""
    found: dict[bytes, tuple[int, Loan]] = {}
    for chunk in _chunks([s.hex() for s in scripts]):
        for address_id, spk_hex, loan in session.exec(
            select(CollateralAddress.id, CollateralAddress.script_pubkey_hex, Loan)
            .join(Loan, col(Loan.id) == col(CollateralAddress.loan_id))
            .where(col(CollateralAddress.script_pubkey_hex).in_(chunk))
        ).all():
            assert address_id is not None
            found[bytes.fromhex(spk_hex)] = (address_id, loan)
    return found


def deposits_of_txids(session: Session, txids: Sequence[str]) -> list[Deposit]:
    """Every deposit paid by one of these transactions."""
    return [
        dep
        for chunk in _chunks(txids)
        for dep in session.exec(select(Deposit).where(col(Deposit.txid).in_(chunk))).all()
    ]


def loans_by_ids(session: Session, loan_ids: Sequence[int]) -> list[Loan]:
    return [
        loan
        for chunk in _chunks(loan_ids)
        for loan in session.exec(select(Loan).where(col(Loan.id).in_(chunk))).all()
    ]


@dataclass(slots=True)
class DepositRow:
    """A deposit as settling reads and changes it: plain attributes named as the model's,
    no ORM state (loading and flushing ORM objects cost more than the rest of a block).
    Changes are written by `update_settled`."""

    id: int
    loan_id: int
    txid: str
    vout: int
    amount_sats: int
    state: DepositState
    block_height: int | None
    block_hash: str | None
    required_confirmations: int
    excess_sats: int
    spent_txid: str | None
    spent_height: int | None
    retractions: int
    updated_at: datetime


_DEPOSITS = Deposit.__table__  # type: ignore[attr-defined]
_DEPOSIT_ROW_COLUMNS = [
    _DEPOSITS.c.id,
    _DEPOSITS.c.loan_id,
    _DEPOSITS.c.txid,
    _DEPOSITS.c.vout,
    _DEPOSITS.c.amount_sats,
    _DEPOSITS.c.state,
    _DEPOSITS.c.block_height,
    _DEPOSITS.c.block_hash,
    _DEPOSITS.c.required_confirmations,
    _DEPOSITS.c.excess_sats,
    _DEPOSITS.c.spent_txid,
    _DEPOSITS.c.spent_height,
    _DEPOSITS.c.retractions,
    _DEPOSITS.c.updated_at,
]
# Built once: a statement made per call spends more on its cache key than SQLite on it.
_UPDATE_SETTLED = (
    update(_DEPOSITS)
    .where(_DEPOSITS.c.id == bindparam("b_id"))
    .values(
        state=bindparam("b_state"),
        excess_sats=bindparam("b_excess_sats"),
        retractions=bindparam("b_retractions"),
        updated_at=bindparam("b_updated_at"),
    )
)


def deposit_rows_of_loans(session: Session, loan_ids: Sequence[int]) -> list[DepositRow]:
    """Every deposit of these loans as plain rows; each loan's in id order (the order
    they confirm in). A Core select: the caller's pending ORM changes must be flushed."""
    found: list[DepositRow] = []
    for chunk in _chunks(loan_ids):
        for row in session.execute(
            select(*_DEPOSIT_ROW_COLUMNS)
            .where(_DEPOSITS.c.loan_id.in_(chunk))
            .order_by(_DEPOSITS.c.id)
        ).all():
            dep = DepositRow(*row)
            dep.state = DepositState(dep.state)
            found.append(dep)
    return found


def update_settled(session: Session, rows: Sequence[DepositRow]) -> None:
    """Write what settling changes on these deposits (state, excess, epoch, time), one
    executemany of one prepared UPDATE."""
    if rows:
        session.execute(
            _UPDATE_SETTLED,
            [
                {
                    "b_id": r.id,
                    "b_state": str(r.state),
                    "b_excess_sats": r.excess_sats,
                    "b_retractions": r.retractions,
                    "b_updated_at": r.updated_at,
                }
                for r in rows
            ],
        )


def insert_deposits(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """New deposits in one INSERT (each dict names every column but the id). A Core
    insert of the table: the ORM's bulk insert costs more per row than the database."""
    session.execute(insert(Deposit.__table__), list(rows))  # type: ignore[attr-defined]


def loan_ids_of_mined_pending(session: Session) -> list[int]:
    """The loan of every pending deposit that is in a block (one row per deposit)."""
    return list(
        session.exec(
            select(Deposit.loan_id).where(
                Deposit.state == DepositState.pending, col(Deposit.block_height).is_not(None)
            )
        ).all()
    )


# -- what a reorg undoes -------------------------------------------------------------------


def deposits_mined_above(session: Session, height: int) -> list[Deposit]:
    """Deposits mined in a block above `height`, but for removed ones."""
    return list(
        session.exec(
            select(Deposit).where(
                col(Deposit.block_height) > height, Deposit.state != DepositState.removed
            )
        ).all()
    )


def requests_mined_above(session: Session, height: int) -> list[SigningRequest]:
    return list(
        session.exec(select(SigningRequest).where(col(SigningRequest.mined_height) > height)).all()
    )


def loan_ids_confirmed_above(session: Session, height: int) -> list[int]:
    """The loan of every confirmed deposit whose last required confirmation is a block
    above `height` (one row per deposit)."""
    return list(
        session.exec(
            select(Deposit.loan_id).where(
                Deposit.state == DepositState.confirmed,
                col(Deposit.block_height) + col(Deposit.required_confirmations) - 1 > height,
            )
        ).all()
    )


def deposits_spent_above(session: Session, height: int) -> list[Deposit]:
    return list(session.exec(select(Deposit).where(col(Deposit.spent_height) > height)).all())


# -- the mempool and the watched set -------------------------------------------------------


def unmined_txids(session: Session) -> list[str]:
    """The transaction of every pending deposit not in a block yet (one row per deposit)."""
    return list(
        session.exec(
            select(Deposit.txid).where(
                Deposit.state == DepositState.pending, col(Deposit.block_height).is_(None)
            )
        ).all()
    )


def unmined_deposits(session: Session) -> list[Deposit]:
    """Pending deposits not in a block yet."""
    return list(
        session.exec(
            select(Deposit).where(
                Deposit.state == DepositState.pending, col(Deposit.block_height).is_(None)
            )
        ).all()
    )


def outpoints_in_states(
    session: Session, states: Collection[DepositState]
) -> list[tuple[str, int]]:
    """(txid, vout) of every deposit in one of `states`."""
    return list(
        session.exec(select(Deposit.txid, Deposit.vout).where(col(Deposit.state).in_(states))).all()
    )


def count_addresses_after(session: Session, address_id: int) -> int:
    """How many addresses were handed out after `address_id`."""
    return int(
        session.exec(
            select(func.count())
            .select_from(CollateralAddress)
            .where(col(CollateralAddress.id) > address_id)
        ).one()
    )


def addresses_after(session: Session, address_id: int, limit: int) -> list[tuple[int, str]]:
    """(id, scriptPubKey hex) of up to `limit` addresses handed out after `address_id`, in
    id order. A Core select: a million rows through the ORM's loading took seconds."""
    table = CollateralAddress.__table__  # type: ignore[attr-defined]
    return [
        (found_id, spk_hex)
        for found_id, spk_hex in session.execute(
            select(table.c.id, table.c.script_pubkey_hex)
            .where(table.c.id > address_id)
            .order_by(table.c.id)
            .limit(limit)
        ).all()
    ]


def addresses_with_ids(
    session: Session, address_ids: Sequence[int]
) -> list[tuple[int | None, str]]:
    """(id, scriptPubKey hex) of those of `address_ids` that exist (are committed)."""
    return [
        row
        for chunk in _chunks(address_ids)
        for row in session.exec(
            select(CollateralAddress.id, CollateralAddress.script_pubkey_hex).where(
                col(CollateralAddress.id).in_(chunk)
            )
        ).all()
    ]


def deposits_by_state(session: Session) -> dict[str, int]:
    """How many deposits are in each state (a state with none is absent)."""
    rows = session.exec(select(Deposit.state, func.count()).group_by(col(Deposit.state))).all()
    return {str(state): int(count) for state, count in rows}
