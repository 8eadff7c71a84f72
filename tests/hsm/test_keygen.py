"""Key generation inside a real SoftHSM2 token: the key is born there and stays there."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pkcs11
import pytest
from embit.ec import PublicKey
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11e

from hsm.pkcs11_backend import SECP256K1_EC_PARAMS, Pkcs11Signer, key_id_for_loan
from hsm.signer import Signer, SignerKeyExists, SignerKeyNotFound, SignerRefused
from pledge.errors import Conflict, InvalidInput, NotFound
from regtest.softhsm import SoftHsmToken

pytestmark = pytest.mark.hsm


@pytest.fixture
def raw_session(softhsm_token: SoftHsmToken, pkcs11_signer: Pkcs11Signer) -> Iterator[Any]:
    """A plain python-pkcs11 session riding on the signer's login (login is per token)."""
    lib = pkcs11.lib(softhsm_token.module_path)
    session = lib.get_token(token_label=softhsm_token.label).open()
    try:
        yield session
    finally:
        session.close()


def test_generated_key_is_local_non_extractable_secp256k1(pkcs11_signer: Pkcs11Signer) -> None:
    assert isinstance(pkcs11_signer, Signer)
    assert pkcs11_signer.name.startswith("pkcs11:pledge-test-")
    info = pkcs11_signer.generate_loan_key("loan-keygen-1")

    assert info.key_ref == info.label == "pledge-loan:loan-keygen-1"
    assert info.key_id_hex == key_id_for_loan("loan-keygen-1").hex()
    assert len(info.public_key) == 33 and info.public_key[0] in (2, 3)
    parsed = PublicKey.parse(info.public_key)  # raises if not a curve point
    assert parsed.compressed and parsed.sec() == info.public_key
    assert info.local is True
    assert info.never_extractable is True
    assert info.always_sensitive is True
    assert pkcs11_signer.public_key(info.key_ref) == info.public_key
    assert pkcs11_signer.key_info(info.key_ref) == info


def test_private_key_attributes_and_value_unreadable(
    pkcs11_signer: Pkcs11Signer, raw_session: Any
) -> None:
    info = pkcs11_signer.generate_loan_key("loan-keygen-2")
    priv = raw_session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=info.key_ref)
    pub = raw_session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=info.key_ref)

    assert priv[Attribute.KEY_TYPE] == KeyType.EC
    assert bytes(priv[Attribute.EC_PARAMS]) == SECP256K1_EC_PARAMS
    assert priv[Attribute.TOKEN] is True
    assert priv[Attribute.PRIVATE] is True
    assert priv[Attribute.SENSITIVE] is True
    assert priv[Attribute.EXTRACTABLE] is False
    assert priv[Attribute.SIGN] is True
    for capability in (
        Attribute.DERIVE,
        Attribute.DECRYPT,
        Attribute.UNWRAP,
        Attribute.SIGN_RECOVER,
    ):
        assert priv[capability] is False, capability
    assert bytes(priv[Attribute.ID]).hex() == info.key_id_hex
    assert pub[Attribute.TOKEN] is True
    assert pub[Attribute.ENCRYPT] is False

    with pytest.raises(p11e.AttributeSensitive):
        priv[Attribute.VALUE]
    with pytest.raises(p11e.PKCS11Error):
        priv[Attribute.EXTRACTABLE] = True  # cannot be turned back on


def test_second_key_for_same_loan_refused(pkcs11_signer: Pkcs11Signer) -> None:
    first = pkcs11_signer.generate_loan_key("loan-keygen-dup")
    with pytest.raises(SignerKeyExists) as err:
        pkcs11_signer.generate_loan_key("loan-keygen-dup")
    assert isinstance(err.value, SignerRefused) and isinstance(err.value, Conflict)
    assert err.value.status_code == 409 and err.value.field == "loan_ref"
    # The original key is untouched.
    assert pkcs11_signer.public_key(first.key_ref) == first.public_key


@pytest.mark.parametrize("loan_ref", ["", " loan", "loan 1", "../etc", "x" * 65, "é", "-lead"])
def test_malformed_loan_ref_refused(pkcs11_signer: Pkcs11Signer, loan_ref: str) -> None:
    with pytest.raises(SignerRefused) as err:
        pkcs11_signer.generate_loan_key(loan_ref)
    assert isinstance(err.value, InvalidInput) and err.value.status_code == 422


def test_unknown_and_malformed_key_refs(pkcs11_signer: Pkcs11Signer) -> None:
    with pytest.raises(SignerKeyNotFound) as err:
        pkcs11_signer.public_key("pledge-loan:never-generated")
    assert isinstance(err.value, NotFound) and err.value.status_code == 404
    with pytest.raises(SignerKeyNotFound):
        pkcs11_signer.sign_digest("pledge-loan:never-generated", b"\x01" * 32)
    with pytest.raises(SignerRefused):
        pkcs11_signer.public_key("some-other-label")
