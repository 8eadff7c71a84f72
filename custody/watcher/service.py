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
- every change receivers must know of (a deposit seen, confirmed, unconfirmed by a
  reorg, removed; a loan active, or back to awaiting_deposit) queues its webhook in
  the transaction that makes it, with an id derived from the fact (notify/events.py):
  a replay queues nothing, and the outbox tells the deposit table's story;
- every mempool transaction is scanned against the addresses loaded after it was
  listed, so a payment to an address handed out mid-step is pending in that step;
- only one watcher writes to a database, whatever is killed, cut off or frozen.

One writer. The lease row (`WatcherLease`) names its holder and a generation. Taking it
(when it has expired, or is already this watcher's) increments the generation, in one
transaction that reads the row locked and writes it. Every write transaction of the
watcher (a block, a rollback, the mempool, the first cursor, a step's outcome, a
renewal) starts with `_fence`: the lease row, locked, must still name this watcher at
this generation, and the cursor must be where this step left it. If not, nothing is
written, the reason is logged, `LeaseLost` (`CursorMoved`) is raised and `run` stops: a
supervisor restarts it, and it then waits for the lease like any standby. The row stays
locked until that transaction ends (FOR UPDATE on PostgreSQL; on SQLite every write
transaction is BEGIN IMMEDIATE), so no takeover can commit between the check and the
commit: a watcher that was frozen, cut off or slow is refused, never interleaved.

The PostgreSQL advisory lock only turns standbys away early; it never stands in for the
lease check. Its connection can die (a restart, failover, idle timeout; behind pgbouncer
in transaction mode it means nothing), so every step, and every write a third of a lease
after the last look, asks that connection whether it still holds the lock. A watcher
whose lock is gone stops stepping (`LockLost`): `run` gives the lease back and waits to
take lock and lease again.

Lease timing (`lease_seconds`, 5 s by default). A thread of its own renews the lease
every third of it, so a step waiting on a slow node call (the RPC timeout may be longer
than the lease) or applying a long catch-up keeps it: the renewal never waits for the
node. It renews only while the watcher is alive: a step that shows no progress (its
start, each of its writes) for `stuck_seconds` (more than any node call may take) is
stuck, and the renewer stops renewing and ends the advisory lock's session, so a standby
takes over and the stuck watcher's next write is refused. A killed watcher's lease is
taken over within a lease of its last renewal, and `release` hands it over at once.
Clocks decide only when a standby may try; the generation decides who writes.

Stalls show. Each step's outcome is written on the lease row: the time of the last
successful step, the last error (message, kind, time) and the failures in a row. After
`stall_steps` failures in a row the watcher records `watcher.stalled` once (an audit
alert and the banks' webhook), and `watcher.recovered` when a step succeeds again;
`/v1/health` shows all of it (see `health.py`).
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
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
from custody.chain.scanfeed import ScanFeed, can_fork
from custody.db.models import (
    ChainBlock,
    ChainCursor,
    Deposit,
    DepositState,
    Loan,
    LoanState,
    SigningRequest,
    WatcherLease,
    as_utc,
    utcnow,
)
from custody.db.session import transaction
from custody.loans.service import change_state
from custody.notify.events import notify_loan, notify_operators
from custody.screening import service as screening
from custody.signing.chain_events import mined, unmined
from custody.signing.repository import request_for_txid
from custody.watcher import metrics, repository
from pledge.errors import Conflict

log = structlog.get_logger(__name__)

ACTOR = "system:watcher"
# Address ids skipped by a load, looked up again until they commit (see _load_new_addresses).
ADDRESS_GAP_WINDOW = 1_000
ADDRESS_GAP_SECONDS = 600.0
# Deposits in these states still hold an unspent outpoint we must watch.
_LIVE = (DepositState.pending, DepositState.confirmed)
_Scanned = tuple[int, BlockScan]  # a block's height and what the scan found in it
# Addresses read per query when the watched set is loaded: 20,000 rows are ~4 MB.
ADDRESS_PAGE = 20_000


class WatcherBusy(Conflict):
    """Another watcher holds this database (one writer per database: its lease)."""

    code = "watcher_busy"


class LeaseLost(WatcherBusy):
    """This watcher no longer holds the lease at its generation (taken over while it was
    slow, frozen or cut off): it wrote nothing and must stop."""

    code = "watcher_lease_lost"


class CursorMoved(LeaseLost):
    """The cursor is not where this watcher's step left it: something else wrote."""

    code = "watcher_cursor_moved"


class LockLost(WatcherBusy):
    """PostgreSQL: the advisory lock's connection died or no longer holds the lock."""

    code = "watcher_lock_lost"


@dataclass(frozen=True)
class WatcherConfig:
    confirmations_small: int = 1
    confirmations_large: int = 3
    large_deposit_sats: int = 100_000_000
    start_height: int | None = None
    lease_seconds: float = 5.0
    # No sign of life from the step loop for this long and the lease is left to lapse;
    # more than any one node call may take (the settings refuse less than its timeout).
    stuck_seconds: float = 120.0
    stall_steps: int = 10  # failed steps in a row that raise `watcher.stalled`
    # A catch-up of this many blocks or more is fetched and scanned by a child process,
    # overlapping the writes (0: never; fewer are scanned here, as they come).
    scan_process_blocks: int = 8
    # A catch-up's blocks already scanned when the first of them is applied go in one
    # transaction, at most this many (each still settled at its own height): one fence,
    # cursor write, audit append and commit for the lot. It bounds how long the write
    # lock is held (SQLite: every other writer waits), about 20 ms a block here.
    blocks_per_commit: int = 4


@dataclass
class StepResult:
    blocks_applied: int = 0
    blocks_rolled_back: int = 0
    mempool_deposits: int = 0
    removed: int = 0
    # Deposit screenings decided: with their block when no provider calls out, else by
    # the step's pass (at most PENDING_PER_STEP).
    screened: int = 0
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
    # The pending screenings of the new deposits, inserted with them.
    new_screenings: list[dict[str, Any]] = field(default_factory=list)

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

    def write(self, session: Session, screener: screening.Screener) -> screening.DepositScreenings:
        """Insert the deposits recorded so far, in one statement, and their screenings in
        another (decided already when that calls nothing out)."""
        if self.new_deposits:
            repository.insert_deposits(session, [d.row() for d in self.new_deposits.values()])
            self.new_deposits.clear()
        written, self.new_screenings = self.new_screenings, []
        return screening.insert_deposit_screenings(session, screener, written, ACTOR)


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
    retractions: int = 0  # a first sighting has never been taken back

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
            "retractions": self.retractions,
        }


class Watcher:
    def __init__(
        self,
        engine: Engine,
        rpc: NodeRpc,
        *,
        config: WatcherConfig | None = None,
        holder: str | None = None,
        screener: screening.Screener | None = None,
    ) -> None:
        self.engine = engine
        self.rpc = rpc
        # Every new deposit is screened before it counts (by default: the bank's lists).
        self.screener = screener or screening.Screener(screening.ScreeningConfig(), rpc)
        self.config = config or WatcherConfig()
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._watched = _Watched()
        self._mempool_seen: set[str] = set()
        self._address_gaps: dict[int, float] = {}  # address id -> when first found missing
        self._pg_lock: Connection | None = None
        self._pg_lock_pid: int | None = None  # the PostgreSQL session holding it
        self._lock_checked_at = 0.0
        # The lease's generation while this watcher holds it; why it lost it, once lost.
        self._generation: int | None = None
        self._lost: str | None = None
        # The cursor as this step last saw or wrote it: every write expects it there.
        self._position: tuple[int, str] | None = None
        self._alive_at = time.monotonic()  # the step's last sign of progress
        self._stepping = False
        self._renewer: threading.Thread | None = None
        self._stop_renewing = threading.Event()
        # Set while this watcher holds the database's lease: work that must run once per
        # database (reconciling unknown outcomes, `custody watch`) runs only then.
        self.holding = threading.Event()

    # -- lifecycle -----------------------------------------------------------------

    def acquire(self) -> None:
        """Take the single-watcher lease with a new generation, fencing off every earlier
        holder; raise WatcherBusy if another watcher holds it (on PostgreSQL, first: if
        another session holds the advisory lock)."""
        self._stop_renewer()
        if self.engine.dialect.name == "postgresql":
            self._take_pg_lock()
        now = utcnow()
        try:
            with transaction(self.engine) as session:
                lease = repository.lease_locked(session)
                previous: tuple[str | None, int] = (None, 0)
                if lease is None:
                    lease = WatcherLease(id=1, holder=self.holder, expires_at=now, generation=0)
                elif lease.holder != self.holder and as_utc(lease.expires_at) > now:
                    raise WatcherBusy(
                        f"watcher {lease.holder} holds the lease until "
                        f"{as_utc(lease.expires_at).isoformat()}"
                    )
                else:
                    previous = (lease.holder, lease.generation)
                lease.holder = self.holder
                lease.generation += 1
                lease.expires_at = now + timedelta(seconds=self.config.lease_seconds)
                session.add(lease)
                generation = lease.generation
        except IntegrityError as exc:  # another watcher wrote the very first lease meanwhile
            raise WatcherBusy("another watcher took the lease meanwhile") from exc
        self._generation, self._lost, self._position = generation, None, None
        log.info(
            "watcher.lease_taken",
            holder=self.holder,
            generation=generation,
            previous_holder=previous[0],
            previous_generation=previous[1],
        )
        self._beat()
        self._start_renewer()
        try:
            self._reload_watched()
        except BaseException:
            self.release()
            raise
        self.holding.set()

    def release(self) -> None:
        """Give the lease back at once (expired: a standby takes it on its next try) and,
        on PostgreSQL, the advisory lock, ending the session that held it."""
        self.holding.clear()
        self._stop_renewer()
        generation, self._generation, self._position = self._generation, None, None
        if generation is not None:
            try:
                with transaction(self.engine) as session:
                    lease = repository.lease_locked(session)
                    if lease is not None and (lease.holder, lease.generation) == (
                        self.holder,
                        generation,
                    ):
                        lease.expires_at = utcnow() - timedelta(seconds=self.config.lease_seconds)
                        session.add(lease)
            except Exception as exc:  # the database is away: the lease expires by itself
                log.warning("watcher.lease_release_failed", error=str(exc))
        self._drop_pg_lock()

    def _fence(
        self,
        session: Session,
        at: tuple[int, str] | None = None,
        *,
        extend: bool = False,
        check_lock: bool = True,
    ) -> None:
        """The first statement of every write transaction: lock the lease row and check it
        still names this watcher at this generation and, given `at`, that the cursor is
        still (height, hash) `at`; otherwise raise before anything is written. The lease
        is extended when `extend`, or when half of it has run (a long catch-up renews
        itself, between blocks, by time)."""
        if self._lost is not None:
            raise LeaseLost(self._lost)
        if check_lock:
            self._check_lock(every=self.config.lease_seconds / 3)
        lease = repository.lease_locked(session)
        if lease is None or (lease.holder, lease.generation) != (self.holder, self._generation):
            holder = (
                "nobody" if lease is None else f"{lease.holder} at generation {lease.generation}"
            )
            self._lose(
                LeaseLost,
                f"the watcher lease is held by {holder}, not by {self.holder} at generation "
                f"{self._generation}",
            )
        assert lease is not None
        now = utcnow()
        lease_time = timedelta(seconds=self.config.lease_seconds)
        if extend or as_utc(lease.expires_at) - now < lease_time / 2:
            lease.expires_at = now + lease_time
            session.add(lease)
        if at is not None:
            cursor = repository.cursor(session)
            found = None if cursor is None else (cursor.height, cursor.block_hash)
            if found != at:
                self._lose(
                    CursorMoved, f"the cursor is at {found}, not at {at} as this step left it"
                )
        if check_lock:
            self._beat()

    def _lose(self, error: type[LeaseLost], reason: str) -> None:
        """Stop writing for good (until acquired again): say why, and raise."""
        if self._lost is None:
            log.error(
                "watcher.stops_writing",
                reason=reason,
                holder=self.holder,
                generation=self._generation,
            )
        self._lost = reason
        self.holding.clear()
        self._stop_renewing.set()
        raise error(reason)

    def _beat(self) -> None:
        """The step made progress: the renewer may go on renewing."""
        self._alive_at = time.monotonic()

    # -- the lease renewer -------------------------------------------------------------

    def _start_renewer(self) -> None:
        self._stop_renewing = threading.Event()
        self._renewer = threading.Thread(
            target=self._renew_while_alive,
            args=(self._stop_renewing,),
            name="watcher-lease",
            daemon=True,
        )
        self._renewer.start()

    def _stop_renewer(self) -> None:
        self._stop_renewing.set()
        renewer, self._renewer = self._renewer, None
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join(timeout=60)

    def _renew_while_alive(self, stop: threading.Event) -> None:
        """Renew every third of the lease unless a step is stuck; never calls the node,
        so a step waiting on one keeps its lease."""
        stuck = False
        while not stop.wait(self.config.lease_seconds / 3):
            quiet = time.monotonic() - self._alive_at
            if self._stepping and quiet > self.config.stuck_seconds:
                if not stuck:
                    log.error(
                        "watcher.stuck_lease_let_go",
                        quiet_seconds=round(quiet, 1),
                    )
                    self._end_lock_session()
                stuck = True
                continue
            stuck = False
            try:
                with transaction(self.engine) as session:
                    self._fence(session, extend=True, check_lock=False)
            except LeaseLost:
                return
            except Exception as exc:  # the database is briefly away: try again
                log.warning("watcher.lease_renewal_failed", error=str(exc), kind=type(exc).__name__)

    # -- the PostgreSQL advisory lock ---------------------------------------------------

    def _take_pg_lock(self) -> None:
        if self._pg_lock is not None and not self._lock_alive():
            self._drop_pg_lock()
        if self._pg_lock is not None:
            return
        conn = self.engine.connect()
        try:
            got = repository.try_watcher_lock(conn)
            pid = repository.backend_pid(conn)
            conn.commit()
        except BaseException:
            conn.invalidate()
            conn.close()
            raise
        if not got:
            conn.close()
            raise WatcherBusy("another watcher holds this database's advisory lock")
        self._pg_lock, self._pg_lock_pid = conn, pid
        self._lock_checked_at = time.monotonic()

    def _end_lock_session(self) -> None:
        """From another connection, end the session holding the advisory lock (the step
        thread may be inside it): a standby can take the lock, and the stuck step, when
        it wakes, finds the lock gone before it writes."""
        pid, self._pg_lock_pid = self._pg_lock_pid, None
        if pid is None:
            return
        try:
            with self.engine.connect() as conn:
                repository.end_session(conn, pid)
                conn.commit()
        except Exception as exc:  # then the lock is held until the step wakes
            log.warning("watcher.lock_session_end_failed", error=str(exc))

    def _lock_alive(self) -> bool:
        """A cheap query on the lock's own connection: is it alive and still holding?"""
        assert self._pg_lock is not None
        try:
            held = repository.holds_watcher_lock(self._pg_lock)
            self._pg_lock.rollback()  # never idle in a transaction
        except Exception as exc:
            log.warning("watcher.lock_connection_failed", error=str(exc))
            return False
        return held

    def _check_lock(self, *, every: float = 0.0) -> None:
        """Raise LockLost (and stop stepping) when the advisory lock is gone; looks at
        most once per `every` seconds."""
        if self.engine.dialect.name != "postgresql":
            return
        now = time.monotonic()
        if self._pg_lock is not None and now - self._lock_checked_at < every:
            return
        if self._pg_lock is None or not self._lock_alive():
            self._drop_pg_lock()
            self.holding.clear()
            log.error("watcher.lock_lost", holder=self.holder)
            raise LockLost("the advisory lock's connection died or no longer holds the lock")
        self._lock_checked_at = now

    def _drop_pg_lock(self) -> None:
        conn, self._pg_lock, self._pg_lock_pid = self._pg_lock, None, None
        if conn is None:
            return
        try:
            repository.release_watcher_lock(conn)
            conn.commit()
        except Exception:  # a broken connection: dropping it ends its session anyway
            pass
        finally:
            # Close the connection itself, not back to the pool: a pooled session would
            # keep a session-level lock taken twice, or one the unlock did not reach.
            conn.invalidate()
            conn.close()

    # -- running -----------------------------------------------------------------------

    def run(self, stop: threading.Event, poll_seconds: float = 1.0) -> None:
        """Step until `stop` is set; a failed step is logged, recorded and retried on the
        next poll.

        A watcher that died (even by SIGKILL) leaves its lease to expire: wait for it
        rather than fail, so a supervisor can simply restart us. A lost advisory lock
        gives the lease back and waits for both again; a lost lease (another watcher
        took over) raises LeaseLost: this one never writes again."""
        while not stop.is_set():
            if not self._wait_for_lease(stop, poll_seconds):
                return
            try:
                self._step_until(stop, poll_seconds)
            except LockLost as exc:
                log.warning("watcher.waiting_for_lock", reason=exc.message)
            finally:
                self.release()

    def _wait_for_lease(self, stop: threading.Event, poll_seconds: float) -> bool:
        while True:
            try:
                self.acquire()
                return True
            except WatcherBusy as exc:
                log.info("watcher.waiting_for_lease", reason=exc.message)
            except Exception as exc:  # the database is briefly away
                log.warning("watcher.lease_take_failed", error=str(exc), kind=type(exc).__name__)
            if stop.wait(min(poll_seconds, 1.0)):
                return False

    def _step_until(self, stop: threading.Event, poll_seconds: float) -> None:
        while not stop.is_set():
            try:
                result = self.step()
                if result.blocks_applied or result.blocks_rolled_back:
                    log.info("watcher.step", **result.__dict__)
            except WatcherBusy:
                raise  # the lease or the lock is lost: never run two watchers
            except Exception as exc:  # the node or database may be briefly away
                log.warning("watcher.step_failed", error=str(exc), kind=type(exc).__name__)
            self._beat()
            stop.wait(poll_seconds)

    # -- one step ------------------------------------------------------------------

    def step(self) -> StepResult:
        """One poll: the node's tip, a rollback if the chain forked, the new blocks, the
        mempool. Its outcome is recorded on the lease row (what /v1/health shows)."""
        if self._generation is None:
            raise LeaseLost("this watcher does not hold the lease: acquire() first")
        if self._lost is not None:
            raise LeaseLost(self._lost)
        self._beat()
        self._stepping = True
        try:
            self._check_lock()  # every step: the advisory lock's connection is still ours
            try:
                result = self._step()
            except WatcherBusy:
                raise
            except Exception as exc:
                metrics.STEPS.labels(result="failed").inc()
                self._record_step(error=exc)
                raise
            self._record_step(height=result.height)
        finally:
            self._stepping = False
        metrics.STEPS.labels(result="ok").inc()
        metrics.BLOCKS_APPLIED.inc(result.blocks_applied)
        metrics.BLOCKS_ROLLED_BACK.inc(result.blocks_rolled_back)
        metrics.HEIGHT.set(result.height)
        metrics.LAST_STEP.set_to_current_time()
        return result

    def _record_step(self, *, error: Exception | None = None, height: int | None = None) -> None:
        """The step's outcome on the lease row. `stall_steps` failures in a row record
        `watcher.stalled` once; the next success records `watcher.recovered`."""
        now = utcnow()
        try:
            with transaction(self.engine) as session:
                self._fence(session, extend=True)
                lease = repository.lease(session)  # the row `_fence` locked
                assert lease is not None
                if error is None:
                    self._record_success(session, lease, now, height)
                else:
                    self._record_failure(session, lease, now, error)
                session.add(lease)
        except WatcherBusy:
            raise
        except Exception as exc:  # the database itself may be what failed
            log.warning("watcher.step_record_failed", error=str(exc), kind=type(exc).__name__)
        self._beat()

    def _record_success(
        self, session: Session, lease: WatcherLease, now: datetime, height: int | None
    ) -> None:
        if lease.stalled_since is not None:
            data = {
                "height": height,
                "stalled_since": as_utc(lease.stalled_since).isoformat(),
                "failed_steps": lease.failed_steps,
                "last_error": lease.last_error,
            }
            record(session, actor=ACTOR, action="watcher.recovered", data=data)
            notify_operators(session, "watcher.recovered", data)
            log.info("watcher.recovered", **data)
        lease.last_step_at, lease.failed_steps, lease.stalled_since = now, 0, None

    def _record_failure(
        self, session: Session, lease: WatcherLease, now: datetime, error: Exception
    ) -> None:
        message = str(getattr(error, "message", None) or error) or type(error).__name__
        lease.last_error, lease.last_error_kind = message[:2000], type(error).__name__
        lease.last_error_at = now
        lease.failed_steps += 1
        if lease.failed_steps >= self.config.stall_steps and lease.stalled_since is None:
            lease.stalled_since = now
            data = {
                "stalled_since": as_utc(now).isoformat(),
                "height": None if self._position is None else self._position[0],
                "failed_steps": lease.failed_steps,
                "last_step_at": None
                if lease.last_step_at is None
                else as_utc(lease.last_step_at).isoformat(),
                "error": lease.last_error,
                "kind": lease.last_error_kind,
            }
            record(
                session,
                actor=ACTOR,
                action="watcher.stalled",
                decision="alert",
                reason=f"{lease.failed_steps} watcher steps failed in a row",
                data=data,
            )
            notify_operators(session, "watcher.stalled", data)
            log.error("watcher.stalled", **data)

    def _step(self) -> StepResult:
        result = StepResult()
        tip = self.rpc.get_block_count()
        metrics.NODE_TIP.set(tip)
        cursor = self._cursor(tip)
        if cursor.height > tip or self.rpc.get_block_hash(cursor.height) != cursor.block_hash:
            result.blocks_rolled_back = self._rollback_to_fork(cursor, tip)
            cursor = self._cursor(tip)
        self._position = (cursor.height, cursor.block_hash)
        self._load_new_addresses()
        if cursor.height < tip:
            with self._block_scans(cursor.height + 1, tip) as batches:
                for batch in batches:
                    linked = _linked(batch, cursor.block_hash)
                    if linked:
                        cursor, screened = self._apply_blocks(linked, tip)
                        result.screened += screened
                        self._position = (cursor.height, cursor.block_hash)
                        result.blocks_applied += len(linked)
                    if len(linked) < len(batch):
                        break  # the chain moved under us; the next step finds the fork
        result.mempool_deposits, result.removed = self._sync_mempool()
        result.screened += self._screen_pending()
        result.height = cursor.height
        return result

    # -- screening -----------------------------------------------------------------------

    def _screen_pending(self) -> int:
        """Decide the deposits still pending screening, then settle the loans whose
        deposits a decision (here, or a compliance officer's) let count. The node and the
        providers are asked with no transaction open; the pending rows were committed with
        their deposits, so a crash before the outcome is written is asked again on the
        next step. Returns how many were decided."""
        with transaction(self.engine, write=False) as session:  # reads only
            pending = [
                (d.id, d.txid, d.vout, d.amount_sats)
                for d in screening.pending_deposits(session, screening.PENDING_PER_STEP)
            ]
            to_settle = screening.any_to_settle(session)
        if not pending and not to_settle:
            return 0
        outcomes: dict[int, screening.Outcome] = {}
        if pending:
            lists = self.screener.lists(self.engine)
            for decision_id, txid, vout, amount in pending:
                assert decision_id is not None and txid is not None and vout is not None
                try:
                    decision, subject = self.screener.screen_deposit(lists, txid, vout, amount or 0)
                except Exception as exc:  # the node is away: still pending, asked again
                    log.warning("watcher.screening_deferred", txid=txid, error=str(exc))
                    continue
                outcomes[decision_id] = (decision, subject.inputs)
                self._beat()
        assert self._position is not None
        with Session(self.engine, expire_on_commit=False, autoflush=False) as session:
            self._fence(session, self._position)
            screening.record_outcomes(session, outcomes, ACTOR)
            session.flush()
            loans = screening.take_loans_to_settle(session)
            session.flush()
            self._settle(session, loans, self._position[0], reason="screening")
            session.commit()
        return len(outcomes)

    @contextmanager
    def _block_scans(self, first: int, last: int) -> Iterator[Iterator[list[_Scanned]]]:
        """The scans of blocks `first`..`last` in batches of consecutive heights, each
        scan taken after the block before it was applied or scanned with it (so a spend
        in N+1 of an output paid in N is recognised). A long catch-up
        (`scan_process_blocks` or more) is fetched and scanned by a child process while
        this one writes (`chain/scanfeed.py`: it keeps its copy of the outpoints as
        `_apply_blocks` keeps ours), and a batch is the next block with those scanned
        since (`blocks_per_commit` at most: taken without waiting, so no transaction waits
        on the node); a short one here, the blocks fetched ahead by a thread, one a batch."""
        watched = self._watched
        wanted = self.config.scan_process_blocks
        if 0 < wanted <= last - first + 1 and can_fork():
            with ScanFeed(self.rpc, first, last, watched.scripts, watched.outpoints) as feed:
                yield _batches(iter(feed), feed.ready, self.config.blocks_per_commit)
            return
        with BlockFeed(self.rpc, first, last) as blocks:
            yield (
                [(height, scan_block(raw, watched.scripts, watched.outpoints))]
                for height, raw in blocks
            )

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
            self._fence(session)
            cursor = repository.cursor(session)
            if cursor is None:
                cursor = ChainCursor(id=1, height=base, block_hash=base_hash, node_tip_height=tip)
                session.add(cursor)
                session.commit()
                log.info("watcher.starts", from_height=base + 1)
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
            self._fence(session, (cursor.height, cursor.block_hash))
            db_cursor = repository.cursor(session)
            assert db_cursor is not None
            orphaned = repository.blocks_above(session, fork_height)
            if (db_cursor.height, db_cursor.block_hash) != (cursor.height, cursor.block_hash) or {
                (b.height, b.hash) for b in orphaned
            } != orphaned_ids:
                log.warning(
                    "watcher.rollback_retried",
                    detail="the chain records moved while the node was asked",
                )
                return 0
            touched = self._undo_blocks(session, fork_height, orphaned)
            for block in orphaned:
                session.delete(block)
            db_cursor.height, db_cursor.block_hash = fork_height, fork_hash
            db_cursor.node_tip_height, db_cursor.updated_at = tip, utcnow()
            session.add(db_cursor)
            self._settle(session, touched, fork_height, reason="reorg")
            session.commit()
        log.warning("watcher.reorg_rolled_back", fork_height=fork_height, orphaned=len(orphaned))
        self._reload_watched()
        self._mempool_seen.clear()  # orphaned transactions may be back in the mempool
        return len(orphaned)

    def _undo_blocks(self, session: Session, fork: int, orphaned: list[ChainBlock]) -> set[int]:
        hashes = {b.hash: b.height for b in orphaned}
        touched: set[int] = set()
        loans = _Rows()
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
            if _announced_confirmed(dep):
                # Before the block goes: the retraction names the confirmation it takes back.
                _retract(
                    session, loans.loan(session, dep.loan_id), dep, "its block was orphaned", 0
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
            # Back to what it was before the spend (and was announced as): `_settle` then
            # retracts a confirmation the shorter chain no longer gives it.
            was_confirmed = _announced_confirmed(dep)
            dep.spent_txid, dep.spent_height = None, None
            if dep.state == DepositState.spent:
                dep.state = DepositState.confirmed if was_confirmed else DepositState.pending
            dep.updated_at = utcnow()
            session.add(dep)
        return touched

    # -- applying a block ------------------------------------------------------------

    def _apply_blocks(self, batch: Sequence[_Scanned], tip: int) -> tuple[ChainCursor, int]:
        """Record consecutive blocks' deposits and spends in one transaction, each block's
        loans settled at its own height (the same events, in the same order, as a
        transaction a block); returns the new cursor and how many screenings were decided
        with the blocks."""
        # No autoflush, one query per kind of row read and one INSERT per kind written:
        # catch-up is bound by database round trips and ORM objects, not by parsing
        # (see `make bench`). New deposits are inserted screened when that calls nothing
        # out (`screening.insert_deposit_screenings`): no second transaction per step
        # that reads, locks and settles them again.
        first_height, first = batch[0]
        decided = 0
        with Session(self.engine, expire_on_commit=False, autoflush=False) as session:
            self._fence(session, (first_height - 1, first.prev_block_hash))
            for height, scan in batch:
                decided += self._record_block(session, height, scan)
            last_height, last = batch[-1]
            cursor = repository.cursor(session)
            assert cursor is not None
            cursor.height, cursor.block_hash = last_height, last.block_hash
            cursor.node_tip_height, cursor.updated_at = max(tip, last_height), utcnow()
            session.add(cursor)
            session.commit()
        for _, scan in batch:
            for out in scan.outputs:
                self._watched.outpoints.add(outpoint_key(out.txid, out.vout))
            for spend in scan.spends:
                self._watched.outpoints.discard(spend.outpoint)
        return cursor, decided

    def _record_block(self, session: Session, height: int, scan: BlockScan) -> int:
        """One block of `_apply_blocks`: its deposits, spends and chain row, its loans
        settled at its height. Returns how many screenings were decided with it."""
        rows = _Rows.load(session, scan.outputs, scan.spends)
        touched: set[int] = set()
        for out in scan.outputs:
            touched.add(self._record_output(session, out, height, scan.block_hash, rows))
        for spend in scan.spends:
            loan_id = self._record_spend(session, spend, height, rows)
            if loan_id is not None:
                touched.add(loan_id)
        screened = rows.write(session, self.screener)
        touched.update(screened.to_settle)
        session.add(ChainBlock(height=height, hash=scan.block_hash, prev_hash=scan.prev_block_hash))
        session.flush()
        # Every mined, still-pending deposit gains a confirmation with this block.
        touched.update(repository.loan_ids_of_mined_pending(session))
        self._settle(session, touched, height, reason="block", rows=rows)
        # The next block of the batch reads its rows afresh: `_settle` writes deposits
        # with Core, behind the ORM objects this block loaded.
        session.flush()
        session.expunge_all()
        return screened.decided

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
            rows.new_screenings.append(
                screening.pending_deposit_row(loan_id, out.txid, out.vout, out.value)
            )
            record(
                session, actor=ACTOR, action="deposit.seen", loan_id=loan_id, data=_dep_data(new)
            )
            notify_loan(session, loan, "deposit.seen", _dep_data(new))
        elif height is not None and dep.block_height != height:
            revived = dep.state == DepositState.removed
            if revived:
                dep.state = DepositState.pending  # a transaction we gave up on was mined after all
            dep.block_height, dep.block_hash, dep.updated_at = height, block_hash, utcnow()
            session.add(dep)
            record(
                session, actor=ACTOR, action="deposit.mined", loan_id=loan_id, data=_dep_data(dep)
            )
            if revived:  # receivers were told it was removed: it is seen again (a new epoch)
                notify_loan(session, rows.loan(session, loan_id), "deposit.seen", _dep_data(dep))
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
            log.error("watcher.unexpected_spend", loan_id=dep.loan_id, txid=spend.txid)
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
        session.flush()  # the ORM's changes first: the rows below are read with Core
        by_loan: dict[int, list[repository.DepositRow]] = {loan_id: [] for loan_id in ids}
        rows.keep_loans(session, ids)
        for dep in repository.deposit_rows_of_loans(session, ids):
            by_loan[dep.loan_id].append(dep)
        # Deposits screening holds out of collateral stay pending, whatever their depth.
        held = screening.held_outpoints(session, ids)
        changed: list[repository.DepositRow] = []
        for loan_id in ids:
            loan = rows.loan(session, loan_id)
            deposits = by_loan[loan_id]
            confirmed = sum(d.amount_sats for d in deposits if d.state == DepositState.confirmed)
            for dep in deposits:
                confs = 0 if dep.block_height is None else height - dep.block_height + 1
                if dep.state == DepositState.confirmed and confs < dep.required_confirmations:
                    dep.state, dep.excess_sats, dep.updated_at = DepositState.pending, 0, utcnow()
                    confirmed -= dep.amount_sats
                    changed.append(dep)
                    record(
                        session,
                        actor=ACTOR,
                        action="deposit.unconfirmed",
                        loan_id=loan_id,
                        reason=reason,
                        data={**_dep_data(dep), "confirmations": confs},
                    )
                    _retract(session, loan, dep, "confirmations lost in a reorg", confs)
                elif (
                    dep.state == DepositState.pending
                    and confs >= dep.required_confirmations
                    and (dep.txid, dep.vout) not in held
                ):
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
                    changed.append(dep)
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
        repository.update_settled(session, changed)

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
        facts = {"confirmed_sats": confirmed, "required_sats": loan.required_collateral_sats}
        if to == LoanState.active:
            notify_loan(session, loan, "loan.active", facts)
        else:
            notify_loan(session, loan, "loan.awaiting_deposit", {**facts, "reason": reason})

    # -- mempool ---------------------------------------------------------------------

    def _sync_mempool(self) -> tuple[int, int]:
        """Pending deposits from the mempool, and unmined ones that left it. Everything
        the node is asked (the mempool, its new transactions, whether a vanished one was
        mined) is asked before the one write transaction opens.

        The addresses are loaded again after the mempool is listed, not only at the step's
        start: a transaction can only pay an address handed out (committed) before the
        payer learnt it, so before the listing, and each listed transaction is scanned
        against all of those. A payment to an address handed out while this step ran is
        pending after this pass, and no scanned transaction can pay an address loaded
        later, so none is ever scanned again (no rescan of the whole mempool, which would
        cost one RPC per transaction, each time an address is handed out)."""
        mempool = set(self.rpc.get_raw_mempool())
        self._load_new_addresses()
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
            self._fence(session, self._position)
            rows = _Rows.load(session, found, [])
            for out in found:
                if (out.txid, out.vout) not in rows.deposits:
                    self._record_output(session, out, None, None, rows)
                    self._watched.outpoints.add(outpoint_key(out.txid, out.vout))
                    added += 1
            # Decided now if nothing is called out. An unmined deposit cannot confirm, so
            # there is nothing to settle yet: its block settles its loan.
            rows.write(session, self.screener)
            session.flush()
            unmined = repository.unmined_deposits(session)
            for dep in unmined:
                # Only what the node was asked about: a deposit that appeared since is
                # judged on the next step.
                if dep.txid in mempool or dep.txid in mined_elsewhere or dep.txid not in asked:
                    continue
                dep.state, dep.updated_at = DepositState.removed, utcnow()
                session.add(dep)
                gone = "left the mempool unmined (replaced, double-spent or evicted)"
                record(
                    session,
                    actor=ACTOR,
                    action="deposit.removed",
                    loan_id=dep.loan_id,
                    reason=gone,
                    data=_dep_data(dep),
                )
                loan = rows.loan(session, dep.loan_id)
                notify_loan(session, loan, "deposit.removed", {**_dep_data(dep), "reason": gone})
                dep.retractions += 1
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

    def _load_new_addresses(self, page: int = ADDRESS_PAGE) -> int:
        """Add addresses handed out since the last call; paged so a million of them
        never sit in memory twice (as rows and as the index), and the index sized for
        all of them first (one allocation, no rebuilds while it fills). Returns how many.

        On PostgreSQL ids come from a sequence and hand-outs of different loans commit
        in any order: one that took id 10 may commit after one that took 11, which was
        loaded first. Ids skipped below the newest loaded one (the last `ADDRESS_GAP_WINDOW`,
        for `ADDRESS_GAP_SECONDS`) are looked up again on every call, so such an address
        is watched once it commits; a rolled-back hand-out's id never fills and expires."""
        added = 0
        now = time.monotonic()
        watched, gaps = self._watched, self._address_gaps
        with transaction(self.engine, write=False) as session:  # reads only
            if gaps:
                for address_id, spk_hex in repository.addresses_with_ids(session, sorted(gaps)):
                    assert address_id is not None
                    watched.scripts.add(bytes.fromhex(spk_hex))
                    gaps.pop(address_id, None)
                    added += 1
            watched.scripts.reserve(
                len(watched.scripts)
                + repository.count_addresses_after(session, watched.last_address_id)
            )
            while True:
                rows = repository.addresses_after(session, watched.last_address_id, page)
                expected = watched.last_address_id + 1
                for address_id, _ in rows:
                    for missing in range(
                        max(expected, address_id - ADDRESS_GAP_WINDOW), address_id
                    ):
                        gaps[missing] = now
                    expected = address_id + 1
                # One call for the page: the index's loop, not one per address.
                added += watched.scripts.update(bytes.fromhex(spk_hex) for _, spk_hex in rows)
                if rows:
                    watched.last_address_id = rows[-1][0]
                if len(rows) < page:
                    break
        floor = watched.last_address_id - ADDRESS_GAP_WINDOW
        self._address_gaps = {
            i: t for i, t in gaps.items() if i > floor and now - t < ADDRESS_GAP_SECONDS
        }
        return added


def _dep_data(dep: Deposit | repository.DepositRow | _NewDeposit) -> dict[str, Any]:
    return {
        "txid": dep.txid,
        "vout": dep.vout,
        "amount_sats": dep.amount_sats,
        "block_height": dep.block_height,
        "block_hash": dep.block_hash,
        "state": str(dep.state),
        # The deposit's epoch: how often it was taken back before this (part of event ids).
        "retractions": dep.retractions,
    }


def _announced_confirmed(dep: Deposit) -> bool:
    """Were receivers last told this deposit is confirmed? It is, or it was spent after
    it confirmed: a block's spends are recorded before it settles, so a spend in block S
    of a deposit mined in B came after its confirmation iff S - B >= required."""
    if dep.state == DepositState.confirmed:
        return True
    return (
        dep.state == DepositState.spent
        and dep.block_height is not None
        and dep.spent_height is not None
        and dep.spent_height - dep.block_height >= dep.required_confirmations
    )


def _retract(
    session: Session,
    loan: Loan,
    dep: Deposit | repository.DepositRow,
    why: str,
    confirmations: int,
) -> None:
    """Tell the loan's parties a confirmed deposit is not any more (`deposit.unconfirmed`,
    naming the block it had been confirmed in) and open the deposit's next epoch."""
    data = {**_dep_data(dep), "state": str(DepositState.pending), "confirmations": confirmations}
    notify_loan(session, loan, "deposit.unconfirmed", {**data, "reason": why})
    dep.retractions += 1


def _linked(batch: Sequence[_Scanned], block_hash: str) -> list[_Scanned]:
    """The leading blocks of `batch` that chain onto `block_hash` and onto each other."""
    linked: list[_Scanned] = []
    for height, scan in batch:
        if scan.prev_block_hash != block_hash:
            break
        linked.append((height, scan))
        block_hash = scan.block_hash
    return linked


def _batches(
    scans: Iterator[_Scanned], ready: Callable[[], bool], most: int
) -> Iterator[list[_Scanned]]:
    """The scans in runs of up to `most`: each the next scan (waited for) and those
    already `ready` after it. A failure while a run is gathered ends it and is raised
    once the run was handed out, so the blocks before it are still applied."""
    for first in scans:
        batch, failure = [first], None
        while len(batch) < most and ready():
            try:
                batch.append(next(scans))
            except StopIteration:
                break
            except Exception as exc:  # the node or the scanner, at that block
                failure = exc
                break
        yield batch
        if failure is not None:
            raise failure
