"""Issue acceptance: collateral addresses end to end on regtest, with the bank's key
either an xpub or a key the bank's signer generated inside a real SoftHSM2 token (on a
registration statement an operator and an approver signed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from support.addresses import addresses_three_ways
from support.signer_world import SignerWorld, in_process_world
from support.world import World, build_world

from custody.signing.statements import KEY_LABEL_PREFIX
from hsm.pkcs11_backend import Pkcs11Signer
from pledge.descriptors import parse_collateral_descriptor
from regtest.node import RegtestNode
from regtest.price_feed import price_feed
from regtest.softhsm import SoftHsmToken


@pytest.fixture
def bank_signer(
    tmp_path: Path, regtest_node: RegtestNode, softhsm_token: SoftHsmToken
) -> Iterator[SignerWorld]:
    """The bank's signer in process, on the session's SoftHSM2 token."""
    with (
        price_feed() as feed,
        in_process_world(tmp_path / "signer", regtest_node, feed, softhsm_token) as sw,
    ):
        yield sw


@pytest.fixture
def world(engine: Engine, bank_signer: SignerWorld) -> World:
    return build_world(engine, signer=bank_signer.client, staff=bank_signer.staff)


@pytest.mark.parametrize("bank_key", ["xpub", "hsm-fixed", "hsm-hd"])
def test_collateral_address_receives_and_survives_a_reorg(
    world: World,
    regtest_node: RegtestNode,
    bank_signer: SignerWorld,
    pkcs11_signer: Pkcs11Signer,
    bank_key: str,
) -> None:
    if bank_key == "xpub":
        loan = world.funded_ready_loan()
    else:
        loan = world.funded_ready_loan(hsm_bank=True, bank_kind=bank_key[4:])
    address = loan["collateral_address"]
    bank = loan["keys"][1]
    assert bank["kind"] == ("hsm" if bank_key == "hsm-fixed" else "hd")
    if bank_key != "xpub":
        # The signer built the same descriptor from its own records.
        label = bank["hsm_key_label"]
        assert label.startswith(KEY_LABEL_PREFIX)
        signer_loan = bank_signer.client.loan(label[len(KEY_LABEL_PREFIX) :])
        assert signer_loan["descriptor"] == loan["descriptor"]
        assert bank["hsm_local"] is True and bank["hsm_never_extractable"] is True
    if bank_key == "hsm-fixed":
        # The public key in the descriptor is the one the token holds (read here through
        # a session of our own, not the signer's), and the token vouches the private
        # half was born there and can never leave.
        assert pkcs11_signer.public_key(label).hex() == bank["public_key"]
        assert bank["public_key"] in loan["descriptor"]
        info = pkcs11_signer.key_info(label)
        assert info.local and info.never_extractable
    if bank_key == "hsm-hd":
        # An all-xpub descriptor: the bank's key is its seed's BIP-48 account for this loan,
        # and the AES key sealing that seed is on the token, unexportable.
        descriptor = parse_collateral_descriptor(loan["descriptor"], "regtest")
        assert not descriptor.has_fixed_key
        seed = bank_signer.registry().seed()
        assert seed is not None and bank["fingerprint"] == seed.fingerprint
        assert bank["origin_path"] == f"m/48h/1h/{signer_loan['key_ref'].split('/')[3]}/2h"
        sealing = pkcs11_signer.secret_key_info(seed.key_label)
        assert sealing.never_extractable and sealing.always_sensitive and sealing.local
        assert not (sealing.extractable or sealing.wrap or sealing.unwrap)
        # Three implementations agree on every address the service hands out.
        three = addresses_three_ways(loan["descriptor"], "regtest", range(5))
        assert three["bdk"] == three["embit"] == three["hwi"]
        assert three["hwi"][0][0] == address
        issued = [
            world.call("miner", "POST", f"/v1/loans/{loan['id']}/addresses") for _ in range(2)
        ]
        for r in issued:
            assert r.status_code == 201, r.text
            assert r.json()["address"] == three["bdk"][r.json()["index"]][0]

    # The address is what the descriptor derives (both libraries, inside the parser).
    descriptor = parse_collateral_descriptor(loan["descriptor"], "regtest")
    assert descriptor.address(0) == address

    txid, vout = regtest_node.faucet.pay(address, 12_345_678)
    regtest_node.mine(1)
    out = regtest_node.rpc.get_tx_out(txid, vout, include_mempool=False)
    assert out is not None and out["confirmations"] == 1
    assert out["value_sat"] == 12_345_678
    assert out["scriptPubKey"]["hex"] == descriptor.script_pubkey(0).hex()

    regtest_node.invalidate(1)  # reorg(1), observed between its two halves
    assert txid in regtest_node.rpc.get_raw_mempool()
    assert regtest_node.rpc.get_tx_out(txid, vout, include_mempool=False) is None
    regtest_node.mine(2)
    again = regtest_node.rpc.get_tx_out(txid, vout, include_mempool=False)
    assert again is not None and again["confirmations"] == 2 and again["value_sat"] == 12_345_678
