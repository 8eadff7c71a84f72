"""`custody watch` killed with SIGKILL at random points, restarted, and checked against
the node: every payment counted exactly once, nothing lost, the audit chain intact.

The watcher is a real subprocess (the production entry point), so a kill really
cuts it mid-transaction, mid-RPC or mid-import; only the database's atomic commits
stand between that and a lost or doubled deposit. The payment and kill schedule
come from a seeded `random.Random`; only where the kill lands inside the watcher's
work varies with timing, which is the point.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select
from support.bulk import ReadyLoan, create_ready_loans
from support.watchers import watch_env

from custody.audit.service import verify_chain
from custody.db.models import AuditEvent, ChainCursor, Deposit, DepositState, Loan, LoanState
from custody.watcher.service import ACTOR, Watcher, WatcherConfig
from regtest.node import RegtestNode, wait_until

DEFAULT_SEED = 0xC0FFEE
# Soak with other schedules: CUSTODY_TEST_CRASH_SEED=<int> pytest ... (the default is fixed).
SEED = int(os.environ.get("CUSTODY_TEST_CRASH_SEED", DEFAULT_SEED))
ROUNDS = 34  # one or three blocks each
BURST_EVERY = 4  # every 4th round mines 3 blocks at once and kills the watcher amid them
MIN_KILLS = 8


@dataclass(frozen=True)
class Paid:
    txid: str
    vout: int
    loan_id: int
    amount: int


class WatcherProcesses:
    """Starts `custody watch` subprocesses one at a time, kills and reaps them.

    Output of every run goes to one log file (with a header per start) so that a
    failure can show what the watchers said; `close()` (the fixture finaliser)
    guarantees no watcher outlives the test.
    """

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        self.exit_codes: list[int] = []  # of watchers that exited before we killed them
        self._log: IO[bytes] = log_path.open("ab")

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "one watcher at a time"
        self.starts += 1
        self._log.write(f"\n=== watcher start #{self.starts}\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "custody.cli", "watch"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no finally blocks, no lease release, no rollback but the database's."""
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        else:  # it died on its own: a crash the restarts must not hide
            self.exit_codes.append(self.process.returncode)
        self.process.wait(timeout=10)
        self.kills += 1
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def terminate(self) -> int:
        """SIGTERM: the watcher finishes its step, releases its lease and exits."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=15)
        self.process = None
        return code

    def close(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None
        self._log.close()

    def tail(self, lines: int = 40) -> str:
        """The watchers' last words, without httpx's line per RPC request."""
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join([t for t in text if not t.startswith("HTTP Request:")][-lines:])


def _watch_env(db_url: str, node: RegtestNode, start_height: int) -> dict[str, str]:
    return watch_env(
        db_url,
        node,
        watch_start_height=str(start_height),
        watch_poll_seconds="0.02",
        watch_lease_seconds="1",
    )


@pytest.fixture
def watchers(
    db_url: str, engine: Engine, regtest_node: RegtestNode, tmp_path: Path
) -> Iterator[WatcherProcesses]:
    env = _watch_env(db_url, regtest_node, regtest_node.rpc.get_block_count() + 1)
    procs = WatcherProcesses(env, tmp_path / "watchers.log")
    try:
        yield procs
    finally:
        procs.close()


def _cursor(engine: Engine) -> tuple[int, str] | None:
    with Session(engine) as s:
        row = s.get(ChainCursor, 1)
        return None if row is None else (row.height, row.block_hash)


def _recorded(engine: Engine, outpoints: list[tuple[str, int]]) -> bool:
    with Session(engine) as s:
        txids = {txid for txid, _ in outpoints}
        rows = s.exec(select(Deposit.txid, Deposit.vout).where(col(Deposit.txid).in_(txids))).all()
    return set(outpoints) <= {(t, v) for t, v in rows}


def _pay(node: RegtestNode, rng: random.Random, loans: list[ReadyLoan]) -> list[Paid]:
    """1-3 payments to random loans (repeats allowed); sometimes several in one tx."""
    targets = [rng.choice(loans) for _ in range(rng.randint(1, 3))]
    amounts = [rng.randrange(200_000, 2_000_000) for _ in targets]
    if len(targets) > 1 and rng.random() < 0.4:
        txid = node.faucet.pay_many([(t.address, a) for t, a in zip(targets, amounts, strict=True)])
        return [
            Paid(txid, vout, t.loan_id, a)
            for vout, (t, a) in enumerate(zip(targets, amounts, strict=True))
        ]
    paid = []
    for t, a in zip(targets, amounts, strict=True):
        txid, vout = node.faucet.pay(t.address, a)
        paid.append(Paid(txid, vout, t.loan_id, a))
    return paid


def _events(engine: Engine) -> list[tuple[str, dict[str, Any], int | None]]:
    with Session(engine) as s:
        rows = s.exec(
            select(AuditEvent.action, AuditEvent.data, AuditEvent.loan_id)
            .where(AuditEvent.actor == ACTOR)
            .order_by(col(AuditEvent.id))
        ).all()
    return [(action, json.loads(data), loan_id) for action, data, loan_id in rows]


def test_watcher_survives_sigkill_at_random_points(
    engine: Engine, regtest_node: RegtestNode, watchers: WatcherProcesses
) -> None:
    rng = random.Random(SEED)
    node, rpc = regtest_node, regtest_node.rpc
    # Half the loans count a deposit after one block, half after two: a kill can also
    # land between a deposit being mined and it being confirmed.
    loans = create_ready_loans(
        engine, [rng.randrange(2_000_000, 12_000_000) for _ in range(5)], seed="crash-1conf"
    ) + create_ready_loans(
        engine,
        [rng.randrange(2_000_000, 12_000_000) for _ in range(5)],
        seed="crash-2conf",
        required_confirmations=2,
    )
    started = time.monotonic()
    watchers.start()
    paid: list[Paid] = []
    landed: Counter[str] = Counter()

    def cursor_at_least(height: int) -> bool:
        cur = _cursor(engine)
        return cur is not None and cur[0] >= height

    for round_no in range(ROUNDS):
        payments = _pay(node, rng, loans)
        paid.extend(payments)
        if rng.random() < 0.35:
            # Let the watcher find them in the mempool first (a restarted one too).
            wait_until(
                partial(_recorded, engine, [(x.txid, x.vout) for x in payments]),
                timeout=20,
                message=lambda: f"mempool deposits recorded; watcher log:\n{watchers.tail()}",
            )
        burst = round_no % BURST_EVERY == BURST_EVERY - 1
        delay = rng.uniform(0.0, 0.15)
        random_kill = rng.random() < 0.3
        kill_on_first_block = rng.random() < 0.5
        if burst:
            # Kill a watcher that is up and polling, a random instant after three blocks
            # arrive at once: before, between or inside the blocks' transactions.
            base = rpc.get_block_count()
            wait_until(
                partial(cursor_at_least, base),
                timeout=20,
                message=lambda: f"watcher up; log:\n{watchers.tail()}",
            )
            node.mine(3)
            if kill_on_first_block:  # most likely lands inside block 2 or 3
                wait_until(partial(cursor_at_least, base + 1), timeout=20, interval=0.002)
            else:
                time.sleep(delay)  # a random instant to kill at, not a wait for anything
            watchers.restart()
            cur = _cursor(engine)
            landed[("none", "mid-burst", "mid-burst", "after")[cur[0] - base if cur else 0]] += 1
        else:
            node.mine(1)
            if random_kill:
                time.sleep(delay)  # a random instant to kill at, not a wait for anything
                watchers.restart()
                landed["single"] += 1

    assert watchers.kills >= MIN_KILLS, "the schedule must kill the watcher often enough"
    assert watchers.exit_codes == [], f"a watcher exited by itself:\n{watchers.tail()}"
    # One more block so deposits needing two confirmations have them, then a final restart.
    node.mine(1)
    watchers.restart()
    tip_height, tip_hash = rpc.get_block_count(), rpc.get_best_block_hash()

    def unmined() -> list[tuple[str, int]]:
        """Deposits still waiting for a block (every payment is mined by now)."""
        with Session(engine) as s:
            rows = s.exec(
                select(Deposit.txid, Deposit.vout).where(
                    Deposit.state == DepositState.pending, col(Deposit.block_height).is_(None)
                )
            ).all()
        return [(t, v) for t, v in rows]

    wait_until(
        lambda: _cursor(engine) == (tip_height, tip_hash) and not unmined(),
        timeout=30,
        message=lambda: (
            f"cursor at tip {tip_height} (is {_cursor(engine)}), no deposit left unmined "
            f"(left: {unmined()}); watchers' log:\n{watchers.tail()}"
        ),
    )
    assert watchers.terminate() == 0, watchers.tail()
    elapsed = time.monotonic() - started

    # -- the node's view of every payment ------------------------------------------------
    heights: dict[str, tuple[int, str]] = {}
    for txid in {p.txid for p in paid}:
        info = rpc.call("getrawtransaction", txid, 1)
        assert info.get("blockhash"), f"payment {txid} was never mined"
        header = rpc.get_block_header(info["blockhash"])
        heights[txid] = (int(header["height"]), str(info["blockhash"]))

    loan_ids = {loan.loan_id for loan in loans}
    with Session(engine) as s:
        deposits = s.exec(select(Deposit)).all()
        loan_rows = {
            row.id: row for row in s.exec(select(Loan).where(col(Loan.id).in_(loan_ids))).all()
        }
        report = verify_chain(s)
    assert report.ok, report.as_dict()

    by_outpoint = {(d.txid, d.vout): d for d in deposits}
    assert len(by_outpoint) == len(deposits)
    assert set(by_outpoint) == {(p.txid, p.vout) for p in paid}, "missing or extra deposits"
    for p in paid:
        dep = by_outpoint[(p.txid, p.vout)]
        height, block_hash = heights[p.txid]
        assert (dep.loan_id, dep.amount_sats) == (p.loan_id, p.amount), p
        assert (dep.block_height, dep.block_hash) == (height, block_hash), p
        assert dep.state == DepositState.confirmed, p

    # -- every outpoint seen once, mined at most once, confirmed once --------------------
    events = _events(engine)
    per_outpoint: dict[str, Counter[tuple[str, int]]] = {
        action: Counter((e["txid"], e["vout"]) for a, e, _ in events if a == action)
        for action in ("deposit.seen", "deposit.mined", "deposit.confirmed")
    }
    seen_in_mempool = {
        (e["txid"], e["vout"])
        for a, e, _ in events
        if a == "deposit.seen" and e["block_height"] is None
    }
    for outpoint in by_outpoint:
        assert per_outpoint["deposit.seen"][outpoint] == 1, outpoint
        assert per_outpoint["deposit.confirmed"][outpoint] == 1, outpoint
        # Seen in the mempool: mined exactly once later; seen in a block: no "mined" event.
        assert per_outpoint["deposit.mined"][outpoint] == int(outpoint in seen_in_mempool)
    assert sum(per_outpoint["deposit.seen"].values()) == len(paid)
    assert not any(a in ("deposit.removed", "deposit.reorged") for a, _, _ in events)

    # -- loans: active iff the confirmed sum covers the requirement ----------------------
    activations = Counter(
        loan_id for a, e, loan_id in events if a == "loan.state_changed" and e["to"] == "active"
    )
    for loan in loans:
        total = sum(p.amount for p in paid if p.loan_id == loan.loan_id)
        row = loan_rows[loan.loan_id]
        expected = LoanState.active if total >= loan.required_sats else LoanState.awaiting_deposit
        assert row.state == expected, (loan, total)
        assert activations[loan.loan_id] == int(expected == LoanState.active), loan
        excess = sum(d.excess_sats for d in deposits if d.loan_id == loan.loan_id)
        assert excess == max(0, total - loan.required_sats), (loan, total, excess)
    if SEED == DEFAULT_SEED:  # the fixed schedule covers both outcomes
        states = {row.state for row in loan_rows.values()}
        assert states == {LoanState.active, LoanState.awaiting_deposit}
        assert seen_in_mempool, "some rounds wait for the mempool: those deposits are seen there"
    print(
        f"\n[{engine.dialect.name}] {len(paid)} payments ({len(seen_in_mempool)} seen in the "
        f"mempool first), {watchers.kills} kills "
        f"({dict(landed)}), {watchers.starts} starts, {elapsed:.1f}s"
    )


def test_a_failed_mempool_write_is_retried_on_the_next_step(
    engine: Engine, regtest_node: RegtestNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that fails half-way (the database briefly away) is retried by the next
    one, mempool included: the failed step must not have marked the tx as seen."""
    [loan] = create_ready_loans(engine, [1_000_000], seed="mempool-retry")
    watcher = Watcher(
        engine,
        regtest_node.rpc,
        config=WatcherConfig(start_height=regtest_node.rpc.get_block_count() + 1),
    )
    watcher.acquire()
    try:
        watcher.step()
        txid, vout = regtest_node.faucet.pay(loan.address, 1_000_000)

        def database_away(*_: object, **__: object) -> int:
            raise OperationalError("INSERT", {}, Exception("connection lost"))

        with monkeypatch.context() as patch:
            patch.setattr(Watcher, "_record_output", database_away)
            with pytest.raises(OperationalError):
                watcher.step()
        assert not _recorded(engine, [(txid, vout)])

        assert watcher.step().mempool_deposits == 1
        with Session(engine) as s:
            dep = s.exec(select(Deposit).where(Deposit.txid == txid)).one()
        assert (dep.vout, dep.state, dep.block_height) == (vout, DepositState.pending, None)
    finally:
        watcher.release()
