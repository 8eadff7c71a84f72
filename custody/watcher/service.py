"""The deposit watcher: follows the node block by block and records every payment to,
and every spend of, loan collateral exactly once.

Invariants (each has a test):
- the cursor (height, hash) and everything a block did are committed in one
  transaction, so a SIGKILL at any instant loses or doubles nothing;
- on every step the cursor's hash is compared with the node's; on a mismatch the
  orphaned blocks are rolled back (their deposits back to pending, their spends
  undone, loan states moved back with their own events) before the new branch;
- a deposit is unique by (txid, vout); the mempool only ever adds pending ones,
  and one that leaves the mempool unmined is marked removed;
- only one watcher per database: a lease row, plus an advisory lock on PostgreSQL.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session

from custody.audit.service import record
from custody.chain.blocks import (
    BlockScan,
    FoundOutput,
    FoundSpend,
    ScriptIndex,
    outpoint_key,
    scan_block,
)
from custody.chain.blocks import scan_transaction as scan_tx
from custody.chain.feed import BlockFeed
from custody.chain.rpc import NodeRpc, RpcNotFound
from custody.db.models import (
    ChainBlock,
    ChainCursor,
    Deposit,
    DepositState,
    Loan,
    LoanState,
    SigningRequest,
    WatcherLease,
    utcnow,
)
from custody.db.session import transaction
from custody.loans.service import change_state
from custody.notify.events import notify_loan
from custody.signing.chain_events import mined, unmined
from custody.signing.repository import request_for_txid
from custody.watcher import repository
from pledge.errors import Conflict

log = structlog.get_logger(__name__)

ACTOR = "system:watcher"
# Deposits in these states still hold an unspent outpoint we must watch.
_LIVE = (DepositState.pending, DepositState.confirmed)
# Addresses read per query when the watched set is loaded: 20,000 rows are ~4 MB.
ADDRESS_PAGE = 20_000
# How long an address id skipped by a later one is looked for, and how far below the
# highest id seen: hand-outs are short transactions, so a late one is a recent id.
ADDRESS_GAP_SECONDS = 600.0
ADDRESS_GAP_WINDOW = 1_000


class WatcherBusy(Conflict):
    """Another watcher holds this database (one writer per database: its lease)."""

    code = "watcher_busy"


@dataclass(frozen=True)
class WatcherConfig:
    confirmations_small: int = 1
    confirmations_large: int = 3
    large_deposit_sats: int = 100_000_000
    start_height: int | None = None
    lease_seconds: float = 30.0


@dataclass
class StepResult:
    blocks_applied: int = 0
    blocks_rolled_back: int = 0
    mempool_deposits: int = 0
    removed: int = 0
    height: int = 0


@dataclass
class _Watched:
    """In-memory index of what to look for: the scripts only ever grow (addresses are
    never reused), extended as addresses are handed out; the outpoints are reloaded from
    the database after a reorg or a restart."""

    # Exact and compact: 1,000,000 P2WSH scripts in ~50 MB (a dict took ~170 MB). Which
    # address and loan a script is comes from the database, for the few that matched.
    scripts: ScriptIndex = field(default_factory=ScriptIndex)
    last_address_id: int = 0
    # Ids below `last_address_id` not seen yet, with when they were first missed. On
    # PostgreSQL a hand-out takes its id at its INSERT and shows at its COMMIT, so a
    # later id can show first: the missing ones are asked for again on every load, until
    # seen or for ADDRESS_GAP_SECONDS (a rolled back hand-out leaves its id unused).
    gaps: dict[int, float] = field(default_factory=dict)
    outpoints: set[bytes] = field(default_factory=set)


@dataclass
class _Rows:
    """The rows one block needs, loaded with one query per kind and held by strong
    references (the session only keeps weak ones, so a re-get would query again), and
    the deposits it adds, written with one INSERT (`write`): building an ORM object per
    deposit cost more than the rest of the block."""

    address_of_script: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    loans: dict[int, Loan] = field(default_factory=dict)
    deposits: dict[tuple[str, int], Deposit] = field(default_factory=dict)
    new_deposits: dict[tuple[str, int], _NewDeposit] = field(default_factory=dict)
    requests: dict[str, SigningRequest | None] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        session: Session,
        outputs: Iterable[FoundOutput],
        spends: Iterable[FoundSpend],
    ) -> _Rows:
        rows = cls()
        outputs, spends = list(outputs), list(spends)
        scripts = sorted({o.script_pubkey for o in outputs})
        for script, (address_id, loan) in repository.addresses_of_scripts(session, scripts).items():
            assert loan.id is not None
            rows.address_of_script[script] = (address_id, loan.id)
            rows.loans[loan.id] = loan
        txids = sorted({o.txid for o in outputs} | {s.prev_txid for s in spends})
        for dep in repository.deposits_of_txids(session, txids):
            rows.deposits[(dep.txid, dep.vout)] = dep
        return rows

    def keep_loans(self, session: Session, ids: Iterable[int]) -> None:
        missing = [i for i in ids if i not in self.loans]
        for loan in repository.loans_by_ids(session, missing):
            assert loan.id is not None
            self.loans[loan.id] = loan

    def loan(self, session: Session, loan_id: int) -> Loan:
        if loan_id not in self.loans:
            self.keep_loans(session, [loan_id])
        return self.loans[loan_id]

    def request(self, session: Session, txid: str) -> SigningRequest | None:
        """The signing request of a spending transaction, asked once per transaction (a
        release spends every deposit of its loan in one)."""
        if txid not in self.requests:
            self.requests[txid] = request_for_txid(session, txid)
        return self.requests[txid]

    def write(self, session: Session) -> None:
        """Insert the deposits recorded so far, in one statement."""
        if self.new_deposits:
            repository.insert_deposits(session, [d.row() for d in self.new_deposits.values()])
            self.new_deposits.clear()


@dataclass(frozen=True, slots=True)
class _NewDeposit:
    """A deposit seen for the first time, until `_Rows.write` inserts it: the fields
    `_dep_data` reads, and the rest of its row."""

    loan_id: int
    address_id: int
    txid: str
    vout: int
    amount_sats: int
    state: DepositState
    block_height: int | None
    block_hash: str | None
    required_confirmations: int
    first_seen_at: datetime

    def row(self) -> dict[str, Any]:
        return {
            "loan_id": self.loan_id,
            "address_id": self.address_id,
            "txid": self.txid,
            "vout": self.vout,
            "amount_sats": self.amount_sats,
            "state": self.state,
            "block_height": self.block_height,
            "block_hash": self.block_hash,
            "required_confirmations": self.required_confirmations,
            "excess_sats": 0,
            "spent_txid": None,
            "spent_height": None,
            "first_seen_at": self.first_seen_at,
            "updated_at": self.first_seen_at,
        }


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Watcher:
    def __init__(
        self,
        engine: Engine,
        rpc: NodeRpc,
        *,
        config: WatcherConfig | None = None,
        holder: str | None = None,
    ) -> None:
        self.engine = engine
        self.rpc = rpc
        self.config = config or WatcherConfig()
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._watched = _Watched()
        self._mempool_seen: set[str] = set()
        self._pg_lock: Connection | None = None
        # Set while this watcher holds the database's lease: work that must run once per
        # database (reconciling unknown outcomes, `custody watch`) runs only then.
        self.holding = threading.Event()

    # -- lifecycle -----------------------------------------------------------------

    def acquire(self) -> None:
        """Take the single-watcher lease; raise WatcherBusy if someone else holds it."""
        if self.engine.dialect.name == "postgresql" and self._pg_lock is None:
            conn = self.engine.connect()
            got = repository.try_watcher_lock(conn)
            conn.commit()
            if not got:
                conn.close()
                raise WatcherBusy("another watcher holds this database's advisory lock")
            self._pg_lock = conn
        self._renew_lease()
        self._reload_watched()
        self.holding.set()

    def release(self) -> None:
        self.holding.clear()
        with Session(self.engine) as session:
            lease = repository.lease(session)
            if lease is not None and lease.holder == self.holder:
                lease.expires_at = utcnow()
                session.add(lease)
                session.commit()
        if self._pg_lock is not None:
            # Unlock explicitly: close() only returns the connection to the pool, where
            # the session-level advisory lock would outlive this watcher.
            try:
                repository.release_watcher_lock(self._pg_lock)
                self._pg_lock.commit()
            except Exception:  # a broken connection: drop it, which ends its session
                self._pg_lock.invalidate()
            finally:
                self._pg_lock.close()
                self._pg_lock = None

    def _renew_lease(self) -> None:
        now = utcnow()
        with Session(self.engine) as session:
            lease = repository.lease(session)
            if lease is None:
                lease = WatcherLease(id=1, holder=self.holder, expires_at=now)
            elif (
                lease.holder != self.holder
                and _aware(lease.expires_at) > now
                and self._pg_lock is None  # the advisory lock already proves we are alone
            ):
                raise WatcherBusy(
                    f"watcher {lease.holder} holds the lease until {lease.expires_at.isoformat()}"
                )
            lease.holder = self.holder
            lease.expires_at = now + timedelta(seconds=self.config.lease_seconds)
            session.add(lease)
            session.commit()

    def run(self, stop: threading.Event, poll_seconds: float = 1.0) -> None:
        """Step until `stop` is set; errors are logged and retried on the next poll.

        A watcher that died (even by SIGKILL) leaves its lease to expire: wait for it
        rather than fail, so a supervisor can simply restart us."""
        while True:
            try:
                self.acquire()
                break
            except WatcherBusy as exc:
                log.info("waiting for the watcher lease", reason=exc.message)
                if stop.wait(min(poll_seconds, 1.0)):
                    return
        try:
            while not stop.is_set():
                try:
                    result = self.step()
                    if result.blocks_applied or result.blocks_rolled_back:
                        log.info("watcher step", **result.__dict__)
                except WatcherBusy:
                    raise  # someone took over our lease: never run two watchers
                except Exception as exc:  # the node or database may be briefly away
                    log.warning("watcher step failed", error=str(exc), kind=type(exc).__name__)
                stop.wait(poll_seconds)
        finally:
            self.release()

    # -- one step ------------------------------------------------------------------

    def step(self) -> StepResult:
        self._renew_lease()
        result = StepResult()
        tip = self.rpc.get_block_count()
        cursor = self._cursor(tip)
        if cursor.height > tip or self.rpc.get_block_hash(cursor.height) != cursor.block_hash:
            result.blocks_rolled_back = self._rollback_to_fork(cursor, tip)
            cursor = self._cursor(tip)
        self._load_new_addresses()
        if cursor.height < tip:
            # Blocks are fetched ahead by one thread while each is written. Scanning stays
            # here, after the block before is applied, so a spend in N+1 of an output made
            # in N is still recognised.
            with BlockFeed(self.rpc, cursor.height + 1, tip) as feed:
                for height, raw in feed:
                    scan = scan_block(raw, self._watched.scripts, self._watched.outpoints)
                    if scan.prev_block_hash != cursor.block_hash:
                        break  # the chain moved under us; the next step finds the fork
                    cursor = self._apply_block(height, scan, tip)
                    result.blocks_applied += 1
                    if result.blocks_applied % 50 == 0:
                        self._renew_lease()
        result.mempool_deposits, result.removed = self._sync_mempool()
        result.height = cursor.height
        return result

    # -- cursor and reorgs -----------------------------------------------------------

    def _cursor(self, tip: int) -> ChainCursor:
        with transaction(self.engine, write=False) as session:  # reads only
            cursor = repository.cursor(session)
        if cursor is not None:
            return cursor
        # The first step: ask the node for the base block with no transaction open
        # (SQLite opens every one as BEGIN IMMEDIATE, holding the write lock).
        start = self.config.start_height if self.config.start_height is not None else tip
        base = max(start - 1, 0)
        base_hash = self.rpc.get_block_hash(base)
        with Session(self.engine, expire_on_commit=False) as session:
            cursor = repository.cursor(session)
            if cursor is None:
                cursor = ChainCursor(id=1, height=base, block_hash=base_hash, node_tip_height=tip)
                session.add(cursor)
                session.commit()
                log.info("watcher starts", from_height=base + 1)
            return cursor

    def _find_fork(self, cursor: ChainCursor, tip: int) -> tuple[list[ChainBlock], int, str]:
        """The applied blocks at or below the cursor (newest first) and the highest of them
        the node still has, as (blocks, fork height, fork hash). The blocks are read in a
        short session and the node is asked with none open: the answer is re-checked
        against the database before anything is written."""
        with transaction(self.engine, write=False) as session:  # reads only
            blocks = repository.blocks_at_or_below(session, cursor.height)
        for block in blocks:
            if block.height <= tip and self.rpc.get_block_hash(block.height) == block.hash:
                return blocks, block.height, block.hash
        # Nothing we applied is still in the chain: back to the block before the first.
        first = blocks[-1] if blocks else None
        fork_height = (first.height - 1) if first else max(cursor.height - 1, 0)
        return blocks, fork_height, self.rpc.get_block_hash(fork_height)

    def _rollback_to_fork(self, cursor: ChainCursor, tip: int) -> int:
        """Undo every applied block above the last one the node still has, in one short
        transaction opened only once the node has answered. If the database moved
        meanwhile (the cursor or the applied blocks differ from what was read), nothing
        is written and the next step looks again; if the node moved, the next step's
        hash comparison finds the new fork."""
        blocks, fork_height, fork_hash = self._find_fork(cursor, tip)
        orphaned_ids = {(b.height, b.hash) for b in blocks if b.height > fork_height}
        with Session(self.engine, expire_on_commit=False) as session:
            db_cursor = repository.cursor(session)
            assert db_cursor is not None
            orphaned = repository.blocks_above(session, fork_height)
            if (db_cursor.height, db_cursor.block_hash) != (cursor.height, cursor.block_hash) or {
                (b.height, b.hash) for b in orphaned
            } != orphaned_ids:
                log.warning("the chain records moved while the node was asked; retrying")
                return 0
            touched = self._undo_blocks(session, fork_height, orphaned)
            for block in orphaned:
                session.delete(block)
            db_cursor.height, db_cursor.block_hash = fork_height, fork_hash
            db_cursor.node_tip_height, db_cursor.updated_at = tip, utcnow()
            session.add(db_cursor)
            self._settle(session, touched, fork_height, reason="reorg")
            session.commit()
        log.warning("reorg rolled back", fork_height=fork_height, orphaned=len(orphaned))
        self._reload_watched()
        self._mempool_seen.clear()  # orphaned transactions may be back in the mempool
        return len(orphaned)

    def _undo_blocks(self, session: Session, fork: int, orphaned: list[ChainBlock]) -> set[int]:
        hashes = {b.hash: b.height for b in orphaned}
        touched: set[int] = set()
        mined = repository.deposits_mined_above(session, fork)
        for dep in mined:
            touched.add(dep.loan_id)
            record(
                session,
                actor=ACTOR,
                action="deposit.reorged",
                loan_id=dep.loan_id,
                data={
                    **_dep_data(dep),
                    "orphaned_block": dep.block_hash,
                    "orphaned_height": hashes.get(dep.block_hash or "", dep.block_height),
                },
            )
            dep.block_height, dep.block_hash, dep.excess_sats = None, None, 0
            if dep.state == DepositState.confirmed:
                dep.state = DepositState.pending
            dep.updated_at = utcnow()
            session.add(dep)
        for request in repository.requests_mined_above(session, fork):
            touched.add(request.loan_id)
            unmined(session, request, ACTOR)
        # Deposits whose own block survives can still lose confirmations.
        shallow = repository.loan_ids_confirmed_above(session, fork)
        touched.update(shallow)
        spent = repository.deposits_spent_above(session, fork)
        for dep in spent:
            touched.add(dep.loan_id)
            record(
                session,
                actor=ACTOR,
                action="deposit.unspent",
                loan_id=dep.loan_id,
                data={**_dep_data(dep), "orphaned_spend": dep.spent_txid},
            )
            dep.spent_txid, dep.spent_height = None, None
            if dep.state == DepositState.spent:
                dep.state = DepositState.pending
            dep.updated_at = utcnow()
            session.add(dep)
        return touched

    # -- applying a block ------------------------------------------------------------

    def _apply_block(self, height: int, scan: BlockScan, tip: int) -> ChainCursor:
        # No autoflush, one query per kind of row read and one INSERT per kind written:
        # catch-up is bound by database round trips and ORM objects, not by parsing
        # (see `make bench`).
        with Session(self.engine, expire_on_commit=False, autoflush=False) as session:
            rows = _Rows.load(session, scan.outputs, scan.spends)
            touched: set[int] = set()
            for out in scan.outputs:
                touched.add(self._record_output(session, out, height, scan.block_hash, rows))
            for spend in scan.spends:
                loan_id = self._record_spend(session, spend, height, rows)
                if loan_id is not None:
                    touched.add(loan_id)
            rows.write(session)
            session.add(
                ChainBlock(height=height, hash=scan.block_hash, prev_hash=scan.prev_block_hash)
            )
            cursor = repository.cursor(session)
            assert cursor is not None
            cursor.height, cursor.block_hash = height, scan.block_hash
            cursor.node_tip_height, cursor.updated_at = max(tip, height), utcnow()
            session.add(cursor)
            session.flush()
            # Every mined, still-pending deposit gains a confirmation with this block.
            waiting = repository.loan_ids_of_mined_pending(session)
            touched.update(waiting)
            self._settle(session, touched, height, reason="block", rows=rows)
            session.commit()
        for out in scan.outputs:
            self._watched.outpoints.add(outpoint_key(out.txid, out.vout))
        for spend in scan.spends:
            self._watched.outpoints.discard(spend.outpoint)
        return cursor

    def _required_confirmations(self, loan: Loan, amount: int) -> int:
        if loan.required_confirmations is not None:
            return loan.required_confirmations
        if amount >= self.config.large_deposit_sats:
            return self.config.confirmations_large
        return self.config.confirmations_small

    def _record_output(
        self,
        session: Session,
        out: FoundOutput,
        height: int | None,
        block_hash: str | None,
        rows: _Rows,
    ) -> int:
        """Record a payment to a watched script: a new deposit waits in `rows` for its
        INSERT (`_Rows.write`, before the transaction reads deposits again)."""
        address_id, loan_id = rows.address_of_script[out.script_pubkey]
        dep = rows.deposits.get((out.txid, out.vout))
        if dep is None:
            if (out.txid, out.vout) in rows.new_deposits:
                return loan_id
            loan = rows.loan(session, loan_id)
            new = _NewDeposit(
                loan_id=loan_id,
                address_id=address_id,
                txid=out.txid,
                vout=out.vout,
                amount_sats=out.value,
                state=DepositState.pending,
                block_height=height,
                block_hash=block_hash,
                required_confirmations=self._required_confirmations(loan, out.value),
                first_seen_at=utcnow(),
            )
            rows.new_deposits[(out.txid, out.vout)] = new
            record(
                session, actor=ACTOR, action="deposit.seen", loan_id=loan_id, data=_dep_data(new)
            )
            notify_loan(session, loan, "deposit.seen", _dep_data(new))
        elif height is not None and dep.block_height != height:
            if dep.state == DepositState.removed:
                dep.state = DepositState.pending  # a transaction we gave up on was mined after all
            dep.block_height, dep.block_hash, dep.updated_at = height, block_hash, utcnow()
            session.add(dep)
            record(
                session, actor=ACTOR, action="deposit.mined", loan_id=loan_id, data=_dep_data(dep)
            )
        return loan_id

    def _record_spend(
        self, session: Session, spend: FoundSpend, height: int, rows: _Rows
    ) -> int | None:
        dep = rows.deposits.get((spend.prev_txid, spend.prev_vout))
        if dep is None or dep.state not in _LIVE:
            return None
        dep.state, dep.spent_txid, dep.spent_height = DepositState.spent, spend.txid, height
        dep.updated_at = utcnow()
        session.add(dep)
        record(
            session,
            actor=ACTOR,
            action="deposit.spent",
            loan_id=dep.loan_id,
            data={**_dep_data(dep), "spent_by": spend.txid},
        )
        request = rows.request(session, spend.txid)
        if request is not None:
            mined(session, request, height, ACTOR)
        else:
            # Moving collateral needs two of three keys: outside the service that means a
            # compromised key or a party acting on its own.
            record(
                session,
                actor=ACTOR,
                action="alert.unexpected_spend",
                loan_id=dep.loan_id,
                decision="alert",
                reason="collateral spent by a transaction the service did not build",
                data={**_dep_data(dep), "spent_by": spend.txid},
            )
            log.error("unexpected collateral spend", loan_id=dep.loan_id, txid=spend.txid)
        return dep.loan_id

    # -- confirmations and loan states --------------------------------------------

    def _settle(
        self,
        session: Session,
        loan_ids: Iterable[int],
        height: int,
        *,
        reason: str,
        rows: _Rows | None = None,
    ) -> None:
        """Bring deposits' confirmation states and their loans' states in line with `height`."""
        ids = sorted(set(loan_ids))
        if not ids:
            return
        rows = rows or _Rows()
        session.flush()
        by_loan: dict[int, list[Deposit]] = {loan_id: [] for loan_id in ids}
        rows.keep_loans(session, ids)
        for dep in repository.deposits_of_loans(session, ids):
            by_loan[dep.loan_id].append(dep)
        for loan_id in ids:
            loan = rows.loan(session, loan_id)
            deposits = by_loan[loan_id]
            confirmed = sum(d.amount_sats for d in deposits if d.state == DepositState.confirmed)
            for dep in deposits:
                confs = 0 if dep.block_height is None else height - dep.block_height + 1
                if dep.state == DepositState.confirmed and confs < dep.required_confirmations:
                    dep.state, dep.excess_sats, dep.updated_at = DepositState.pending, 0, utcnow()
                    confirmed -= dep.amount_sats
                    session.add(dep)
                    record(
                        session,
                        actor=ACTOR,
                        action="deposit.unconfirmed",
                        loan_id=loan_id,
                        reason=reason,
                        data={**_dep_data(dep), "confirmations": confs},
                    )
                elif dep.state == DepositState.pending and confs >= dep.required_confirmations:
                    dep.state = DepositState.confirmed
                    dep.excess_sats = max(
                        0,
                        min(
                            dep.amount_sats,
                            confirmed + dep.amount_sats - loan.required_collateral_sats,
                        ),
                    )
                    confirmed += dep.amount_sats
                    dep.updated_at = utcnow()
                    session.add(dep)
                    data = {
                        **_dep_data(dep),
                        "confirmations": confs,
                        "excess_sats": dep.excess_sats,
                    }
                    record(
                        session, actor=ACTOR, action="deposit.confirmed", loan_id=loan_id, data=data
                    )
                    notify_loan(session, loan, "deposit.confirmed", data)
            self._move_loan(session, loan, confirmed, reason)

    def _move_loan(self, session: Session, loan: Loan, confirmed: int, reason: str) -> None:
        enough = confirmed >= loan.required_collateral_sats
        if loan.state == LoanState.awaiting_deposit and enough:
            to = LoanState.active
        elif loan.state == LoanState.active and not enough and reason == "reorg":
            # A reorg took collateral away. (Spends are not a reason: the service's own
            # partial liquidation spends collateral on purpose, and a foreign spend raises
            # its own alert.)
            to = LoanState.awaiting_deposit
        else:
            return
        change_state(
            session,
            ACTOR,
            loan,
            to,
            reason=reason,
            data={"confirmed_sats": confirmed, "required_sats": loan.required_collateral_sats},
        )
        if to == LoanState.active:
            notify_loan(session, loan, "loan.active", {"confirmed_sats": confirmed})

    # -- mempool ---------------------------------------------------------------------

    def _sync_mempool(self) -> tuple[int, int]:
        """Pending deposits from the mempool, and unmined ones that left it. Everything
        the node is asked (the mempool, its new transactions, whether a vanished one was
        mined) is asked before the one write transaction opens."""
        mempool = set(self.rpc.get_raw_mempool())
        new = mempool - self._mempool_seen
        found: list[FoundOutput] = []
        for txid in new:
            try:
                raw = self.rpc.get_raw_transaction(txid)
            except RpcNotFound:
                continue  # mined or evicted since we listed it; blocks will tell
            found.extend(scan_tx(raw, self._watched.scripts, self._watched.outpoints).outputs)
        with transaction(self.engine, write=False) as session:  # reads only
            unmined_txids = set(repository.unmined_txids(session))
        asked = unmined_txids - mempool
        mined_elsewhere = {txid for txid in asked if self._mined_beyond_cursor(txid)}
        added = removed = 0
        with Session(self.engine, autoflush=False) as session:
            rows = _Rows.load(session, found, [])
            for out in found:
                if (out.txid, out.vout) not in rows.deposits:
                    self._record_output(session, out, None, None, rows)
                    self._watched.outpoints.add(outpoint_key(out.txid, out.vout))
                    added += 1
            rows.write(session)
            session.flush()
            unmined = repository.unmined_deposits(session)
            for dep in unmined:
                # Only what the node was asked about: a deposit that appeared since is
                # judged on the next step.
                if dep.txid in mempool or dep.txid in mined_elsewhere or dep.txid not in asked:
                    continue
                dep.state, dep.updated_at = DepositState.removed, utcnow()
                session.add(dep)
                record(
                    session,
                    actor=ACTOR,
                    action="deposit.removed",
                    loan_id=dep.loan_id,
                    reason="left the mempool unmined (replaced, double-spent or evicted)",
                    data=_dep_data(dep),
                )
                self._watched.outpoints.discard(outpoint_key(dep.txid, dep.vout))
                removed += 1
            session.commit()
        # Only now: if the write above failed, the next step must scan these again.
        self._mempool_seen = mempool
        return added, removed

    def _mined_beyond_cursor(self, txid: str) -> bool:
        try:
            info: dict[str, Any] = self.rpc.call("getrawtransaction", txid, 1)
        except RpcNotFound:
            return False
        return bool(info.get("blockhash"))

    # -- the watched set -------------------------------------------------------------

    def _reload_watched(self) -> None:
        """The outpoints afresh (a reorg or a takeover changes them) and the addresses
        handed out since the last load: those never change, so a reorg does not read a
        million of them again."""
        self._load_new_addresses()
        with transaction(self.engine, write=False) as session:  # reads only
            rows = repository.outpoints_in_states(session, _LIVE)
        self._watched.outpoints = {outpoint_key(txid, vout) for txid, vout in rows}

    def _load_new_addresses(self, page: int = ADDRESS_PAGE) -> None:
        """Add addresses handed out since the last call, and any that an earlier call
        found skipped (`_Watched.gaps`); paged so a million of them never sit in memory
        twice (as rows and as the index), and the index sized for all of them first
        (one allocation, no rebuilds while it fills)."""
        watched = self._watched
        now = time.monotonic()
        with transaction(self.engine, write=False) as session:  # reads only
            if watched.gaps:
                late = repository.addresses_by_ids(session, sorted(watched.gaps))
                watched.scripts.update(bytes.fromhex(spk_hex) for _, spk_hex in late)
                for address_id, _ in late:
                    del watched.gaps[address_id]
                for address_id, missed_at in list(watched.gaps.items()):
                    if now - missed_at > ADDRESS_GAP_SECONDS:
                        del watched.gaps[address_id]
            more = repository.count_addresses_after(session, watched.last_address_id)
            watched.scripts.reserve(len(watched.scripts) + more)
            while True:
                rows = repository.addresses_after(session, watched.last_address_id, page)
                watched.scripts.update(bytes.fromhex(spk_hex) for _, spk_hex in rows)
                self._note_gaps(rows, now)
                if len(rows) < page:
                    break
        floor = watched.last_address_id - ADDRESS_GAP_WINDOW
        for address_id in [i for i in watched.gaps if i < floor]:
            del watched.gaps[address_id]

    def _note_gaps(self, rows: list[tuple[int, str]], now: float) -> None:
        """Advance `last_address_id` over `rows` (in id order), noting the recent ids they
        skip."""
        watched = self._watched
        if not rows:
            return
        expected, highest = watched.last_address_id + 1, rows[-1][0]
        for address_id, _ in rows:
            for missing in range(max(expected, highest - ADDRESS_GAP_WINDOW), address_id):
                watched.gaps.setdefault(missing, now)
            expected = address_id + 1
        watched.last_address_id = highest


def _dep_data(dep: Deposit | _NewDeposit) -> dict[str, Any]:
    return {
        "txid": dep.txid,
        "vout": dep.vout,
        "amount_sats": dep.amount_sats,
        "block_height": dep.block_height,
        "state": str(dep.state),
    }
