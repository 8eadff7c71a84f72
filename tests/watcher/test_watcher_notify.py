"""The watcher's webhooks follow the ledger through reorgs, double spends and replays
(real btcd; SQLite and PostgreSQL), and a payment to an address handed out mid-step shows
within the step.

Every test compares the bank's webhook (it hears everything about its loans) with the
ledger (`support.story`), and counts its outbox rows by kind."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from support.spend import held_loan
from support.story import (
    assert_outbox_tells_the_ledger,
    kinds,
    restore_ledger,
    snapshot_ledger,
)
from support.world import World, build_world

from custody.auth.context import Context
from custody.chain.rpc import NodeRpc
from custody.db.models import Principal
from custody.db.session import transaction
from custody.loans.service import new_address
from custody.netpolicy import UrlPolicy
from custody.notify.outbox import register_webhook
from custody.watcher.service import Watcher, WatcherConfig
from regtest.faucet import Coin, random_p2wpkh_address
from regtest.node import RegtestNode

SECRET = "s" * 40


@pytest.fixture
def world(engine: Engine) -> World:
    return build_world(engine)


@pytest.fixture
def bank_hook(world: World) -> int:
    """A webhook of the bank's that wants every event (never called: rows are counted)."""
    with transaction(world.engine) as session:
        view = register_webhook(
            session,
            world.party_ids["bank"],
            "http://127.0.0.1:9/hook",
            SECRET,
            "*",
            urls=UrlPolicy.for_network("regtest"),
        )
    return view.id


def _state(world: World, loan_id: int) -> str:
    state: str = world.call("miner", "GET", f"/v1/loans/{loan_id}").json()["state"]
    return state


def _deposit(world: World, loan_id: int, txid: str) -> dict[str, Any]:
    deps = world.call("miner", "GET", f"/v1/loans/{loan_id}/deposits").json()
    [dep] = [d for d in deps if d["txid"] == txid]
    out: dict[str, Any] = dep
    return out


def _new(before: Counter[str], after: Counter[str]) -> Counter[str]:
    return after - before


def _replay(engine: Engine, rpc: NodeRpc, watcher: Watcher, snapshot: dict[str, Any]) -> None:
    """A second watcher, from the ledger as it was at `snapshot`, does that step again
    (the outbox and audit log keep what the first one wrote)."""
    watcher.release()
    restore_ledger(engine, snapshot)
    second = Watcher(engine, rpc, config=watcher.config)
    second.acquire()
    try:
        second.step()
    finally:
        second.release()
        watcher.acquire()


def test_a_reorg_that_mines_a_deposit_again_sends_each_fact_once(
    world: World, watcher: Watcher, regtest_node: RegtestNode, bank_hook: int
) -> None:
    loan = world.keyed_loan(required_collateral_sats=20_000_000)
    txid, _ = regtest_node.faucet.pay(loan["collateral_address"], 20_000_000)
    regtest_node.mine(1)
    watcher.step()
    assert _state(world, loan["id"]) == "active"
    first = assert_outbox_tells_the_ledger(world.engine, bank_hook)
    assert first == Counter({"deposit.seen": 1, "deposit.confirmed": 1, "loan.active": 1})

    # Blocks above the deposit's are replaced: it keeps its block and its confirmation,
    # and receivers hear nothing.
    regtest_node.mine(1)
    watcher.step()
    regtest_node.reorg(1)
    assert watcher.step().blocks_rolled_back == 1
    assert assert_outbox_tells_the_ledger(world.engine, bank_hook) == first

    # Its own block is replaced and the same transaction mined again in another: the
    # confirmation is taken back, then given in the new block (a new fact, once).
    mined_at = _deposit(world, loan["id"], txid)["block_height"]
    depth = regtest_node.rpc.get_block_count() - mined_at + 1
    regtest_node.reorg(depth)
    assert watcher.step().blocks_rolled_back == depth
    dep = _deposit(world, loan["id"], txid)
    assert dep["state"] == "confirmed" and _state(world, loan["id"]) == "active"
    assert assert_outbox_tells_the_ledger(world.engine, bank_hook) == first + Counter(
        {
            "deposit.unconfirmed": 1,
            "loan.awaiting_deposit": 1,
            "deposit.confirmed": 1,
            "loan.active": 1,
        }
    )
    # Stepping again, or another watcher starting over, sends nothing.
    settled = kinds(world.engine, bank_hook)
    watcher.step()
    watcher.release()
    other = Watcher(world.engine, regtest_node.rpc, config=watcher.config)
    other.acquire()
    other.step()
    other.release()
    watcher.acquire()
    assert kinds(world.engine, bank_hook) == settled


def test_a_reorg_taking_a_deposit_away_sends_exactly_the_retractions_even_replayed(
    world: World, watcher: Watcher, regtest_node: RegtestNode, bank_hook: int
) -> None:
    loan = world.keyed_loan(required_collateral_sats=20_000_000, required_confirmations=2)
    txid, _ = regtest_node.faucet.pay(loan["collateral_address"], 20_000_000)
    regtest_node.mine(2)
    watcher.step()
    assert _state(world, loan["id"]) == "active"
    before = kinds(world.engine, bank_hook)

    # One confirmation goes: the deposit's block stays, but 1 < 2.
    regtest_node.invalidate(1)
    snapshot = snapshot_ledger(world.engine)
    watcher.step()
    assert _deposit(world, loan["id"], txid)["state"] == "pending"
    assert _state(world, loan["id"]) == "awaiting_deposit"
    retracted = kinds(world.engine, bank_hook)
    assert _new(before, retracted) == Counter(
        {"deposit.unconfirmed": 1, "loan.awaiting_deposit": 1}
    )
    assert_outbox_tells_the_ledger(world.engine, bank_hook)

    # A second writer that started from the same ledger does it all again: same facts.
    _replay(world.engine, regtest_node.rpc, watcher, snapshot)
    assert kinds(world.engine, bank_hook) == retracted
    assert_outbox_tells_the_ledger(world.engine, bank_hook)

    # The deposit's own block goes too: it was announced pending already, nothing new.
    regtest_node.invalidate(1)
    watcher.step()
    assert kinds(world.engine, bank_hook) == retracted

    # Mined again (in new blocks): confirmed and active again, once.
    regtest_node.mine(2)
    watcher.step()
    assert _state(world, loan["id"]) == "active"
    assert _new(retracted, kinds(world.engine, bank_hook)) == Counter(
        {"deposit.confirmed": 1, "loan.active": 1}
    )
    assert_outbox_tells_the_ledger(world.engine, bank_hook)


def test_a_deposit_double_spent_in_the_mempool_sends_removed_once(
    world: World, watcher: Watcher, regtest_node: RegtestNode, bank_hook: int
) -> None:
    loan = world.keyed_loan(required_collateral_sats=20_000_000)
    txid, _ = regtest_node.faucet.pay(loan["collateral_address"], 20_000_000)
    watcher.step()
    assert _deposit(world, loan["id"], txid)["state"] == "pending"
    regtest_node.faucet.double_spend(txid, random_p2wpkh_address(), 19_000_000)
    assert txid not in regtest_node.rpc.get_raw_mempool()  # replaced (BIP-125)
    watcher.step()
    watcher.step()
    regtest_node.mine(1)  # the replacement is mined
    watcher.step()
    assert _deposit(world, loan["id"], txid)["state"] == "removed"
    assert _state(world, loan["id"]) == "awaiting_deposit"
    assert assert_outbox_tells_the_ledger(world.engine, bank_hook) == Counter(
        {"deposit.seen": 1, "deposit.removed": 1}
    )


def test_a_confirmed_deposit_double_spent_in_a_reorg_is_retracted_then_removed_once(
    world: World, watcher: Watcher, regtest_node: RegtestNode, bank_hook: int
) -> None:
    loan = world.keyed_loan(required_collateral_sats=20_000_000)
    txid, _ = regtest_node.faucet.pay(loan["collateral_address"], 20_000_000)
    regtest_node.mine(1)
    watcher.step()
    assert _state(world, loan["id"]) == "active"

    regtest_node.invalidate(1)
    regtest_node.faucet.double_spend(txid, random_p2wpkh_address(), 19_000_000)
    regtest_node.mine(2)
    snapshot = snapshot_ledger(world.engine)
    watcher.step()
    assert _deposit(world, loan["id"], txid)["state"] == "removed"
    expected = Counter(
        {
            "deposit.seen": 1,
            "deposit.confirmed": 1,
            "loan.active": 1,
            "deposit.unconfirmed": 1,
            "loan.awaiting_deposit": 1,
            "deposit.removed": 1,
        }
    )
    assert assert_outbox_tells_the_ledger(world.engine, bank_hook) == expected
    _replay(world.engine, regtest_node.rpc, watcher, snapshot)
    watcher.step()
    assert assert_outbox_tells_the_ledger(world.engine, bank_hook) == expected


def _spare_coin(node: RegtestNode) -> Coin:
    """A confirmed output of the faucet's key that the faucet itself never spends."""
    txid = node.faucet.pay_many([(node.faucet.address, 1_000_000)])
    node.mine(1)
    return Coin(txid, 0, 1_000_000)


def _replace_then_bring_back(
    node: RegtestNode, txid: str, extra: Coin, between: Callable[[], None]
) -> None:
    """Make unconfirmed faucet payment `txid` leave the mempool unmined, run `between`,
    then bring `txid` back: a conflict C spends its coins and `extra` and replaces it; D
    spends only `extra` and replaces C, which frees the coins; `txid` is sent again."""
    faucet = node.faucet
    original = faucet.payments[txid]
    conflict = faucet.build_tx(
        [(random_p2wpkh_address(), 500_000)],
        spend=[*original.inputs, extra],
        fee_rate_sat_vb=20,
        min_fee_sat=original.fee_sat + 10_000,
    )
    faucet.broadcast(conflict)
    assert txid not in node.rpc.get_raw_mempool()  # replaced (BIP-125)
    between()
    successor = faucet.build_tx(
        [(random_p2wpkh_address(), 100_000)],
        spend=[extra],
        fee_rate_sat_vb=200,
        min_fee_sat=conflict.fee_sat + 50_000,
    )
    faucet.broadcast(successor)
    assert conflict.txid not in node.rpc.get_raw_mempool()
    node.rpc.send_raw_transaction(original.tx_hex)


def test_a_deposit_that_left_the_mempool_and_was_mined_after_all_is_seen_again(
    world: World, watcher: Watcher, regtest_node: RegtestNode, bank_hook: int
) -> None:
    """Removed (replaced in the mempool), then the same transaction is back and mined:
    receivers told `removed` hear it is seen again, then confirmed."""
    loan = world.keyed_loan(required_collateral_sats=20_000_000)
    extra = _spare_coin(regtest_node)
    txid, _ = regtest_node.faucet.pay(loan["collateral_address"], 20_000_000)
    watcher.step()

    def removed() -> None:
        watcher.step()
        assert _deposit(world, loan["id"], txid)["state"] == "removed"

    _replace_then_bring_back(regtest_node, txid, extra, removed)
    assert txid in regtest_node.rpc.get_raw_mempool()
    watcher.step()  # back in the mempool: still removed until a block says otherwise
    assert _deposit(world, loan["id"], txid)["state"] == "removed"
    regtest_node.mine(1)
    watcher.step()
    assert _deposit(world, loan["id"], txid)["state"] == "confirmed"
    assert _state(world, loan["id"]) == "active"
    told = assert_outbox_tells_the_ledger(world.engine, bank_hook)
    assert told == Counter(
        {"deposit.seen": 2, "deposit.removed": 1, "deposit.confirmed": 1, "loan.active": 1}
    )


def test_a_spend_undone_by_a_reorg_leaves_the_deposit_as_it_was_told(
    world: World, watcher: Watcher, regtest_node: RegtestNode, bank_hook: int
) -> None:
    """A spend is no event: receivers last heard `confirmed` (or `seen`). When a reorg
    undoes the spend the deposit is that again, and what the shorter chain takes from
    it is retracted as for any deposit."""
    held = held_loan(world, required_collateral_sats=20_000_000, required_confirmations=2)
    loan = held.loan
    txid, vout = regtest_node.faucet.pay(loan["collateral_address"], 20_000_000)
    regtest_node.mine(2)
    watcher.step()
    assert _state(world, loan["id"]) == "active"
    regtest_node.rpc.send_raw_transaction(held.moved_out((txid, vout), 20_000_000))
    regtest_node.mine(1)
    watcher.step()
    assert _deposit(world, loan["id"], txid)["state"] == "spent"
    told = Counter({"deposit.seen": 1, "deposit.confirmed": 1, "loan.active": 1})
    assert assert_outbox_tells_the_ledger(world.engine, bank_hook) == told

    # The spend and the deposit's second confirmation go: confirmed as told, then not.
    regtest_node.invalidate(2)
    watcher.step()
    assert _deposit(world, loan["id"], txid)["state"] == "pending"
    told += Counter({"deposit.unconfirmed": 1, "loan.awaiting_deposit": 1})
    assert assert_outbox_tells_the_ledger(world.engine, bank_hook) == told

    # The spend is mined again at once (before a second confirmation), then its block
    # and the deposit's go: it was never confirmed since, nothing more to retract.
    regtest_node.mine(1)
    watcher.step()
    assert _deposit(world, loan["id"], txid)["state"] == "spent"
    regtest_node.invalidate(2)
    watcher.step()
    dep = _deposit(world, loan["id"], txid)
    assert (dep["state"], dep["block_height"]) == ("pending", None)
    assert assert_outbox_tells_the_ledger(world.engine, bank_hook) == told


class _HandsOutMidStep(NodeRpc):
    """The node, but the watcher's mempool listing first runs `before_listing` once: what
    it does lands after the step's address load, before the mempool pass."""

    before_listing: Callable[[], None] | None = None

    def get_raw_mempool(self) -> list[str]:
        hook, self.before_listing = self.before_listing, None
        if hook is not None:
            hook()
        return super().get_raw_mempool()


def test_an_address_handed_out_mid_step_and_paid_shows_in_that_step(
    world: World, regtest_node: RegtestNode, bank_hook: int
) -> None:
    loan = world.keyed_loan(required_collateral_sats=50_000_000)
    rpc = _HandsOutMidStep(regtest_node.rpc_url, regtest_node.rpc_user, regtest_node.rpc_password)
    start = regtest_node.rpc.get_block_count() + 1
    watcher = Watcher(world.engine, rpc, config=WatcherConfig(start_height=start))
    watcher.acquire()
    paid: list[tuple[str, int]] = []

    def hand_out_and_pay() -> None:
        r = world.call("miner", "POST", f"/v1/loans/{loan['id']}/addresses")
        assert r.status_code == 201, r.text
        paid.append(regtest_node.faucet.pay(r.json()["address"], 10_000_000))

    try:
        watcher.step()  # the address load, then the mempool
        rpc.before_listing = hand_out_and_pay
        regtest_node.mine(1)  # a block to apply: the step's work before its mempool pass
        result = watcher.step()
        assert rpc.before_listing is None and len(paid) == 1
        assert result.mempool_deposits == 1
        dep = _deposit(world, loan["id"], paid[0][0])
        assert (dep["state"], dep["block_height"]) == ("pending", None)
        assert kinds(world.engine, bank_hook) == Counter({"deposit.seen": 1})
    finally:
        watcher.release()
        rpc.close()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_an_address_committed_after_a_later_one_is_watched(
    world: World, watcher: Watcher, regtest_node: RegtestNode
) -> None:
    """PostgreSQL hands out ids from a sequence: a hand-out that took the lower id can
    commit after one that took a higher id and was loaded first."""
    first, second = world.keyed_loan(), world.keyed_loan()
    watcher.step()
    with Session(world.engine) as session:
        miner = session.exec(select(Principal).where(Principal.name == "user-miner")).one()
    ctx = Context(principal=miner, network="regtest")
    slow = Session(world.engine, expire_on_commit=False)
    try:
        late = new_address(slow, ctx, first["id"])  # id n, not committed yet
        with transaction(world.engine) as session:
            early = new_address(session, ctx, second["id"])  # id n + 1, committed
        assert early.id is not None and late.id is not None and late.id < early.id
        watcher.step()  # loads n + 1 and notes n missing
        slow.commit()
    finally:
        slow.close()
    txid, _ = regtest_node.faucet.pay(late.address, 10_000_000)
    watcher.step()
    assert _deposit(world, first["id"], txid)["state"] == "pending"


@pytest.mark.parametrize("seed", [20261208, 7])
def test_after_random_reorgs_the_outbox_tells_the_ledger(
    world: World, watcher: Watcher, regtest_node: RegtestNode, bank_hook: int, seed: int
) -> None:
    """A seeded schedule of payments, blocks, reorgs (the same transactions mined again,
    or some double-spent away), shorter chains, replays and steps; after every step the
    bank's outbox and the ledger agree."""
    rng = random.Random(seed)
    node = regtest_node
    loans = [
        world.keyed_loan(required_collateral_sats=30_000_000, required_confirmations=c)
        for c in (1, 2)
    ]
    addresses = {loan["id"]: [loan["collateral_address"]] for loan in loans}
    base = node.rpc.get_block_count()
    paid: list[str] = []
    steps = 0

    def step() -> None:
        nonlocal steps
        if rng.random() < 0.15:
            snapshot = snapshot_ledger(world.engine)
            watcher.step()
            _replay(world.engine, node.rpc, watcher, snapshot)
        else:
            watcher.step()
        steps += 1
        assert_outbox_tells_the_ledger(world.engine, bank_hook)

    def depth() -> int:
        return rng.randint(1, min(3, node.rpc.get_block_count() - base))

    for _ in range(36):
        roll = rng.random()
        if roll < 0.3:
            loan_id = rng.choice(list(addresses))
            if rng.random() < 0.3:
                r = world.call("miner", "POST", f"/v1/loans/{loan_id}/addresses")
                assert r.status_code == 201, r.text
                addresses[loan_id].append(r.json()["address"])
            amount = rng.choice([10_000_000, 20_000_000])
            paid.append(node.faucet.pay(rng.choice(addresses[loan_id]), amount)[0])
        elif roll < 0.55:
            node.mine(rng.randint(1, 2))
        elif roll < 0.7 and node.rpc.get_block_count() > base:
            node.reorg(depth())  # the same transactions, in new blocks
        elif roll < 0.85 and node.rpc.get_block_count() > base:
            node.invalidate(depth())
            waiting = set(node.rpc.get_raw_mempool())
            for txid in [t for t in paid if t in waiting and rng.random() < 0.5]:
                node.faucet.double_spend(txid, random_p2wpkh_address(), 5_000_000)
            if rng.random() < 0.6:
                node.mine(rng.randint(1, 3))
        step()
    node.mine(3)
    step()
    told = assert_outbox_tells_the_ledger(world.engine, bank_hook)
    # The schedule did exercise what it is about.
    assert told["deposit.unconfirmed"] >= 1 and told["loan.awaiting_deposit"] >= 1, told
    assert told["deposit.removed"] >= 1 and steps >= 30, told
