"""Collateral moving for real: regtest btcd, the watcher, signing requests through the
HTTP API, embit HD roots standing in for hardware wallets."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from typing import Any

import pytest
from embit import bip32
from embit.psbt import PSBT
from sqlalchemy.engine import Engine
from support.world import World, build_world, hd_key

from custody.chain.watcher import Watcher, WatcherConfig
from regtest.faucet import random_p2wpkh_address
from regtest.node import RegtestNode

COLLATERAL = 50_000_000


@dataclass
class Funded:
    loan: dict[str, Any]
    roots: dict[str, bip32.HDKey]
    deposit: tuple[str, int]


@pytest.fixture
def world(engine: Engine, regtest_node: RegtestNode) -> World:
    return build_world(engine, chain=regtest_node.rpc)


@pytest.fixture
def watcher(engine: Engine, regtest_node: RegtestNode) -> Watcher:
    w = Watcher(
        engine,
        regtest_node.rpc,
        config=WatcherConfig(start_height=regtest_node.rpc.get_block_count() + 1),
    )
    w.acquire()
    yield w
    w.release()


def funded_loan(world: World, node: RegtestNode, watcher: Watcher, **terms: Any) -> Funded:
    """An active loan whose three keys the test holds, with one confirmed deposit."""
    seeds = {seat: os.urandom(32) for seat in ("miner", "bank", "arbiter")}
    body = {
        "required_collateral_sats": COLLATERAL,
        "required_confirmations": 1,
        "miner_return_address": random_p2wpkh_address(),
        "bank_liquidation_address": random_p2wpkh_address(),
    }
    body.update(terms)
    loan = world.create_loan(**body)
    for seat, seed in seeds.items():
        assert world.register(loan["id"], seat, hd_key(seed=seed)).status_code == 200
    loan = world.call("miner", "GET", f"/v1/loans/{loan['id']}").json()
    deposit = node.faucet.pay(loan["collateral_address"], COLLATERAL)
    node.mine(1)
    watcher.step()
    loan = world.call("miner", "GET", f"/v1/loans/{loan['id']}").json()
    assert loan["state"] == "active"
    return Funded(loan, {s: bip32.HDKey.from_seed(seed) for s, seed in seeds.items()}, deposit)


def sign(psbt_b64: str, root: bip32.HDKey) -> str:
    """What a hardware wallet does: sign the inputs it has a derivation for."""
    psbt = PSBT.from_string(psbt_b64)
    assert psbt.sign_with(root) > 0
    signed: str = psbt.to_string()
    return signed


def request(world: World, who: str, loan_id: int, **body: Any) -> dict[str, Any]:
    r = world.call(who, "POST", f"/v1/loans/{loan_id}/signing-requests", json=body)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def upload(world: World, who: str, rid: int, psbt_b64: str, *, binary: bool = False) -> Any:
    if binary:
        return world.client.post(
            f"/v1/signing-requests/{rid}/signatures",
            content=base64.b64decode(psbt_b64),
            headers={**world.h(who), "Content-Type": "application/octet-stream"},
        )
    return world.call(
        who, "POST", f"/v1/signing-requests/{rid}/signatures", json={"psbt": psbt_b64}
    )


def the_psbt(world: World, who: str, rid: int) -> str:
    psbt: str = world.call(who, "GET", f"/v1/signing-requests/{rid}/psbt").json()["psbt"]
    return psbt


def test_release_signed_by_miner_and_bank_returns_everything_to_the_miner(
    world: World, regtest_node: RegtestNode, watcher: Watcher
) -> None:
    f = funded_loan(world, regtest_node, watcher)
    lid = f.loan["id"]
    req = request(world, "bank_operator", lid, action="release")
    assert req["state"] == "awaiting_signatures"
    assert req["required_seats"] == ["miner", "bank"]
    assert world.call("miner", "GET", f"/v1/loans/{lid}").json()["state"] == "releasing"
    [out] = req["outputs"]
    assert out["address"] == f.loan["terms"]["miner_return_address"]
    assert out["amount_sats"] + req["fee_sats"] == COLLATERAL

    # The miner signs the PSBT it downloaded; the bank signs the binary file.
    r = upload(
        world, "miner", req["id"], sign(the_psbt(world, "miner", req["id"]), f.roots["miner"])
    )
    assert r.status_code == 200, r.text
    assert r.json()["signed_seats"] == ["miner"] and r.json()["state"] == "awaiting_signatures"
    binary = world.call("bank_operator", "GET", f"/v1/signing-requests/{req['id']}/psbt.bin")
    assert binary.headers["content-type"] == "application/octet-stream"
    bank_signed = sign(base64.b64encode(binary.content).decode(), f.roots["bank"])
    r = upload(world, "bank_operator", req["id"], bank_signed, binary=True)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "broadcast", r.json()
    txid = req["unsigned_txid"]
    assert txid in regtest_node.rpc.get_raw_mempool()

    regtest_node.mine(1)
    watcher.step()
    done = world.call("miner", "GET", f"/v1/signing-requests/{req['id']}").json()
    assert done["state"] == "confirmed"
    loan = world.call("miner", "GET", f"/v1/loans/{lid}").json()
    assert loan["state"] == "released"
    paid = regtest_node.rpc.get_tx_out(txid, 0, include_mempool=False)
    assert paid is not None and paid["value_sat"] == out["amount_sats"]
    assert paid["scriptPubKey"]["address"] == out["address"]
    [dep] = world.call("miner", "GET", f"/v1/loans/{lid}/deposits").json()
    assert dep["state"] == "spent" and dep["spent_txid"] == txid


def test_liquidation_pays_the_bank_exactly_the_debt(
    world: World, regtest_node: RegtestNode, watcher: Watcher
) -> None:
    f = funded_loan(
        world, regtest_node, watcher, principal_kopecks=1_500_000_00, interest_rate_bps=0
    )
    lid = f.loan["id"]
    req = request(
        world,
        "bank_operator",
        lid,
        action="liquidation",
        price_rub_per_btc="6000000",
        price_source="manual:test",
    )
    assert req["required_seats"] == ["bank", "arbiter"]
    bank_out, miner_out = req["outputs"]
    assert bank_out["role"] == "bank_liquidation" and bank_out["amount_sats"] == 25_000_000
    assert miner_out["amount_sats"] == COLLATERAL - 25_000_000 - req["fee_sats"]
    # Signatures in the other order: arbiter first.
    psbt = the_psbt(world, "arbiter", req["id"])
    assert upload(world, "arbiter", req["id"], sign(psbt, f.roots["arbiter"])).status_code == 200
    r = upload(world, "bank_operator", req["id"], sign(psbt, f.roots["bank"]))
    assert r.status_code == 200 and r.json()["state"] == "broadcast", r.text
    regtest_node.mine(1)
    watcher.step()
    assert world.call("miner", "GET", f"/v1/loans/{lid}").json()["state"] == "liquidated"
    txid = req["unsigned_txid"]
    to_bank = regtest_node.rpc.get_tx_out(txid, 0, include_mempool=False)
    to_miner = regtest_node.rpc.get_tx_out(txid, 1, include_mempool=False)
    assert to_bank and to_bank["value_sat"] == 25_000_000
    assert to_bank["scriptPubKey"]["address"] == f.loan["terms"]["bank_liquidation_address"]
    assert to_miner and to_miner["value_sat"] == miner_out["amount_sats"]
