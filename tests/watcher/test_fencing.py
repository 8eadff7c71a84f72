"""Exactly one watcher writes, whatever is lost, frozen or killed (issue 11), on SQLite and
PostgreSQL with a real btcd.

The lease's generation is the fence: a takeover increments it and every write transaction
of a watcher checks it, with the cursor, before it writes. Here a watcher is frozen past
its lease and taken over, its PostgreSQL lock's session is terminated under it, its step is
stuck on a node that does not answer, and `custody watch` processes are frozen, killed
and restarted amid reorgs: afterwards the chain rows are consistent and the ledger is the
node's, and no stale watcher's write ever committed after a takeover.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select
from support.bulk import create_ready_loans
from support.watchers import (
    RecordingWatcher,
    RunningWatcher,
    WatchProcess,
    Write,
    assert_chain_rows_consistent,
    assert_ledger_agrees_with_node,
    assert_one_writer_at_a_time,
    chain_rows,
    cursor_of,
    expire_lease,
    holder_pid,
    lease_row,
    lock_sessions,
    log_tail,
    take_over,
    terminate_lock_sessions,
    watch_env,
)

from custody.audit.service import verify_chain
from custody.chain.rpc import NodeRpc
from custody.cli import LEASE_LOST_EXIT
from custody.db.models import AuditEvent, Deposit
from custody.db.session import make_engine
from custody.watcher.service import LeaseLost, Watcher, WatcherBusy, WatcherConfig
from regtest.node import RegtestNode
from regtest.slow_proxy import SlowProxy
from regtest.wait import wait_until

pytestmark = [pytest.mark.node]


@pytest.fixture
def other_engine(db_url: str, engine: Engine) -> Iterator[Engine]:
    """Another connection pool on the same database: another process's."""
    other = make_engine(db_url)
    yield other
    other.dispose()


@pytest.fixture
def proxy(regtest_node: RegtestNode) -> Iterator[SlowProxy]:
    with SlowProxy("127.0.0.1", regtest_node.rpc_port) as p:
        yield p


def _next_height(node: RegtestNode) -> int:
    return node.rpc.get_block_count() + 1


def _snapshot(engine: Engine) -> tuple[Any, ...]:
    """Everything a watcher's write could change."""
    cursor, blocks = chain_rows(engine)
    with Session(engine) as s:
        deposits = sorted(
            (d.txid, d.vout, str(d.state), d.block_height, d.spent_txid)
            for d in s.exec(select(Deposit)).all()
        )
        events = s.exec(select(func.count()).select_from(AuditEvent)).one()
    lease = lease_row(engine)
    assert lease is not None
    return (
        cursor,
        [(b.height, b.hash) for b in blocks],
        deposits,
        events,
        (lease.holder, lease.generation),
    )


class BlindToItsLock(Watcher):
    """A watcher that never notices its advisory lock is gone (behind pgbouncer in
    transaction mode the lock says nothing): only the lease's generation fences it."""

    def _check_lock(self, *, every: float = 0.0) -> None:
        return None


class IgnoresTheLock(BlindToItsLock):
    """A standby that does not take the advisory lock at all: only the lease stops it."""

    def _take_pg_lock(self) -> None:
        return None


def test_release_lets_a_second_watcher_acquire_at_once(
    engine: Engine, other_engine: Engine, regtest_node: RegtestNode
) -> None:
    """`release` expires the lease and, on PostgreSQL, ends the advisory lock with the
    session that held it: another process's watcher takes over at its first try."""
    config = WatcherConfig(start_height=_next_height(regtest_node), lease_seconds=600)
    first = Watcher(engine, regtest_node.rpc, config=config)
    first.acquire()
    first.step()
    second = Watcher(other_engine, regtest_node.rpc, config=config)
    with pytest.raises(WatcherBusy):
        second.acquire()
    lease = lease_row(engine)
    assert lease is not None and lease.holder == first.holder
    generation = lease.generation

    first.release()
    if engine.dialect.name == "postgresql":
        assert lock_sessions(engine) == [], "the advisory lock outlived release()"
    second.acquire()  # at once: the lease is 600 s long, only release() could free it
    try:
        lease = lease_row(engine)
        assert lease is not None
        assert (lease.holder, lease.generation) == (second.holder, generation + 1)
        regtest_node.mine(1)
        assert second.step().blocks_applied == 1
        with pytest.raises(LeaseLost):
            first.step()  # released: it writes nothing more
    finally:
        second.release()


@pytest.mark.parametrize("write", ["apply", "rollback"])
def test_a_stale_watcher_cannot_commit_an_apply_or_a_rollback(
    write: str, engine: Engine, other_engine: Engine, regtest_node: RegtestNode
) -> None:
    """A watcher frozen past its lease (its lock's session gone too, on PostgreSQL, and
    unnoticed) wakes up after another took over: its next block or rollback writes
    nothing and it stops; the new holder applies the same chain correctly."""
    [loan] = create_ready_loans(engine, [1_000_000], seed=f"stale-{write}")
    start = _next_height(regtest_node)
    stale = BlindToItsLock(
        engine, regtest_node.rpc, config=WatcherConfig(start_height=start, lease_seconds=600)
    )
    stale.acquire()
    try:
        paid = [regtest_node.faucet.pay(loan.address, 1_000_000)]
        regtest_node.mine(1)
        assert stale.step().blocks_applied == 1

        expire_lease(engine)  # it froze past its lease...
        if engine.dialect.name == "postgresql":
            assert terminate_lock_sessions(other_engine) == 1  # ...and its lock went
        fresh = take_over(other_engine, regtest_node.rpc, config=WatcherConfig(start_height=start))
        try:
            if write == "apply":
                regtest_node.mine(1)
            else:
                regtest_node.reorg(1)  # the deposit's block is orphaned, re-mined on a branch
            before = _snapshot(other_engine)
            with pytest.raises(LeaseLost, match="generation"):
                stale.step()
            assert _snapshot(other_engine) == before, "the stale watcher wrote"
            assert not stale.holding.is_set()
            with pytest.raises(LeaseLost):
                stale.step()  # and it stays stopped

            result = fresh.step()
            assert result.blocks_rolled_back == (1 if write == "rollback" else 0)
            assert result.blocks_applied == (2 if write == "rollback" else 1)
            assert assert_chain_rows_consistent(other_engine) == (
                regtest_node.rpc.get_block_count(),
                regtest_node.rpc.get_best_block_hash(),
            )
            assert_ledger_agrees_with_node(other_engine, regtest_node, paid)
        finally:
            fresh.release()
    finally:
        stale.release()


def test_a_step_waiting_on_a_slow_node_keeps_its_lease(
    engine: Engine, other_engine: Engine, regtest_node: RegtestNode, proxy: SlowProxy
) -> None:
    """The node answers after five leases; the lease is renewed meanwhile by the watcher's
    own thread, so a standby (even one blind to the advisory lock) is refused throughout,
    and the step then completes."""
    lease_seconds = 0.6
    config = WatcherConfig(
        start_height=_next_height(regtest_node), lease_seconds=lease_seconds, stuck_seconds=60
    )
    slow = NodeRpc(proxy.url, regtest_node.rpc_user, regtest_node.rpc_password, timeout=60)
    watcher = Watcher(engine, slow, config=config)
    watcher.acquire()
    try:
        watcher.step()
        generation = watcher._generation
        regtest_node.mine(1)
        proxy.hold(5 * lease_seconds)
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def step() -> None:
            try:
                outcome["result"] = watcher.step()
            finally:
                done.set()

        stepper = threading.Thread(target=step)
        stepper.start()
        proxy.wait_for_waiting(1)
        standby = IgnoresTheLock(other_engine, regtest_node.rpc, config=config)
        refusals = 0
        while not done.is_set():
            with pytest.raises(WatcherBusy):
                standby.acquire()
            refusals += 1
            done.wait(lease_seconds / 4)  # paces the tries; the step ending stops them
        stepper.join(timeout=30)
        assert refusals >= 8, refusals
        assert outcome["result"].blocks_applied == 1
        lease = lease_row(engine)
        assert lease is not None
        assert (lease.holder, lease.generation) == (watcher.holder, generation)
    finally:
        watcher.release()


def test_a_stuck_step_lets_a_standby_take_over_and_is_refused_when_it_wakes(
    engine: Engine, other_engine: Engine, regtest_node: RegtestNode, proxy: SlowProxy
) -> None:
    """A step that shows no progress for `stuck_seconds` (its node never answers) lets
    its lease lapse and its lock go: a standby takes over in seconds, and when the stuck
    step wakes it writes nothing."""
    start = _next_height(regtest_node)
    stuck_seconds, lease_seconds = 1.5, 0.6
    slow = NodeRpc(proxy.url, regtest_node.rpc_user, regtest_node.rpc_password, timeout=60)
    stuck = Watcher(
        engine,
        slow,
        config=WatcherConfig(
            start_height=start, lease_seconds=lease_seconds, stuck_seconds=stuck_seconds
        ),
    )
    stuck.acquire()
    try:
        stuck.step()
        proxy.hold()
        outcome: dict[str, Any] = {}

        def step() -> None:
            try:
                outcome["result"] = stuck.step()
            except BaseException as exc:
                outcome["error"] = exc

        stepper = threading.Thread(target=step)
        stepper.start()
        proxy.wait_for_waiting(1)
        held_at = time.monotonic()
        standby = take_over(
            other_engine, regtest_node.rpc, timeout=20, config=WatcherConfig(start_height=start)
        )
        try:
            took = time.monotonic() - held_at
            assert took < stuck_seconds + 2 * lease_seconds + 2, took
            regtest_node.mine(1)
            assert standby.step().blocks_applied == 1
            before = _snapshot(other_engine)
            proxy.release()
            stepper.join(timeout=60)
            assert isinstance(outcome.get("error"), WatcherBusy), outcome
            assert _snapshot(other_engine) == before, "the stuck watcher wrote when it woke"
        finally:
            standby.release()
    finally:
        proxy.release()
        stuck.release()
    print(f"\n[{engine.dialect.name}] a stuck step was taken over in {took:.1f}s")


@pytest.fixture
def pg_url(postgres_database: Any, postgres_template: str) -> str:
    url: str = postgres_database(template=postgres_template)
    return url


def test_the_lock_session_terminated_while_a_watcher_runs_never_makes_two_writers(
    pg_url: str, regtest_node: RegtestNode
) -> None:
    """PostgreSQL: watcher A's advisory lock session is terminated (pg_terminate_backend)
    during a catch-up and B starts; then again after a reorg. A stops stepping, gives its
    lease back and waits; whoever takes lock and lease writes alone. Every committed
    write is noted with its watcher and generation: generations never go back."""
    engine_a, engine_b = make_engine(pg_url), make_engine(pg_url)
    try:
        loans = create_ready_loans(engine_a, [1_000_000, 2_000_000], seed="lock-lost")
        config = WatcherConfig(start_height=_next_height(regtest_node), lease_seconds=1.0)
        writes: list[Write] = []
        a = RunningWatcher(
            RecordingWatcher(engine_a, regtest_node.rpc, config=config, writes=writes)
        )
        b: RunningWatcher | None = None
        rpc = regtest_node.rpc

        def at_tip() -> bool:
            return cursor_of(engine_a) == (rpc.get_block_count(), rpc.get_best_block_hash())

        def deposits_confirmed() -> bool:
            with Session(engine_a) as s:
                states = s.exec(select(Deposit.state)).all()
            return len(states) == len(paid) and all(st == "confirmed" for st in states)

        try:
            wait_until(lambda: lease_row(engine_a) is not None and at_tip(), timeout=30)
            paid = [regtest_node.faucet.pay(loans[0].address, 1_000_000)]
            regtest_node.mine(25)  # a catch-up in flight when the lock goes

            def settled_after(generation: int) -> bool:
                """A takeover since `generation` wrote, and the ledger is at the tip."""
                newer = max(w.generation for w in writes) > generation
                return newer and at_tip() and deposits_confirmed()

            before = max(w.generation for w in writes)
            assert terminate_lock_sessions(engine_b) == 1
            b = RunningWatcher(
                RecordingWatcher(engine_b, regtest_node.rpc, config=config, writes=writes)
            )
            wait_until(
                partial(settled_after, before),
                timeout=30,
                message="a watcher took lock and lease again and reached the tip",
            )

            regtest_node.reorg(2)
            paid.append(regtest_node.faucet.pay(loans[1].address, 2_000_000))
            regtest_node.mine(1)
            before = max(w.generation for w in writes)
            assert terminate_lock_sessions(engine_b) == 1
            wait_until(
                partial(settled_after, before),
                timeout=30,
                message="a deposit confirmed after the second loss is counted",
            )
            assert len(lock_sessions(engine_b)) == 1
        finally:
            errors = [a.close()] + ([b.close()] if b is not None else [])
        assert all(e is None or isinstance(e, LeaseLost) for e in errors), errors
        assert_one_writer_at_a_time(writes)
        assert len({w.generation for w in writes}) >= 3
        assert len({w.holder for w in writes}) >= 1
        assert_chain_rows_consistent(engine_a)
        assert_ledger_agrees_with_node(engine_a, regtest_node, paid)
    finally:
        engine_a.dispose()
        engine_b.dispose()


def test_custody_watch_is_taken_over_within_seconds_of_a_sigkill(
    db_url: str, engine: Engine, regtest_node: RegtestNode, tmp_path: Path
) -> None:
    """Two `custody watch` processes with the default lease; the one holding it is
    SIGKILLed: the standby takes over within a lease (5 s) and counts the next deposit."""
    [loan] = create_ready_loans(engine, [1_000_000], seed="sigkill-takeover")
    env = watch_env(
        db_url,
        regtest_node,
        watch_start_height=str(_next_height(regtest_node)),
        watch_poll_seconds="0.1",
    )
    logs = {name: (tmp_path / f"{name}.log").open("ab") for name in ("a", "b")}
    a, b = (WatchProcess(name, env, log) for name, log in logs.items())
    try:
        a.start()
        wait_until(
            lambda: a.pid is not None and holder_pid(engine) == a.pid,
            timeout=60,
            message=lambda: f"a holds the lease\n{log_tail(tmp_path / 'a.log')}",
        )
        b.start()
        wait_until(
            lambda: "watcher.waiting_for_lease" in (tmp_path / "b.log").read_text(),
            timeout=60,
            message=lambda: f"b waits as a standby\n{log_tail(tmp_path / 'b.log')}",
        )
        a.kill()
        killed_at = time.monotonic()
        wait_until(
            lambda: b.pid is not None and holder_pid(engine) == b.pid,
            timeout=30,
            interval=0.02,
            message=lambda: f"b takes over\n{log_tail(tmp_path / 'b.log')}",
        )
        took = time.monotonic() - killed_at
        assert took < 5.0 + 2.5, f"takeover took {took:.1f}s"
        paid = [regtest_node.faucet.pay(loan.address, 1_000_000)]
        regtest_node.mine(1)

        def counted() -> bool:
            with Session(engine) as s:
                return s.exec(select(Deposit.state)).all() == ["confirmed"]

        wait_until(counted, timeout=30, message=lambda: log_tail(tmp_path / "b.log"))
        assert b.process is not None
        b.process.terminate()
        assert b.process.wait(timeout=30) == 0, log_tail(tmp_path / "b.log")
        b.process = None
        assert_ledger_agrees_with_node(engine, regtest_node, paid)
    finally:
        a.kill()
        b.kill()
        for log in logs.values():
            log.close()
    print(f"\n[{engine.dialect.name}] takeover {took:.1f}s after SIGKILL (lease 5 s)")


def _held_by_one_of(engine: Engine, procs: list[WatchProcess]) -> bool:
    return holder_pid(engine) in {p.pid for p in procs if p.pid is not None}


def _taken_from(engine: Engine, pid: int | None) -> bool:
    return holder_pid(engine) not in (None, pid)


DEFAULT_SEED = 0xF3_9CE
ROUNDS = 12


def test_overlapping_watchers_frozen_and_killed_amid_reorgs(
    db_url: str, engine: Engine, regtest_node: RegtestNode, tmp_path: Path
) -> None:
    """Two `custody watch` processes (lease 1 s) through reorgs of depth 1-3: the lease
    holder is frozen (SIGSTOP, and on PostgreSQL its lock's session terminated) until the
    other takes over, then woken; watchers are SIGKILLed a random instant after a reorg,
    mid-rollback. A woken stale watcher only ever exits with LEASE_LOST_EXIT (or waits,
    its lock gone). Afterwards one fresh watcher steps to the tip: the chain rows are
    consistent and the ledger is the node's."""
    rng = random.Random(DEFAULT_SEED)
    node = regtest_node
    loans = create_ready_loans(engine, [50_000_000] * 4, seed="overlap")
    env = watch_env(
        db_url,
        node,
        watch_start_height=str(_next_height(node)),
        watch_poll_seconds="0.02",
        watch_lease_seconds="1",
    )
    log_path = tmp_path / "watchers.log"
    postgres = engine.dialect.name == "postgresql"
    paid: list[tuple[str, int]] = []
    overlaps = kills = 0
    with log_path.open("ab") as log:
        procs = [WatchProcess(f"w{i}", env, log) for i in range(2)]
        try:
            for p in procs:
                p.start()
            node.mine(4)  # so that reorgs of depth 1-3 stay above the first block watched
            tip_hash = node.rpc.get_best_block_hash()
            wait_until(
                lambda: (cursor := cursor_of(engine)) is not None and cursor[1] == tip_hash,
                timeout=60,
                message=lambda: log_tail(log_path),
            )
            for round_no in range(ROUNDS):
                for loan in rng.sample(loans, rng.randint(1, 2)):
                    paid.append(node.faucet.pay(loan.address, rng.randrange(100_000, 900_000)))
                action = ("reorg", "freeze", "reorg", "mine")[round_no % 4]
                if action == "freeze":
                    wait_until(
                        partial(_held_by_one_of, engine, procs),
                        timeout=30,
                        message=lambda: log_tail(log_path),
                    )
                    holder = holder_pid(engine)
                    victim = next((p for p in procs if p.pid == holder), None)
                    if victim is not None:
                        victim.freeze()
                        if postgres:
                            terminate_lock_sessions(engine)
                        node.reorg(rng.randint(1, 2))
                        try:
                            wait_until(partial(_taken_from, engine, holder), timeout=6)
                            overlaps += 1
                        except AssertionError:
                            pass  # frozen inside a SQLite write: nobody can write meanwhile
                        victim.thaw()
                elif action == "reorg":
                    node.reorg(rng.randint(1, 3))
                    time.sleep(rng.uniform(0.0, 0.08))  # a random instant, not a wait
                    rng.choice(procs).kill()
                    kills += 1
                else:
                    node.mine(1)
                for p in procs:
                    code = p.exited()
                    assert code in (None, LEASE_LOST_EXIT), f"{p.name} exited {code}:\n" + log_tail(
                        log_path
                    )
                    if p.process is None:
                        p.start()
        finally:
            for p in procs:
                p.thaw()
                p.kill()
    assert overlaps >= 1 and kills == ROUNDS // 2, (overlaps, kills)

    node.mine(1)
    final = take_over(engine, node.rpc, timeout=15, config=WatcherConfig(lease_seconds=5))
    try:
        tip = (node.rpc.get_block_count(), node.rpc.get_best_block_hash())
        for _ in range(3):
            final.step()
        assert assert_chain_rows_consistent(engine) == tip
        assert_ledger_agrees_with_node(engine, node, paid)
        with Session(engine) as s:
            report = verify_chain(s)
            stalled = s.exec(
                select(func.count())
                .select_from(AuditEvent)
                .where(col(AuditEvent.action) == "watcher.stalled")
            ).one()
        assert report.ok, report.as_dict()
        assert stalled == 0
    finally:
        final.release()
    print(
        f"\n[{engine.dialect.name}] {len(paid)} payments, {overlaps} overlaps (frozen holder "
        f"taken over), {kills} kills amid reorgs"
    )
