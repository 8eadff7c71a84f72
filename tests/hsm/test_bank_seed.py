"""The HD bank key (issue 13), on both transports, end to end on btcd and a real SoftHSM2
token: loans whose bank key is a BIP-48 account of the seed the token seals, signed for
4-eyes releases and automatic liquidations; the seed never in the registry in clear; a
changed seal refused; and the backup: SLIP-39 shares restore the seed into a fresh token,
which then signs for a loan made before."""

from __future__ import annotations

import pytest
from embit.bip32 import HDKey as EmbitHDKey
from embit.networks import NETWORKS
from embit.psbt import PSBT
from support.signer_world import (
    FEE_SATS,
    SignerWorld,
    bank_hd_key,
    bank_hd_signatures,
)

from hsm.backup import read_share_file, recover_seed
from hsm.signer import PolicyViolation

pytestmark = [pytest.mark.node, pytest.mark.hsm]


def test_an_hd_loan_has_an_all_xpub_descriptor_with_its_own_bank_account(
    world: SignerWorld,
) -> None:
    first = world.register_loan(bank_key="hd")
    second = world.register_loan(bank_key="hd")
    a, b = bank_hd_key(first.record), bank_hd_key(second.record)
    assert not first.descriptor.has_fixed_key
    assert first.record["bank_key_kind"] == "hd"
    assert first.record["bank_key"] == a.key_expression
    assert a.fingerprint == b.fingerprint  # one seed
    assert a.origin_path != b.origin_path and a.xpub != b.xpub  # an account per loan
    assert a.origin_path.startswith("m/48h/1h/") and a.origin_path.endswith("h/2h")
    # the token's AES key that seals the seed: born there, never extractable, no wrap
    assert first.record["never_extractable"] is True
    assert first.record["always_sensitive"] is True
    assert first.record["local"] is True
    # a statement without the choice stays what it meant before: a fixed key in the token
    legacy = world.register_loan(legacy=True)
    assert legacy.descriptor.has_fixed_key and legacy.record["bank_key_kind"] == "fixed"


def test_four_eyes_release_of_an_hd_loan_is_signed_and_mined(world: SignerWorld) -> None:
    loan = world.register_loan(bank_key="hd")
    world.fund(loan, 600_000)
    world.fund(loan, 400_000, index=3, change=True)
    before = world.bank_signatures()
    signed = world.approved_sign(loan, "release", world.release_psbt(loan))
    assert world.bank_signatures() == before + 2  # one signature per input, by the seed
    assert signed.report["total_in_sats"] == 1_000_000
    assert bank_hd_signatures(signed.psbt, bank_hd_key(loan.record)) == 2
    txid = world.broadcast(signed.psbt, loan, with_seat="arbiter")
    tx = world.node.rpc.call("getrawtransaction", txid, 1)
    paid = {o["scriptPubKey"]["addresses"][0]: o["value"] for o in tx["vout"]}
    assert paid == {loan.miner_return: pytest.approx((1_000_000 - FEE_SATS) / 1e8)}


def test_automatic_liquidation_of_an_hd_loan(world: SignerWorld) -> None:
    loan = world.register_loan(bank_key="hd", principal_kopecks=5_000_000)
    world.fund(loan, 1_000_000)
    world.feed.set("5500000")
    valuation = world.client.valuation(loan.loan_ref)
    assert valuation["verdict"] == "liquidate", valuation
    signed = world.client.sign(
        loan.loan_ref,
        "liquidation",
        world.liquidation_psbt(loan, valuation),
        automatic=True,
        valuation_id=valuation["valuation_id"],
    )
    assert bank_hd_signatures(signed.psbt, bank_hd_key(loan.record)) == 1
    txid = world.broadcast(signed.psbt, loan, with_seat="miner")
    outs = {
        o.script_pubkey.address(NETWORKS["regtest"]): o.value
        for o in PSBT.from_string(signed.psbt).tx.vout
    }
    assert outs[loan.bank_liquidation] == 909_091
    assert world.node.rpc.call("getrawtransaction", txid, 1)["confirmations"] >= 1


def test_a_release_of_an_hd_loan_without_approvals_is_refused(world: SignerWorld) -> None:
    loan = world.register_loan(bank_key="hd")
    world.fund(loan, 500_000)
    with pytest.raises(PolicyViolation) as refused:
        world.client.sign(loan.loan_ref, "release", world.release_psbt(loan), automatic=True)
    assert refused.value.check == "automatic_action"


def _registry_bytes(world: SignerWorld) -> bytes:
    registry = world.registry()
    path = registry.path
    data = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    return data


def test_the_seed_is_never_in_the_registry_in_clear(world: SignerWorld) -> None:
    loan = world.register_loan(bank_key="hd")
    seed = bytes(recover_seed([read_share_file(p) for p in world.shares[:3]]))
    root = EmbitHDKey.from_seed(seed, version=NETWORKS["regtest"]["xprv"])
    account = root.derive(bank_hd_key(loan.record).origin_path)
    assert (
        account.to_public().to_base58(NETWORKS["regtest"]["xpub"]) == bank_hd_key(loan.record).xpub
    )  # the shares are this bank's seed
    data = _registry_bytes(world)
    secrets_ = [
        seed,
        seed.hex().encode(),
        root.to_base58().encode(),
        account.to_base58().encode(),
        account.key.secret,
        account.key.secret.hex().encode(),
    ]
    for secret in secrets_:
        assert secret not in data
    for share in world.shares:
        assert read_share_file(share).encode() not in data
    assert b"ciphertext" in data  # the sealed seed is there, as ciphertext
