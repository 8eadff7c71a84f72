"""Issue acceptance: collateral addresses end to end on regtest, with the bank's key
either an xpub or a key generated inside a real SoftHSM2 token."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine
from support.world import World, build_world

from hsm.pkcs11_backend import Pkcs11Signer
from pledge.descriptors import parse_collateral_descriptor
from regtest.node import RegtestNode


@pytest.fixture
def world(engine: Engine, pkcs11_signer: Pkcs11Signer) -> World:
    return build_world(engine, hsm=pkcs11_signer)


@pytest.mark.parametrize("bank_key", ["hd", "hsm"])
def test_collateral_address_receives_and_survives_a_reorg(
    world: World, regtest_node: RegtestNode, pkcs11_signer: Pkcs11Signer, bank_key: str
) -> None:
    loan = world.funded_ready_loan(hsm_bank=bank_key == "hsm")
    address = loan["collateral_address"]
    bank = loan["keys"][1]
    assert bank["kind"] == bank_key
    if bank_key == "hsm":
        # The public key in the descriptor is the one the token holds, and the token
        # vouches the private half was born there and can never leave.
        assert pkcs11_signer.public_key(bank["hsm_key_label"]).hex() == bank["public_key"]
        assert bank["public_key"] in loan["descriptor"]
        assert bank["hsm_local"] is True and bank["hsm_never_extractable"] is True

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
