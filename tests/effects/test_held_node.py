"""No database transaction is open while the node is asked: a real btcd held for seconds
behind a loopback proxy (regtest.slow_proxy) while the watcher rolls back a reorg, or while
a request is broadcast, and meanwhile the API, another engine and the watcher keep
committing, each in well under the hold. On SQLite (every transaction is BEGIN
IMMEDIATE: one open across the call would hold the write lock) and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from support.effects import HOLD_SECONDS, write_meanwhile
from support.lending import funded_loan, request, sign, the_psbt, upload
from support.world import World, audit_actions, build_world

from custody.chain.rpc import NodeRpc
from custody.db.models import ChainBlock, ChainCursor
from custody.watcher.service import Watcher, WatcherConfig
from regtest.node import RegtestNode
from regtest.slow_proxy import SlowProxy

pytestmark = [pytest.mark.node]


@pytest.fixture
def node_world(engine: Engine, regtest_node: RegtestNode) -> World:
    return build_world(engine, chain=regtest_node.rpc)


@pytest.fixture
def proxy(regtest_node: RegtestNode) -> Iterator[SlowProxy]:
    with SlowProxy("127.0.0.1", regtest_node.rpc_port) as p:
        yield p


@pytest.fixture
def slow_rpc(regtest_node: RegtestNode, proxy: SlowProxy) -> Iterator[NodeRpc]:
    with NodeRpc(proxy.url, regtest_node.rpc_user, regtest_node.rpc_password, timeout=60) as rpc:
        yield rpc


class HeldForkSearch(Watcher):
    """The real watcher; once it starts looking for the fork, the node's answers are held."""

    def __init__(self, *args: Any, proxy: SlowProxy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.proxy = proxy
        self.searching = threading.Event()

    def _find_fork(self, cursor: ChainCursor, tip: int) -> tuple[list[ChainBlock], int, str]:
        self.proxy.hold(HOLD_SECONDS)
        self.searching.set()
        return super()._find_fork(cursor, tip)


def test_a_reorg_rolled_back_while_the_node_is_held_blocks_no_writer(
    node_world: World,
    engine: Engine,
    other_engine: Engine,
    regtest_node: RegtestNode,
    proxy: SlowProxy,
    slow_rpc: NodeRpc,
) -> None:
    world = node_world
    loan = world.keyed_loan(required_collateral_sats=50_000_000, required_confirmations=1)
    other = world.keyed_loan()
    watcher = HeldForkSearch(
        engine,
        slow_rpc,
        config=WatcherConfig(start_height=regtest_node.rpc.get_block_count() + 1),
        proxy=proxy,
    )
    watcher.acquire()
    try:
        regtest_node.faucet.pay(loan["collateral_address"], 50_000_000)
        regtest_node.mine(1)
        assert watcher.step().blocks_applied == 1
        assert world.call("miner", "GET", f"/v1/loans/{loan['id']}").json()["state"] == "active"
        regtest_node.invalidate(1)  # the deposit's block is orphaned...
        regtest_node.mine(2)  # ...by a longer branch (which mines the deposit again)

        outcome: dict[str, Any] = {}
        started = time.monotonic()
        stepper = threading.Thread(target=lambda: outcome.update(step=watcher.step()))
        stepper.start()
        try:
            assert watcher.searching.wait(30), "the watcher never looked for the fork"
            proxy.wait_for_waiting(1)  # the node answered; the watcher waits for it
            times = write_meanwhile(world, other["id"], other_engine)
            in_flight = stepper.is_alive()
        finally:
            stepper.join(timeout=60)
        held_for = time.monotonic() - started
    finally:
        watcher.release()
    times.assert_bounded()
    assert in_flight, f"the writes ended only after the node answered ({times.seconds})"
    assert held_for >= HOLD_SECONDS - 0.5
    step = outcome["step"]
    assert (step.blocks_rolled_back, step.blocks_applied) == (1, 2), step
    actions = audit_actions(engine, loan_id=loan["id"])
    assert "deposit.reorged" in actions
    assert actions.count("deposit.confirmed") == 2  # in the orphaned block, then the new one
    assert world.call("miner", "GET", f"/v1/loans/{loan['id']}").json()["state"] == "active"


def test_a_broadcast_held_by_the_node_blocks_no_writer(
    node_world: World,
    other_engine: Engine,
    regtest_node: RegtestNode,
    watcher: Watcher,
    proxy: SlowProxy,
    slow_rpc: NodeRpc,
) -> None:
    """The bank's last signature is uploaded; the API broadcasts (no transaction open)
    through a node whose answers are held; the watcher, the API and another engine go on."""
    world = node_world
    f = funded_loan(world, regtest_node, watcher, hsm_bank=False)
    other = world.keyed_loan()
    req = request(world, "bank_operator", f.loan["id"], action="release")
    rid = req["id"]
    signed = sign(the_psbt(world, "miner", rid), f.roots["miner"])
    assert upload(world, "miner", rid, signed).status_code == 200
    r = world.call("bank_approver", "POST", f"/v1/signing-requests/{rid}/approve")
    assert r.status_code == 200, r.text
    bank_signed = sign(the_psbt(world, "bank_operator", rid), f.roots["bank"])

    app = world.client.app
    app.state.chain = slow_rpc
    proxy.hold(HOLD_SECONDS)
    answer: dict[str, Any] = {}
    started = time.monotonic()
    uploader = threading.Thread(
        target=lambda: answer.update(r=upload(world, "bank_operator", rid, bank_signed))
    )
    uploader.start()
    try:
        proxy.wait_for_waiting(1)  # the node answered testmempoolaccept; the answer waits
        times = write_meanwhile(
            world, other["id"], other_engine, watcher=watcher, node=regtest_node
        )
        in_flight = uploader.is_alive()
    finally:
        uploader.join(timeout=60)
        app.state.chain = regtest_node.rpc
    held_for = time.monotonic() - started
    times.assert_bounded()
    assert in_flight, f"the writes ended only after the node answered ({times.seconds})"
    assert held_for >= HOLD_SECONDS - 0.5
    assert answer["r"].status_code == 200, answer["r"].text
    assert answer["r"].json()["state"] == "broadcast"
    assert req["unsigned_txid"] in regtest_node.rpc.get_raw_mempool()
