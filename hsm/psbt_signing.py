"""The bank signs a PSBT through any digest `Signer` (the PKCS#11 HSM in production).

Order matters and is the point of this module: the policy check runs first and a
refusal means the digest signer is never called; then the bank key behind
`key_ref` must be the loan's own bank key (a different loan's key ref is refused
before anything is signed); only then is each BIP-143 sighash (computed by embit)
signed, and each signature verified against the key before it enters the PSBT.
All inputs are signed before the PSBT is touched, so a failure leaves no half-signed
result behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from embit.ec import PublicKey, Signature
from embit.psbt import PSBT
from embit.script import Script
from embit.transaction import SIGHASH

from hsm.policy import (
    ApprovedAction,
    CheckedPsbt,
    LoanContext,
    PolicyReport,
    PolicyViolation,
    evaluate_psbt,
)
from hsm.signer import Signer, SignerError, SignerRefused
from pledge.keys import FixedKey, HDKey

__all__ = ["SignedPsbt", "sign_checked_psbt", "sign_psbt_with", "sign_psbt_with_report"]

_BANK_SEAT = 1  # descriptor keys are in (miner, bank, arbiter) order


class DigestSigner(Protocol):
    """What signing a checked PSBT needs of a key holder (any `Signer` backend has it)."""

    @property
    def name(self) -> str: ...
    def public_key(self, key_ref: str) -> bytes: ...
    def sign_digest(self, key_ref: str, digest: bytes) -> bytes: ...


class SeedSigner(DigestSigner, Protocol):
    """An HD key holder (`hsm.seed.BankSeed`): many child signatures from one unseal."""

    def sign_digests(self, requests: list[tuple[str, bytes]]) -> list[bytes]: ...


@dataclass(frozen=True, slots=True)
class SignedPsbt:
    """The signed PSBT with the policy report that allowed it (for the audit log)."""

    psbt: str
    report: PolicyReport
    signatures: int


def _push(pub: bytes) -> bytes:
    """How a 33-byte key appears inside a CHECKMULTISIG script: length byte + key."""
    return bytes([len(pub)]) + pub


def sign_psbt_with_report(
    signer: Signer, psbt_b64: str, ctx: LoanContext, approved: ApprovedAction
) -> SignedPsbt:
    """Check, then sign every input with the loan's bank key; returns PSBT and report."""
    checked = evaluate_psbt(psbt_b64, ctx, approved)
    if ctx.bank_key_ref is None:
        raise SignerRefused(
            "this loan's bank key is an xpub, not an HSM key: the HSM cannot sign for it",
            field="bank_key_ref",
        )
    return sign_checked_psbt(signer, checked, ctx.bank_key_ref)


def sign_checked_psbt(
    signer: DigestSigner, checked: CheckedPsbt, key_ref: str, *, first_input: int = 0
) -> SignedPsbt:
    """Sign a PSBT the policy already passed, with the key behind `key_ref`, which must
    be the descriptor's bank key (a different loan's key ref is refused unsigned).
    `first_input` 1: a proof of reserves, whose commitment input is not signed."""
    bank_key = checked.descriptor.keys[_BANK_SEAT]
    if isinstance(bank_key, HDKey):
        return _sign_with_seed(signer, checked, key_ref, bank_key, first_input)
    pub = signer.public_key(key_ref)
    if not isinstance(bank_key, FixedKey) or bank_key.public_key != pub:
        raise PolicyViolation(
            "bank_key",
            f"the key {key_ref!r} is not this loan's bank key (a different loan's key?)",
        )
    pubs = [pub] * (len(checked.psbt.inputs) - first_input)
    sighashes = _sighashes(checked, pubs, first_input)
    ders = [signer.sign_digest(key_ref, sighash) for sighash in sighashes]
    return _with_signatures(
        checked, pubs, sighashes, ders, f"the signer {signer.name}", first_input
    )


def _sign_with_seed(
    signer: DigestSigner, checked: CheckedPsbt, key_ref: str, bank_key: HDKey, first_input: int
) -> SignedPsbt:
    """The bank key is the loan's BIP-48 account of the bank seed: each input is signed
    with the child at the (change, index) the policy matched its script to, and each
    signature must verify against the child of the account xpub in the signer's own
    descriptor (a seed that does not derive it cannot sign)."""
    if key_ref != f"bip32:{bank_key.fingerprint}{bank_key.origin_path[1:]}":
        raise PolicyViolation(
            "bank_key",
            f"the key {key_ref!r} is not this loan's bank key (a different loan's key?)",
        )
    sign_digests = getattr(signer, "sign_digests", None)
    if sign_digests is None:
        raise SignerRefused(
            f"the signer {signer.name} holds no bank seed: it cannot sign an HD bank key",
            field="bank_key_ref",
        )
    paths = [(int(change), index) for index, change in checked.input_paths]
    pubs = [bank_key.public_key(change, index) for change, index in paths]
    sighashes = _sighashes(checked, pubs, first_input)
    refs = [f"{key_ref}/{change}/{index}" for change, index in paths]
    ders: list[bytes] = sign_digests(list(zip(refs, sighashes, strict=True)))
    return _with_signatures(checked, pubs, sighashes, ders, "the bank seed", first_input)


def _sighashes(checked: CheckedPsbt, pubs: list[bytes], first_input: int = 0) -> list[bytes]:
    """Each input's BIP-143 SIGHASH_ALL digest, once its witness script is seen to hold the
    bank key that will sign it."""
    out: list[bytes] = []
    inputs = zip(checked.psbt.inputs[first_input:], checked.input_amounts, pubs, strict=True)
    for i, (inp, amount, pub) in enumerate(inputs, start=first_input):
        witness_script: Script = inp.witness_script
        if _push(pub) not in witness_script.data:
            raise PolicyViolation(
                "bank_key", f"input {i}'s witness script does not contain the bank key"
            )
        out.append(checked.tx.sighash_segwit(i, witness_script, amount, SIGHASH.ALL))
    return out


def _with_signatures(
    checked: CheckedPsbt,
    pubs: list[bytes],
    sighashes: list[bytes],
    ders: list[bytes],
    who: str,
    first_input: int = 0,
) -> SignedPsbt:
    """Every signature verified (canonical DER) against its key before any enters the
    PSBT; then the PSBT must still carry exactly the unsigned transaction it came with."""
    keys = [PublicKey.parse(pub) for pub in pubs]
    for i, (key, sighash, der) in enumerate(
        zip(keys, sighashes, ders, strict=True), start=first_input
    ):
        try:
            sig = Signature.parse(der)
            good = bool(key.verify(sig, sighash)) and sig.serialize() == der
        except Exception:
            good = False
        if not good:
            raise SignerError(
                f"{who} returned a signature for input {i} that does not verify against this "
                "loan's bank key: not added"
            )
    psbt = checked.psbt
    for inp, key, der in zip(psbt.inputs[first_input:], keys, ders, strict=True):
        inp.partial_sigs[key] = der + bytes([SIGHASH.ALL])
    out: str = psbt.to_string()
    if PSBT.from_string(out).tx.serialize() != checked.tx.serialize():
        raise SignerError("the signed PSBT's unsigned transaction changed while signing")
    return SignedPsbt(out, checked.report, len(ders))


def sign_psbt_with(
    signer: Signer, psbt_b64: str, ctx: LoanContext, approved: ApprovedAction
) -> str:
    """Check the PSBT against the loan and the approved action, then add the bank's
    partial signatures (DER + SIGHASH_ALL). Refusals raise PolicyViolation/SignerRefused."""
    return sign_psbt_with_report(signer, psbt_b64, ctx, approved).psbt
