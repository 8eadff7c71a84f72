"""ECDSA signing with HSM keys: low-S, canonical DER, verified by independent code."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from asn1crypto.algos import DSASignature
from embit.ec import PublicKey, Signature
from embit.util import py_secp256k1

from hsm.pkcs11_backend import SECP256K1_ORDER, Pkcs11Signer, _low_s_der, _verify
from hsm.signer import SignerError, SignerRefused

pytestmark = pytest.mark.hsm

HALF = SECP256K1_ORDER // 2


def _r_s(der: bytes) -> tuple[int, int]:
    parsed: Any = DSASignature.load(der, strict=True)
    return int(parsed["r"].native), int(parsed["s"].native)


def _verify_independently(pub: bytes, digest: bytes, der: bytes) -> bool:
    """Second opinion from code that is not libsecp256k1: coincurve if installed,
    else embit's pure-Python secp256k1."""
    try:
        import coincurve  # type: ignore[import-not-found]
    except ImportError:
        point = py_secp256k1.ec_pubkey_parse(pub)
        sig = py_secp256k1.ecdsa_signature_parse_der(der)
        return bool(py_secp256k1.ecdsa_verify(sig, digest, point))
    return bool(coincurve.PublicKey(pub).verify(der, digest, hasher=None))


def test_many_signatures_low_s_der_and_valid(pkcs11_signer: Pkcs11Signer) -> None:
    info = pkcs11_signer.generate_loan_key("loan-sign-many")
    pub = PublicKey.parse(info.public_key)
    seen_r: set[int] = set()
    for _ in range(256):
        digest = secrets.token_bytes(32)
        der = pkcs11_signer.sign_digest(info.key_ref, digest)
        r, s = _r_s(der)
        assert 0 < s <= HALF, "high-S signature returned"
        assert 0 < r < SECP256K1_ORDER
        seen_r.add(r)
        # canonical strict DER: re-encoding gives the same bytes, and libsecp256k1 agrees
        assert DSASignature({"r": r, "s": s}).dump() == der
        sig = Signature.parse(der)
        assert sig.serialize() == der
        assert pub.verify(sig, digest)
        # and it does NOT verify for another digest
        assert not pub.verify(sig, bytes(b ^ 0xFF for b in digest))
    assert len(seen_r) == 256  # fresh nonces every time
    digest = secrets.token_bytes(32)
    der = pkcs11_signer.sign_digest(info.key_ref, digest)
    assert _verify_independently(info.public_key, digest, der)


def test_signature_bound_to_its_key(pkcs11_signer: Pkcs11Signer) -> None:
    a = pkcs11_signer.generate_loan_key("loan-sign-a")
    b = pkcs11_signer.generate_loan_key("loan-sign-b")
    assert a.public_key != b.public_key
    digest = secrets.token_bytes(32)
    der = pkcs11_signer.sign_digest(a.key_ref, digest)
    assert PublicKey.parse(a.public_key).verify(Signature.parse(der), digest)
    assert not PublicKey.parse(b.public_key).verify(Signature.parse(der), digest)


@pytest.mark.parametrize(
    "bad", [b"", b"\x00" * 31, b"\x00" * 33, b"\x00" * 64], ids=["0", "31", "33", "64"]
)
def test_wrong_digest_length_refused(pkcs11_signer: Pkcs11Signer, bad: bytes) -> None:
    info = pkcs11_signer.generate_loan_key(f"loan-sign-len-{len(bad)}")
    with pytest.raises(SignerRefused) as err:
        pkcs11_signer.sign_digest(info.key_ref, bad)
    assert err.value.field == "digest"


def test_non_bytes_digest_refused(pkcs11_signer: Pkcs11Signer) -> None:
    info = pkcs11_signer.generate_loan_key("loan-sign-str")
    with pytest.raises(SignerRefused):
        pkcs11_signer.sign_digest(info.key_ref, "a" * 32)  # type: ignore[arg-type]


def test_high_s_is_folded_to_low_s() -> None:
    """A raw r||s with high s (both s and n-s are valid ECDSA) comes out low-S and valid."""
    secret = secrets.token_bytes(32)
    digest = secrets.token_bytes(32)
    pub = py_secp256k1.ec_pubkey_serialize(py_secp256k1.ec_pubkey_create(secret))
    low = Signature(py_secp256k1.ecdsa_sign(digest, secret)).serialize()
    r, s = _r_s(low)
    assert s <= HALF
    high_raw = r.to_bytes(32, "big") + (SECP256K1_ORDER - s).to_bytes(32, "big")
    assert _low_s_der(high_raw) == low
    _verify(pub, digest, _low_s_der(high_raw))  # does not raise


def test_verification_failure_is_not_returned() -> None:
    secret = secrets.token_bytes(32)
    digest = secrets.token_bytes(32)
    pub = py_secp256k1.ec_pubkey_serialize(py_secp256k1.ec_pubkey_create(secret))
    der = Signature(py_secp256k1.ecdsa_sign(digest, secret)).serialize()
    with pytest.raises(SignerError, match="does not verify"):
        _verify(pub, secrets.token_bytes(32), der)
    with pytest.raises(SignerError):
        _low_s_der(b"\x00" * 64)  # r = s = 0 is never a signature
