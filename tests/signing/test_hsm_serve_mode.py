"""Separate-process mode: the service's bank key lives behind `hsm serve` (its own
process, token, registry and policy), reached over loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from embit.psbt import PSBT
from embit.script import address_to_scriptpubkey
from sqlalchemy.engine import Engine
from sqlmodel import Session
from support.hsm_serve import Server, _start
from support.lending import bank_sign, funded_loan, request, sign, the_psbt, upload
from support.world import World, build_world

from custody.chain.watcher import Watcher
from custody.db.models import SigningRequest
from hsm.remote import RemoteSigner
from regtest.faucet import random_p2wpkh_address
from regtest.node import RegtestNode


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with _start(Path(tmp_path_factory.mktemp("hsm-serve"))) as srv:
        yield srv


@pytest.fixture
def remote_world(engine: Engine, regtest_node: RegtestNode, server: Server) -> World:
    return build_world(engine, chain=regtest_node.rpc, hsm=RemoteSigner(server.url, server.token))


def test_release_signed_by_hsm_serve(
    remote_world: World, regtest_node: RegtestNode, watcher: Watcher, server: Server
) -> None:
    world = remote_world
    f = funded_loan(world, regtest_node, watcher)  # the bank key is made by hsm serve
    bank = f.loan["keys"][1]
    assert bank["kind"] == "hsm" and bank["hsm_local"] and bank["hsm_never_extractable"]
    registered = server.registry().loan(bank["hsm_key_label"].split(":", 1)[1])
    assert registered is not None
    assert registered.miner_return_address == f.loan["terms"]["miner_return_address"]

    req = request(world, "bank_operator", f.loan["id"], action="release")
    upload(world, "miner", req["id"], sign(the_psbt(world, "miner", req["id"]), f.roots["miner"]))
    r = bank_sign(world, req["id"])
    assert r.status_code == 200 and r.json()["state"] == "broadcast", r.text
    regtest_node.mine(1)
    watcher.step()
    assert world.call("miner", "GET", f"/v1/loans/{f.loan['id']}").json()["state"] == "released"
    [decision] = server.registry().decisions()
    assert decision.decision == "signed" and decision.txid == req["unsigned_txid"]


def test_hsm_serve_refuses_what_a_compromised_api_asks(
    remote_world: World, regtest_node: RegtestNode, watcher: Watcher, server: Server
) -> None:
    world = remote_world
    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    with Session(world.engine) as s:  # the service's own records are rewritten
        row = s.get(SigningRequest, req["id"])
        assert row is not None
        evil = PSBT.from_string(row.psbt)
        evil.outputs[0].script_pubkey = address_to_scriptpubkey(random_p2wpkh_address())
        row.psbt = evil.to_string()
        s.add(row)
        s.commit()
    r = bank_sign(world, req["id"])
    assert r.status_code == 422 and r.json()["error"] == "refused_by_signer", r.text
    assert [d.decision for d in server.registry().decisions()] == ["refused"]


def test_without_the_signers_token_nothing_happens(
    engine: Engine, regtest_node: RegtestNode, server: Server
) -> None:
    world = build_world(
        engine, chain=regtest_node.rpc, hsm=RemoteSigner(server.url, "not-the-token-" + "x" * 30)
    )
    loan = world.create_loan()
    r = world.call("bank_operator", "POST", f"/v1/loans/{loan['id']}/keys/bank/hsm")
    assert r.status_code == 503 and "credentials" in r.json()["message"], r.text
    assert server.registry().loan_count() == 0
