"""The deposit watcher against a real btcd on regtest, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from support.spend import held_loan
from support.world import World, audit_actions, build_world

from custody.db.models import AuditEvent, Deposit
from custody.watcher.service import Watcher, WatcherBusy, WatcherConfig
from regtest.faucet import random_p2wpkh_address
from regtest.node import RegtestNode


@pytest.fixture
def world(engine: Engine) -> World:
    return build_world(engine)


def _view(world: World, loan_id: int) -> dict[str, Any]:
    body: dict[str, Any] = world.call("miner", "GET", f"/v1/loans/{loan_id}").json()
    return body


def _deposits(world: World, loan_id: int) -> list[dict[str, Any]]:
    body: list[dict[str, Any]] = world.call("miner", "GET", f"/v1/loans/{loan_id}/deposits").json()
    return body


def test_mempool_then_confirmations_then_active(
    world: World, watcher: Watcher, regtest_node: RegtestNode
) -> None:
    loan = world.keyed_loan(required_collateral_sats=50_000_000, required_confirmations=2)
    txid, vout = regtest_node.faucet.pay(loan["collateral_address"], 50_000_000)

    watcher.step()
    [dep] = _deposits(world, loan["id"])
    assert (dep["txid"], dep["vout"], dep["state"]) == (txid, vout, "pending")
    assert dep["confirmations"] == 0 and dep["block_height"] is None
    assert _view(world, loan["id"])["collateral"]["pending_sats"] == 50_000_000

    regtest_node.mine(1)
    watcher.step()
    [dep] = _deposits(world, loan["id"])
    assert (dep["state"], dep["confirmations"]) == ("pending", 1)
    assert _view(world, loan["id"])["state"] == "awaiting_deposit"

    regtest_node.mine(1)
    watcher.step()
    [dep] = _deposits(world, loan["id"])
    assert (dep["state"], dep["confirmations"]) == ("confirmed", 2)
    view = _view(world, loan["id"])
    assert view["state"] == "active"
    assert view["collateral"]["confirmed_sats"] == 50_000_000
    actions = audit_actions(world.engine, loan_id=loan["id"])
    assert actions[-3:] == ["deposit.mined", "deposit.confirmed", "loan.state_changed"]
    assert actions.count("deposit.seen") == 1


def test_default_confirmations_depend_on_the_amount(
    world: World, watcher: Watcher, regtest_node: RegtestNode
) -> None:
    small = world.keyed_loan(required_collateral_sats=10_000_000)
    large = world.keyed_loan(required_collateral_sats=150_000_000)
    regtest_node.faucet.pay(small["collateral_address"], 10_000_000)
    regtest_node.faucet.pay(large["collateral_address"], 150_000_000)
    regtest_node.mine(1)
    watcher.step()
    assert _deposits(world, small["id"])[0]["required_confirmations"] == 1
    assert _deposits(world, large["id"])[0]["required_confirmations"] == 3
    assert _view(world, small["id"])["state"] == "active"
    assert _view(world, large["id"])["state"] == "awaiting_deposit"
    regtest_node.mine(2)
    watcher.step()
    assert _view(world, large["id"])["state"] == "active"


def test_partial_deposits_add_up_and_excess_is_recorded(
    world: World, watcher: Watcher, regtest_node: RegtestNode
) -> None:
    loan = world.keyed_loan(required_collateral_sats=50_000_000)
    second = world.call("miner", "POST", f"/v1/loans/{loan['id']}/addresses").json()["address"]
    regtest_node.faucet.pay(loan["collateral_address"], 30_000_000)
    regtest_node.mine(1)
    watcher.step()
    assert _view(world, loan["id"])["state"] == "awaiting_deposit"
    assert _view(world, loan["id"])["collateral"]["confirmed_sats"] == 30_000_000

    regtest_node.faucet.pay(second, 25_000_000)
    regtest_node.mine(1)
    watcher.step()
    view = _view(world, loan["id"])
    assert view["state"] == "active"
    assert view["collateral"]["confirmed_sats"] == 55_000_000
    assert view["collateral"]["excess_sats"] == 5_000_000
    deps = _deposits(world, loan["id"])
    assert [d["excess_sats"] for d in deps] == [0, 5_000_000]


@pytest.mark.parametrize("depth", [1, 3])
def test_reorg_rolls_back_and_reapplies(
    world: World, watcher: Watcher, regtest_node: RegtestNode, depth: int
) -> None:
    loan = world.keyed_loan(required_collateral_sats=20_000_000)
    txid, _ = regtest_node.faucet.pay(loan["collateral_address"], 20_000_000)
    regtest_node.mine(depth)  # the deposit sits in the lowest of the blocks to orphan
    watcher.step()
    assert _view(world, loan["id"])["state"] == "active"

    regtest_node.invalidate(depth)
    assert txid in regtest_node.rpc.get_raw_mempool()
    result = watcher.step()
    assert result.blocks_rolled_back == depth
    [dep] = _deposits(world, loan["id"])
    assert (dep["state"], dep["block_height"]) == ("pending", None)
    assert _view(world, loan["id"])["state"] == "awaiting_deposit"
    actions = audit_actions(world.engine, loan_id=loan["id"])
    assert "deposit.reorged" in actions
    assert actions[-1] == "loan.state_changed"

    regtest_node.mine(depth + 1)
    watcher.step()
    [dep] = _deposits(world, loan["id"])
    assert dep["state"] == "confirmed" and dep["txid"] == txid
    assert _view(world, loan["id"])["state"] == "active"
    with Session(world.engine) as s:
        assert len(s.exec(select(Deposit).where(Deposit.txid == txid)).all()) == 1


def test_deposit_double_spent_in_a_reorg_disappears(
    world: World, watcher: Watcher, regtest_node: RegtestNode
) -> None:
    loan = world.keyed_loan(required_collateral_sats=20_000_000)
    txid, _ = regtest_node.faucet.pay(loan["collateral_address"], 20_000_000)
    regtest_node.mine(1)
    watcher.step()
    assert _view(world, loan["id"])["state"] == "active"

    regtest_node.invalidate(1)
    conflict = regtest_node.faucet.double_spend(txid, random_p2wpkh_address(), 19_000_000)
    regtest_node.mine(2)
    assert regtest_node.rpc.get_tx_out(conflict, 0) is not None
    watcher.step()
    [dep] = _deposits(world, loan["id"])
    assert dep["state"] == "removed"
    view = _view(world, loan["id"])
    assert view["state"] == "awaiting_deposit"
    assert view["collateral"]["confirmed_sats"] == 0
    assert "deposit.removed" in audit_actions(world.engine, loan_id=loan["id"])


def test_a_shallow_reorg_can_take_confirmations_away(
    world: World, watcher: Watcher, regtest_node: RegtestNode
) -> None:
    loan = world.keyed_loan(required_collateral_sats=20_000_000, required_confirmations=3)
    regtest_node.faucet.pay(loan["collateral_address"], 20_000_000)
    regtest_node.mine(3)
    watcher.step()
    assert _view(world, loan["id"])["state"] == "active"
    regtest_node.invalidate(1)  # the deposit's block survives, one confirmation goes
    watcher.step()
    [dep] = _deposits(world, loan["id"])
    assert (dep["state"], dep["confirmations"]) == ("pending", 2)
    assert _view(world, loan["id"])["state"] == "awaiting_deposit"
    regtest_node.mine(2)
    watcher.step()
    assert _view(world, loan["id"])["state"] == "active"


def test_only_one_watcher_per_database(
    engine: Engine, regtest_node: RegtestNode, watcher: Watcher
) -> None:
    other = Watcher(engine, regtest_node.rpc, config=WatcherConfig(lease_seconds=30))
    with pytest.raises(WatcherBusy):
        other.acquire()


def test_collateral_spent_outside_the_service_raises_an_alert(
    world: World, watcher: Watcher, regtest_node: RegtestNode
) -> None:
    """Two of three keys can move collateral without the service (a compromised key,
    or miner and arbiter colluding): the watcher marks the deposit spent and alerts."""
    held = held_loan(world, required_collateral_sats=20_000_000)
    loan = held.loan
    txid, vout = regtest_node.faucet.pay(loan["collateral_address"], 20_000_000)
    regtest_node.mine(1)
    watcher.step()
    assert _view(world, loan["id"])["state"] == "active"

    spend_txid = regtest_node.rpc.send_raw_transaction(held.moved_out((txid, vout), 20_000_000))
    regtest_node.mine(1)
    watcher.step()

    [dep] = _deposits(world, loan["id"])
    assert (dep["state"], dep["spent_txid"]) == ("spent", spend_txid)
    assert _view(world, loan["id"])["collateral"]["confirmed_sats"] == 0
    with Session(world.engine) as s:
        alert = s.exec(
            select(AuditEvent).where(
                AuditEvent.loan_id == loan["id"], AuditEvent.action == "alert.unexpected_spend"
            )
        ).one()
    assert alert.decision == "alert" and spend_txid in alert.data

    # The spend is undone by a reorg like anything else, and seen again when re-mined.
    regtest_node.invalidate(1)
    watcher.step()
    [dep] = _deposits(world, loan["id"])
    assert dep["state"] in ("confirmed", "pending") and dep["spent_txid"] is None
    regtest_node.mine(2)
    watcher.step()
    assert _deposits(world, loan["id"])[0]["state"] == "spent"
