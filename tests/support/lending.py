"""Loans that hold real collateral on regtest, and the parties' signing moves, for
signing tests: the miner's and arbiter's devices are software HD signers, the bank's
key is in the SoftHSM2 token unless a test says otherwise."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from typing import Any

from embit import bip32
from embit.networks import NETWORKS
from support.world import World, hd_key

from custody.watcher.service import Watcher
from regtest.faucet import random_p2wpkh_address
from regtest.node import RegtestNode
from regtest.software_signer import SoftwareHDSigner

COLLATERAL = 50_000_000


@dataclass
class Funded:
    loan: dict[str, Any]
    roots: dict[str, bip32.HDKey]
    deposit: tuple[str, int]


def funded_loan(
    world: World,
    node: RegtestNode,
    watcher: Watcher,
    *,
    hsm_bank: bool = True,
    bank_kind: str | None = None,
    **terms: Any,
) -> Funded:
    """An active loan with one confirmed deposit. The test holds the miner's and arbiter's
    keys (and the bank's when `hsm_bank` is False); otherwise the bank's signer made it
    (`bank_kind` "hd", the default, or "fixed")."""
    seats = ("miner", "arbiter") if hsm_bank else ("miner", "bank", "arbiter")
    seeds = {seat: os.urandom(32) for seat in seats}
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
    if hsm_bank:
        world.hsm_bank_key(loan["id"], bank_kind)
    loan = world.call("miner", "GET", f"/v1/loans/{loan['id']}").json()
    assert loan["state"] == "awaiting_deposit"
    deposit = node.faucet.pay(loan["collateral_address"], COLLATERAL)
    node.mine(1)
    watcher.step()
    loan = world.call("miner", "GET", f"/v1/loans/{loan['id']}").json()
    assert loan["state"] == "active"
    return Funded(loan, {s: regtest_root(seed) for s, seed in seeds.items()}, deposit)


def regtest_root(seed: bytes) -> bip32.HDKey:
    return bip32.HDKey.from_seed(seed, version=NETWORKS["regtest"]["xprv"])


def sign(psbt_b64: str, root: bip32.HDKey) -> str:
    """The miner's or arbiter's device: the software HD signer (embit, regtest only)."""
    return SoftwareHDSigner(root, "regtest").sign_psbt(psbt_b64)


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


def bank_sign(world: World, rid: int, *staff: str) -> Any:
    """An operator and an approver sign the signer's statement of the request on their
    own machines; the bank's signer then signs (after its own checks). Returns the
    statement's final view (state done, or the signer's refusal in `outcome`)."""
    sid = world.call("bank_operator", "GET", f"/v1/signing-requests/{rid}").json()[
        "signer_statement_id"
    ]
    assert sid is not None, "the request has no signer statement"
    return world.sign_statement(sid, *staff)


def the_psbt(world: World, who: str, rid: int) -> str:
    psbt: str = world.call(who, "GET", f"/v1/signing-requests/{rid}/psbt").json()["psbt"]
    return psbt
