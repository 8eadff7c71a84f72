"""Separate-process mode: the service's bank key lives behind `hsm serve` (its own process,
SoftHSM2 token, registry, enrolled people, node connection and price feed), reached over
loopback with its own bearer token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from embit.networks import NETWORKS
from embit.psbt import PSBT
from embit.script import address_to_scriptpubkey
from fastapi import FastAPI
from sqlalchemy.engine import Engine
from sqlmodel import Session
from support.lending import bank_sign, funded_loan, request, sign, the_psbt, upload
from support.signer_world import SignerWorld, serve_world
from support.world import World, audit_actions, build_world

from custody.db.models import SigningRequest
from custody.signing.statements import KEY_LABEL_PREFIX
from custody.watcher.service import Watcher
from hsm.client import BankSigner, HttpTransport
from regtest.faucet import random_p2wpkh_address
from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed

pytestmark = [pytest.mark.node, pytest.mark.hsm]


@pytest.fixture
def served(tmp_path: Path, regtest_node: RegtestNode, feed: PriceFeed) -> Iterator[SignerWorld]:
    with serve_world(tmp_path / "hsm-serve", regtest_node, feed) as sw:
        assert sw.transport == "hsm-serve"
        yield sw


@pytest.fixture
def remote_world(engine: Engine, regtest_node: RegtestNode, served: SignerWorld) -> World:
    return build_world(engine, chain=regtest_node.rpc, signer=served.client, staff=served.staff)


def _decisions(served: SignerWorld) -> list[tuple[str, str | None]]:
    """The signer's own log of what it signed and refused (not what it merely recorded)."""
    return [
        (d.decision, d.txid)
        for d in served.registry().decisions()
        if d.decision in ("signed", "refused")
    ]


@pytest.mark.parametrize("kind", ["hd", "fixed"])
def test_release_signed_by_hsm_serve(
    remote_world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    served: SignerWorld,
    kind: str,
) -> None:
    world = remote_world
    f = funded_loan(world, regtest_node, watcher, bank_kind=kind)  # made by hsm serve
    bank = f.loan["keys"][1]
    assert bank["kind"] == ("hd" if kind == "hd" else "hsm")
    assert bank["hsm_local"] and bank["hsm_never_extractable"]
    ref = bank["hsm_key_label"][len(KEY_LABEL_PREFIX) :]
    registered = served.registry().loan(ref)
    assert registered is not None and registered.bank_key_kind == kind
    assert registered.miner_return_address == f.loan["terms"]["miner_return_address"]
    assert registered.descriptor == f.loan["descriptor"]  # built by the signer, the same
    if kind == "fixed":
        assert registered.public_key.hex() == bank["public_key"]
    else:
        assert f"[{bank['fingerprint']}{bank['origin_path'][1:]}]{bank['xpub']}" in (
            registered.descriptor
        )

    req = request(world, "bank_operator", f.loan["id"], action="release")
    assert req["signer_statement_id"] is not None
    psbt = the_psbt(world, "miner", req["id"])
    if kind == "hd":
        # What every device needs to recognise the bank's key: the global xpubs of all
        # three accounts, and the bank's BIP-32 derivation on each input.
        parsed = PSBT.from_string(psbt)
        assert {x.to_base58(NETWORKS["regtest"]["xpub"]) for x in parsed.xpubs} == {
            k["xpub"] for k in f.loan["keys"]
        }
        for inp in parsed.inputs:
            fingerprints = {d.fingerprint.hex() for d in inp.bip32_derivations.values()}
            assert bank["fingerprint"] in fingerprints and len(fingerprints) == 3
    upload(world, "miner", req["id"], sign(psbt, f.roots["miner"]))
    before = served.bank_signatures()
    done = bank_sign(world, req["id"]).json()
    assert done["state"] == "done", done
    assert served.bank_signatures() == before + 1  # hsm serve's own count, from its /health
    after = world.call("miner", "GET", f"/v1/signing-requests/{req['id']}").json()
    assert after["state"] == "broadcast", after
    regtest_node.mine(1)
    watcher.step()
    assert world.call("miner", "GET", f"/v1/loans/{f.loan['id']}").json()["state"] == "released"
    assert _decisions(served) == [("signed", req["unsigned_txid"])]


def test_hsm_serve_refuses_what_a_compromised_api_asks(
    remote_world: World, regtest_node: RegtestNode, watcher: Watcher, served: SignerWorld
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
    before = served.bank_signatures()
    outcome = bank_sign(world, req["id"]).json()
    assert outcome["state"] == "refused" and "approval_other_txid" in outcome["outcome"], outcome
    assert served.bank_signatures() == before
    assert [d for d, _ in _decisions(served)] == ["refused"]
    assert "signer.refused" in audit_actions(world.engine, request_id=req["id"])
    assert (
        world.call("miner", "GET", f"/v1/signing-requests/{req['id']}").json()["signed_seats"] == []
    )


def test_without_the_signers_token_nothing_happens(
    engine: Engine, regtest_node: RegtestNode, served: SignerWorld
) -> None:
    """A service holding the wrong bearer token gets nothing from hsm serve; the signed
    statement stays open and goes through once the service has the right token."""
    transport = served.client.transport
    assert isinstance(transport, HttpTransport)
    with BankSigner(HttpTransport(transport.url, "not-the-token-" + "x" * 30)) as wrong:
        world = build_world(engine, chain=regtest_node.rpc, signer=wrong, staff=served.staff)
        loan = world.create_loan()
        assert world.register(loan["id"], "miner").status_code == 200
        assert world.register(loan["id"], "arbiter").status_code == 200
        r = world.call("bank_operator", "POST", f"/v1/loans/{loan['id']}/keys/bank/hsm")
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        stuck = world.sign_statement(sid).json()
    assert stuck["state"] == "open" and "credentials" in stuck["outcome"], stuck
    assert served.registry().loan_count() == 0
    assert world.call("miner", "GET", f"/v1/loans/{loan['id']}").json()["state"] == "draft"

    app = world.client.app
    assert isinstance(app, FastAPI)
    app.state.signer = served.client  # the operator fixes the token
    done = world.sign_statement(sid, "operator2").json()
    assert done["state"] == "done", done
    assert served.registry().loan_count() == 1
    after = world.call("miner", "GET", f"/v1/loans/{loan['id']}").json()
    assert after["state"] == "awaiting_deposit"
