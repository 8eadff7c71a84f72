"""A long catch-up applies the blocks the scanning child has ready several to a
transaction (`WatcherConfig.blocks_per_commit`). Each block must still be settled at its
own height, as when each had its own transaction: a deposit confirmed in one block and
spent in the next was confirmed first, a deposit needing three confirmations is
confirmed by its third block, and a failure anywhere in the batch writes none of it."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from support.spend import held_loan
from support.world import World, audit_actions, build_world

from custody.chain.scanfeed import ScanFeed
from custody.db.models import AuditEvent, ChainBlock, ChainCursor, Deposit, DepositState
from custody.watcher import service as watcher_service
from custody.watcher.service import Watcher, WatcherConfig
from regtest.node import RegtestNode

BATCH = 4


@pytest.fixture
def batched(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Every batch is as long as it may be (the next scan waited for, not only taken when
    it happens to be there), and the heights of each batch applied."""
    monkeypatch.setattr(
        ScanFeed, "ready", lambda feed: feed._reader is not None and feed._reader.poll(30)
    )
    applied: list[list[int]] = []
    apply = Watcher._apply_blocks

    def spy(watcher: Watcher, batch: Sequence[Any], tip: int) -> Any:
        applied.append([height for height, _ in batch])
        return apply(watcher, batch, tip)

    monkeypatch.setattr(Watcher, "_apply_blocks", spy)
    return applied


def _story(
    engine: Engine, regtest_node: RegtestNode, seen_first: bool = False
) -> tuple[World, dict[str, Any], dict[str, Any], int, str, Watcher]:
    """Behind a watcher (that saw the payments in the mempool when `seen_first`): block 1
    pays loan A (one confirmation needed) and loan B (a large deposit: three), block 2
    spends A's deposit outside the service, blocks 3 and 4 are empty. Returns the world,
    A, B, the first height, the spend and the watcher."""
    world = build_world(engine)
    held = held_loan(world, required_collateral_sats=20_000_000)
    a = held.loan
    b = world.keyed_loan(required_collateral_sats=30_000_000)
    start = regtest_node.rpc.get_block_count() + 1
    txid, vout = regtest_node.faucet.pay(a["collateral_address"], 20_000_000)
    regtest_node.faucet.pay(b["collateral_address"], 30_000_000)
    watcher = _watcher(engine, regtest_node, start)
    if seen_first:
        assert watcher.step().mempool_deposits == 2
    regtest_node.mine(1)
    spend = regtest_node.rpc.send_raw_transaction(held.moved_out((txid, vout), 20_000_000))
    regtest_node.mine(3)
    return world, a, b, start, spend, watcher


def _watcher(engine: Engine, regtest_node: RegtestNode, start: int) -> Watcher:
    config = WatcherConfig(
        start_height=start,
        scan_process_blocks=2,
        blocks_per_commit=BATCH,
        large_deposit_sats=25_000_000,
        confirmations_large=3,
    )
    watcher = Watcher(engine, regtest_node.rpc, config=config)
    watcher.acquire()
    return watcher


def _confirmed_at(engine: Engine, loan_id: int) -> int:
    with Session(engine) as session:
        data = session.exec(
            select(AuditEvent.data).where(
                AuditEvent.loan_id == loan_id, AuditEvent.action == "deposit.confirmed"
            )
        ).one()
    confirmations: int = json.loads(data)["confirmations"]
    return confirmations


@pytest.mark.parametrize("seen_first", [False, True], ids=["mined", "seen-then-mined"])
def test_blocks_of_one_transaction_are_each_settled_at_their_own_height(
    engine: Engine, regtest_node: RegtestNode, batched: list[list[int]], seen_first: bool
) -> None:
    world, a, b, start, spend, watcher = _story(engine, regtest_node, seen_first)
    try:
        result = watcher.step()
    finally:
        watcher.release()

    assert batched == [[start, start + 1, start + 2, start + 3]]  # one transaction
    assert (result.blocks_applied, result.height) == (4, start + 3)
    with Session(engine) as session:
        [dep] = session.exec(select(Deposit).where(Deposit.loan_id == a["id"])).all()
        assert (dep.state, dep.block_height) == (DepositState.spent, start)
        assert (dep.spent_txid, dep.spent_height) == (spend, start + 1)
        heights = session.exec(select(ChainBlock.height).order_by(col(ChainBlock.height))).all()
        assert list(heights)[-4:] == [start, start + 1, start + 2, start + 3]
    # A's deposit was confirmed by its own block, before the next one spent it.
    actions = audit_actions(engine, loan_id=a["id"])
    confirmed = actions.index("deposit.confirmed")
    assert confirmed < actions.index("deposit.spent")
    assert actions[confirmed + 1] == "loan.state_changed"  # active, on that block
    assert world.call("miner", "GET", f"/v1/loans/{a['id']}").json()["state"] == "active"
    # B's needed three: confirmed by the third block, not by the batch's last.
    assert _confirmed_at(engine, b["id"]) == 3
    assert world.call("miner", "GET", f"/v1/loans/{b['id']}").json()["state"] == "active"


def test_a_failure_in_a_batch_writes_none_of_it_and_the_next_step_writes_it_once(
    engine: Engine,
    regtest_node: RegtestNode,
    batched: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world, a, b, start, _, watcher = _story(engine, regtest_node)
    record_block = Watcher._record_block

    def fails_at_the_third(watcher: Watcher, session: Session, height: int, scan: Any) -> int:
        if height == start + 2:
            raise RuntimeError("the machine fails in the third block of the batch")
        return record_block(watcher, session, height, scan)

    try:
        monkeypatch.setattr(Watcher, "_record_block", fails_at_the_third)
        with pytest.raises(RuntimeError, match="third block"):
            watcher.step()
        with Session(engine) as session:
            cursor = session.get(ChainCursor, 1)
            assert cursor is not None and cursor.height == start - 1
            assert session.exec(select(Deposit)).all() == []
            assert session.exec(select(ChainBlock).where(ChainBlock.height >= start)).all() == []
        for loan in (a, b):
            assert "deposit.seen" not in audit_actions(engine, loan_id=loan["id"])

        monkeypatch.setattr(Watcher, "_record_block", record_block)
        assert watcher.step().height == start + 3
    finally:
        watcher.release()
    for loan in (a, b):
        actions = audit_actions(engine, loan_id=loan["id"])
        assert actions.count("deposit.seen") == 1 and actions.count("deposit.confirmed") == 1
        assert world.call("miner", "GET", f"/v1/loans/{loan['id']}").json()["state"] == "active"
    assert _confirmed_at(engine, b["id"]) == 3


# -- how the scans are grouped (no node) ------------------------------------------------


def _scans(count: int, fail_at: int | None = None) -> Iterator[Any]:
    for height in range(1, count + 1):
        if height == fail_at:
            raise ConnectionError(f"the node went away at {height}")
        yield (height, f"scan {height}")


def test_batches_take_only_what_is_ready_and_at_most_the_bound() -> None:
    ready = iter([True, True, False, True, False])
    batches = watcher_service._batches(_scans(7), lambda: next(ready, False), 3)
    assert [[h for h, _ in batch] for batch in batches] == [[1, 2, 3], [4], [5, 6], [7]]


def test_a_failure_while_a_batch_is_gathered_comes_after_the_blocks_before_it() -> None:
    batches = watcher_service._batches(_scans(5, fail_at=3), lambda: True, 8)
    assert [h for h, _ in next(batches)] == [1, 2]
    with pytest.raises(ConnectionError, match="at 3"):
        next(batches)


def test_only_blocks_that_chain_onto_the_cursor_and_each_other_are_applied() -> None:
    class Scan:
        def __init__(self, prev: str, block: str) -> None:
            self.prev_block_hash, self.block_hash = prev, block

    batch: list[Any] = [(1, Scan("a", "b")), (2, Scan("b", "c")), (3, Scan("x", "d"))]
    assert [h for h, _ in watcher_service._linked(batch, "a")] == [1, 2]
    assert watcher_service._linked(batch, "z") == []
