"""A long catch-up is fetched and scanned by a child process (custody/chain/scanfeed.py):
it must find exactly what the watcher finds scanning itself, including a spend of an
output paid earlier in the same catch-up, against a real btcd."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from support.spend import held_loan
from support.world import World, audit_actions, build_world

from custody.chain import scanfeed
from custody.chain.blocks import ScriptIndex
from custody.chain.scanfeed import ScanFeed, ScannerDied
from custody.db.models import AuditEvent, Deposit, DepositState
from custody.watcher.service import Watcher, WatcherConfig
from regtest.node import RegtestNode
from regtest.wait import wait_until


@pytest.fixture(autouse=True)
def _forks() -> None:
    """The service runs on Linux, where the scanner forks: a machine where it cannot is a
    failure here, never a skip."""
    assert scanfeed.can_fork(), "the scanning child needs fork (Linux)"


def _deposits(engine: Engine, loan_id: int) -> list[Deposit]:
    with Session(engine) as session:
        return list(session.exec(select(Deposit).where(Deposit.loan_id == loan_id)).all())


def test_a_catch_up_scanned_by_the_child_finds_payments_and_their_spends(
    engine: Engine, regtest_node: RegtestNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    world: World = build_world(engine)
    held = held_loan(world, required_collateral_sats=20_000_000)
    loan = held.loan
    other = world.keyed_loan(required_collateral_sats=30_000_000)
    start = regtest_node.rpc.get_block_count() + 1
    entered: list[tuple[int, int]] = []
    enter = ScanFeed.__enter__

    def spy(feed: ScanFeed) -> ScanFeed:
        entered.append((feed.first, feed.last))
        return enter(feed)

    monkeypatch.setattr(ScanFeed, "__enter__", spy)
    watcher = Watcher(
        engine, regtest_node.rpc, config=WatcherConfig(start_height=start, scan_process_blocks=3)
    )
    watcher.acquire()
    try:
        # Paid in one block, spent (outside the service) two blocks later, another loan
        # paid in the last: all behind the watcher, caught up in one step.
        txid, vout = regtest_node.faucet.pay(loan["collateral_address"], 20_000_000)
        regtest_node.mine(2)
        spend_txid = regtest_node.rpc.send_raw_transaction(held.moved_out((txid, vout), 20_000_000))
        other_txid, _ = regtest_node.faucet.pay(other["collateral_address"], 30_000_000)
        regtest_node.mine(1)
        tip = regtest_node.rpc.get_block_count()

        result = watcher.step()
    finally:
        watcher.release()

    assert entered == [(start, tip)]  # the child scanned the whole catch-up
    assert (result.blocks_applied, result.height) == (tip - start + 1, tip)
    [dep] = _deposits(engine, loan["id"])
    assert (dep.txid, dep.state, dep.spent_txid) == (txid, DepositState.spent, spend_txid)
    assert dep.spent_height == tip and dep.block_height == tip - 2
    [paid] = _deposits(engine, other["id"])
    assert (paid.txid, paid.state, paid.block_height) == (other_txid, DepositState.confirmed, tip)
    actions = audit_actions(engine, loan_id=loan["id"])
    assert actions.count("deposit.seen") == 1 and actions.count("deposit.spent") == 1
    with Session(engine) as session:
        alert = session.exec(
            select(AuditEvent).where(
                AuditEvent.loan_id == loan["id"], AuditEvent.action == "alert.unexpected_spend"
            )
        ).one()
    assert spend_txid in alert.data


def test_a_child_that_dies_is_an_error_not_an_end(regtest_node: RegtestNode) -> None:
    """A killed scanner must not read as "no more blocks": the step fails and is retried."""
    regtest_node.mine(3)
    tip = regtest_node.rpc.get_block_count()
    with ScanFeed(regtest_node.rpc, tip - 2, tip, ScriptIndex(), set()) as feed:
        process: Any = feed._process
        process.kill()
        process.join()
        with pytest.raises(ScannerDied):
            for _ in feed:
                pass


def test_the_node_s_error_comes_out_in_place_of_the_block(regtest_node: RegtestNode) -> None:
    tip = regtest_node.rpc.get_block_count()
    with ScanFeed(regtest_node.rpc, tip, tip + 5, ScriptIndex(), set()) as feed:
        heights: list[int] = []
        with pytest.raises(Exception) as failed:
            for height, _ in feed:
                heights.append(height)
    assert not isinstance(failed.value, ScannerDied)
    assert heights in ([], [tip])  # a batch of hashes past the tip fails as a whole


_HOLD_A_FEED = """
import sys
from custody.chain.blocks import ScriptIndex
from custody.chain.rpc import NodeRpc
from custody.chain.scanfeed import ScanFeed

feed = ScanFeed(NodeRpc(sys.argv[1], "user", "password", 60.0), 1, 100, ScriptIndex(), set())
feed.__enter__()
print(feed._process.pid, flush=True)
sys.stdin.read()
"""


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has ended; its reaper is not ours


@pytest.mark.process
def test_the_scanner_dies_with_a_killed_watcher(tmp_path: Path) -> None:
    """A SIGKILLed watcher leaves no scanner behind, even one waiting on a silent node
    (a listening socket that never answers: the child would wait out its 60 s timeout)."""
    assert sys.platform == "linux", "PR_SET_PDEATHSIG is Linux's: the service runs there"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        watcher = subprocess.Popen(
            [sys.executable, "-c", _HOLD_A_FEED, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert watcher.stdout is not None
            child = int(watcher.stdout.readline())
            silent.settimeout(20)
            asked, _ = silent.accept()  # the child is waiting on its first request
            with asked:
                assert _running(child)
                watcher.kill()
                watcher.wait(timeout=20)
                wait_until(lambda: not _running(child), timeout=10, message="the scanner ends")
        finally:
            watcher.kill()
            watcher.wait(timeout=20)
