"""For tests of the watcher's single writer: the chain rows' invariants, the PostgreSQL
session holding the watcher's advisory lock, a watcher that notes each write it commits,
and `custody watch` subprocesses started, frozen, killed and restarted at will."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from custody.chain.rpc import NodeRpc
from custody.db.models import (
    AuditEvent,
    ChainBlock,
    ChainCursor,
    Deposit,
    DepositState,
    WatcherLease,
)
from custody.watcher.repository import _PG_WATCHER_LOCK
from custody.watcher.service import Watcher, WatcherBusy
from regtest.node import RegtestNode
from regtest.wait import wait_until

LOCK_HOLDERS = (
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
    " AND ((classid::bigint << 32) | objid::bigint) = :k"
)


def cursor_of(engine: Engine) -> tuple[int, str] | None:
    with Session(engine) as s:
        cursor = s.get(ChainCursor, 1)
        return None if cursor is None else (cursor.height, cursor.block_hash)


def chain_rows(engine: Engine) -> tuple[tuple[int, str], list[ChainBlock]]:
    """The cursor (height, hash) and the applied blocks, lowest first."""
    with Session(engine) as s:
        cursor = s.get(ChainCursor, 1)
        blocks = list(s.exec(select(ChainBlock).order_by(col(ChainBlock.height))).all())
    assert cursor is not None, "no cursor"
    return (cursor.height, cursor.block_hash), blocks


def assert_chain_rows_consistent(engine: Engine) -> tuple[int, str]:
    """Every applied block at or below the cursor, the top one the cursor's, each linked
    to the one below: what overlapping rollbacks broke (issue 11). Returns the cursor."""
    cursor, blocks = chain_rows(engine)
    above = [(b.height, b.hash) for b in blocks if b.height > cursor[0]]
    assert not above, f"chain rows above the cursor {cursor}: {above}"
    if blocks:
        assert (blocks[-1].height, blocks[-1].hash) == cursor, (blocks[-1], cursor)
        for low, high in itertools.pairwise(blocks):
            assert high.height == low.height + 1, f"a gap between {low} and {high}"
            assert high.prev_hash == low.hash, f"{high} does not follow {low}"
    return cursor


def assert_ledger_agrees_with_node(
    engine: Engine, node: RegtestNode, paid: list[tuple[str, int]]
) -> None:
    """Each paid outpoint is one confirmed deposit, in the block the node has it in."""
    with Session(engine) as s:
        deposits = list(s.exec(select(Deposit)).all())
    by_outpoint = {(d.txid, d.vout): d for d in deposits}
    assert len(by_outpoint) == len(deposits), "an outpoint recorded twice"
    assert set(by_outpoint) == set(paid), "missing or extra deposits"
    for txid, vout in paid:
        info = node.rpc.call("getrawtransaction", txid, 1)
        assert info.get("blockhash"), f"{txid} not mined"
        height = int(node.rpc.get_block_header(info["blockhash"])["height"])
        dep = by_outpoint[(txid, vout)]
        story = f"{dep}\nnode: block {height} {info['blockhash']}\n" + _history(engine, txid)
        assert (dep.block_height, dep.block_hash) == (height, info["blockhash"]), story
        assert dep.state == DepositState.confirmed, story


def _history(engine: Engine, txid: str) -> str:
    """The watcher's audit events about `txid`, and the applied blocks, for a failure."""
    with Session(engine) as s:
        events = s.exec(
            select(AuditEvent.id, AuditEvent.action, AuditEvent.data)
            .where(col(AuditEvent.data).contains(txid))
            .order_by(col(AuditEvent.id))
        ).all()
        blocks = s.exec(select(ChainBlock).order_by(col(ChainBlock.height))).all()
    lines = [f"event {i} {a} {d}" for i, a, d in events]
    lines += [f"block {b.height} {b.hash} (prev {b.prev_hash[:16]})" for b in blocks]
    return "\n".join(lines)


def lock_sessions(engine: Engine) -> list[int]:
    """PostgreSQL sessions holding the watcher's advisory lock."""
    with engine.connect() as conn:
        return [int(p) for p in conn.execute(text(LOCK_HOLDERS), {"k": _PG_WATCHER_LOCK}).scalars()]


def terminate_lock_sessions(engine: Engine) -> int:
    """`pg_terminate_backend` on whoever holds the watcher's advisory lock, as a DBA, a
    restart or an idle-session timeout would; returns how many sessions were ended."""
    with engine.connect() as conn:
        ended = conn.execute(
            text(f"SELECT pg_terminate_backend(pid) FROM ({LOCK_HOLDERS}) AS holders"),
            {"k": _PG_WATCHER_LOCK},
        ).scalars()
        count = sum(1 for e in ended if e)
        conn.commit()
    return count


def lease_row(engine: Engine) -> WatcherLease | None:
    with Session(engine) as s:
        return s.get(WatcherLease, 1)


def expire_lease(engine: Engine) -> None:
    """The lease runs out as if its holder froze past it (no renewal came)."""
    with Session(engine) as s:
        lease = s.get(WatcherLease, 1)
        assert lease is not None
        lease.expires_at = lease.expires_at.replace(year=2000)
        s.add(lease)
        s.commit()


def take_over(engine: Engine, rpc: NodeRpc, timeout: float = 30.0, **kwargs: Any) -> Watcher:
    """A new watcher on `engine`, once it has the lease (it waits like a standby)."""
    watcher = Watcher(engine, rpc, **kwargs)

    def acquired() -> bool:
        try:
            watcher.acquire()
        except WatcherBusy:
            return False
        return True

    wait_until(acquired, timeout=timeout, interval=0.02, message="the lease taken over")
    return watcher


@dataclass(frozen=True)
class Write:
    """One committed write transaction of a watcher: who, at which generation, when its
    fence passed (monotonic seconds)."""

    holder: str
    generation: int
    fenced_at: float


class RecordingWatcher(Watcher):
    """The real watcher; each write transaction it commits is noted in `writes`."""

    def __init__(self, *args: Any, writes: list[Write], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes = writes

    def _fence(
        self,
        session: Session,
        at: tuple[int, str] | None = None,
        *,
        extend: bool = False,
        check_lock: bool = True,
    ) -> None:
        super()._fence(session, at, extend=extend, check_lock=check_lock)
        assert self._generation is not None
        write = Write(self.holder, self._generation, time.monotonic())

        def committed(_session: object) -> None:
            self.writes.append(write)

        event.listen(session, "after_commit", committed, once=True)


def assert_one_writer_at_a_time(writes: list[Write]) -> None:
    """In the order their fences passed, generations never go back, and each generation
    is one watcher's: once a takeover wrote, no write of an older holder committed."""
    ordered = sorted(writes, key=lambda w: w.fenced_at)
    holders: dict[int, set[str]] = {}
    for w in ordered:
        holders.setdefault(w.generation, set()).add(w.holder)
    shared = {g: h for g, h in holders.items() if len(h) > 1}
    assert not shared, f"generations written by two watchers: {shared}"
    back = [(a, b) for a, b in itertools.pairwise(ordered) if b.generation < a.generation]
    assert not back, f"a stale watcher wrote after a takeover: {back[:3]}"


class RunningWatcher:
    """`Watcher.run` in a thread of its own, as `custody watch` runs it."""

    def __init__(self, watcher: Watcher, poll_seconds: float = 0.05) -> None:
        self.watcher = watcher
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(poll_seconds,), daemon=True)
        self._thread.start()

    def _run(self, poll_seconds: float) -> None:
        try:
            self.watcher.run(self.stop, poll_seconds)
        except BaseException as exc:
            self.error = exc

    def close(self) -> BaseException | None:
        self.stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the watcher did not stop"
        return self.error


def watch_env(db_url: str, node: RegtestNode, **settings: str) -> dict[str, str]:
    """The parent's environment minus any service settings, plus the test's."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CUSTODY_", "HSM_", "SOFTHSM2_CONF"))
        and k not in ("DATABASE_URL", "PYTEST_CURRENT_TEST")
    }
    return {
        **base,
        "PYTHONUNBUFFERED": "1",
        "DATABASE_URL": db_url,
        "CUSTODY_NETWORK": "regtest",
        "CUSTODY_NODE_RPC_URL": node.rpc_url,
        "CUSTODY_NODE_RPC_USER": node.rpc_user,
        "CUSTODY_NODE_RPC_PASSWORD": node.rpc_password,
        "CUSTODY_CONFIRMATIONS_SMALL": "1",
        **{f"CUSTODY_{k.upper()}": v for k, v in settings.items()},
    }


class WatchProcess:
    """One `custody watch` subprocess slot: started, frozen, killed, restarted. Its output
    goes to a shared log with a header per start."""

    def __init__(self, name: str, env: dict[str, str], log: IO[bytes]) -> None:
        self.name = name
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.exits: list[int] = []  # exit codes of runs that ended by themselves

    def start(self) -> None:
        self.log.write(f"\n=== {self.name} start\n".encode())
        self.log.flush()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "custody.cli", "watch"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def exited(self) -> int | None:
        """The exit code if it ended by itself (noted once), else None."""
        if self.process is None or self.process.poll() is None:
            return None
        code = self.process.returncode
        self.exits.append(code)
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL: no finally blocks, no lease given back, no rollback but the database's."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        else:
            self.exits.append(self.process.returncode)
        self.process = None

    def freeze(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)


def log_tail(path: Path, lines: int = 60) -> str:
    text_ = path.read_text(errors="replace").splitlines()
    return "\n".join([t for t in text_ if not t.startswith("HTTP Request:")][-lines:])


def holder_pid(engine: Engine) -> int | None:
    """The process id in the lease's holder name (host:pid:token), if it is unexpired."""
    lease = lease_row(engine)
    if lease is None:
        return None
    now = time.time()
    if lease.expires_at.timestamp() <= now:
        return None
    return int(lease.holder.split(":")[1])
