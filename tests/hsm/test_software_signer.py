"""The software HD signer (regtest/tests only): refused on mainnet, signs what it has
a derivation for through embit's own PSBT signer, and its signatures verify."""

from __future__ import annotations

import os

import pytest
from asn1crypto.algos import DSASignature
from embit import bip32
from embit.ec import PublicKey, Signature
from embit.networks import NETWORKS
from embit.psbt import PSBT
from embit.script import Script
from embit.transaction import SIGHASH, Transaction, TransactionInput, TransactionOutput

from custody.signing.psbt import CollateralInput, PayTo, build_psbt, finalize
from hsm.pkcs11_backend import SECP256K1_ORDER
from hsm.signer import SignerRefused
from pledge.descriptors import CollateralDescriptor
from pledge.keys import HDKey, parse_hd_key
from regtest.software_signer import SoftwareHDSigner

MINER_RETURN = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"


def _root(network: str = "regtest") -> bip32.HDKey:
    key = "main" if network == "mainnet" else "regtest"
    return bip32.HDKey.from_seed(os.urandom(32), version=NETWORKS[key]["xprv"])


def test_refused_on_mainnet() -> None:
    with pytest.raises(SignerRefused, match="mainnet"):
        SoftwareHDSigner(_root(), "mainnet")


def test_refuses_mainnet_keys_public_keys_and_non_master_keys() -> None:
    with pytest.raises(SignerRefused, match="mainnet"):
        SoftwareHDSigner(_root("mainnet"), "regtest")
    with pytest.raises(SignerRefused, match="private"):
        SoftwareHDSigner(_root().to_public(), "regtest")
    with pytest.raises(SignerRefused, match="depth 0"):
        SoftwareHDSigner(_root().derive("m/48h"), "regtest")
    with pytest.raises(SignerRefused, match="unknown network"):
        SoftwareHDSigner(_root(), "regtset")  # type: ignore[arg-type]


def test_account_key_text_is_a_registrable_bip48_key() -> None:
    root = _root()
    signer = SoftwareHDSigner(root, "testnet")
    text = signer.account_key_text(3)
    assert text.startswith(f"[{root.my_fingerprint.hex()}/48h/1h/3h/2h]tpub")
    assert signer.fingerprint == root.my_fingerprint.hex()
    key = parse_hd_key(text, "testnet", field="key")  # the service's own parser accepts it
    assert key.public_key(0, 5) == root.derive("m/48h/1h/3h/2h/0/5").key.get_public_key().sec()


def test_sign_digest_is_low_s_and_verifies() -> None:
    signer = SoftwareHDSigner(_root(), "regtest")
    pub = PublicKey.parse(signer.public_key("m/48h/1h/0h/2h/0/1"))
    for _ in range(32):
        digest = os.urandom(32)
        der = signer.sign_digest("m/48h/1h/0h/2h/0/1", digest)
        sig = Signature.parse(der)
        assert pub.verify(sig, digest)
        assert not pub.verify(sig, bytes(32))
        parsed = DSASignature.load(der, strict=True)
        assert DSASignature(parsed.native).dump() == der  # strict, canonical DER
        assert 0 < int(parsed["s"].native) <= SECP256K1_ORDER // 2  # low-S
    with pytest.raises(SignerRefused):
        signer.sign_digest("m/../1", os.urandom(32))
    with pytest.raises(SignerRefused):
        signer.sign_digest("m/0", b"short")


def _two_of_three() -> tuple[list[SoftwareHDSigner], CollateralDescriptor, CollateralInput]:
    signers = [SoftwareHDSigner(_root(), "regtest") for _ in range(3)]
    keys = [parse_hd_key(s.account_key_text(), "regtest", field="k") for s in signers]
    descriptor = CollateralDescriptor((keys[0], keys[1], keys[2]), "regtest")
    prev = Transaction(
        vin=[TransactionInput(os.urandom(32), 0)],
        vout=[TransactionOutput(250_000, Script(descriptor.script_pubkey(2)))],
    )
    deposit = CollateralInput(prev.txid().hex(), 0, 250_000, 2, False, prev.serialize())
    return signers, descriptor, deposit


def test_signs_a_collateral_psbt_and_two_signatures_finalize() -> None:
    signers, descriptor, deposit = _two_of_three()
    psbt = build_psbt(descriptor, "regtest", [deposit], [PayTo(MINER_RETURN, 248_000, "m")])
    once = signers[0].sign_psbt(psbt)
    parsed = PSBT.from_string(once)
    (pub, sig), *rest = parsed.inputs[0].partial_sigs.items()
    assert rest == []
    miner_key = descriptor.keys[0]
    assert isinstance(miner_key, HDKey)
    assert pub.sec() == miner_key.public_key(0, 2)
    assert sig[-1] == SIGHASH.ALL
    assert pub.verify(Signature.parse(sig[:-1]), parsed.sighash(0, SIGHASH.ALL))
    twice = signers[2].sign_psbt(once)
    raw = finalize(twice)
    assert Transaction.parse(raw).vout[0].value == 248_000


def test_raises_when_it_signed_nothing() -> None:
    signers, descriptor, deposit = _two_of_three()
    psbt = build_psbt(descriptor, "regtest", [deposit], [PayTo(MINER_RETURN, 248_000, "m")])
    stranger = SoftwareHDSigner(_root(), "regtest")
    with pytest.raises(SignerRefused, match="nothing signed"):
        stranger.sign_psbt(psbt)
    with pytest.raises(SignerRefused, match="cannot be parsed"):
        signers[0].sign_psbt("bm90IGEgcHNidA==")
