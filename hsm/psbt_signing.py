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


def sign_checked_psbt(signer: DigestSigner, checked: CheckedPsbt, key_ref: str) -> SignedPsbt:
    """Sign a PSBT the policy already passed, with the key behind `key_ref`, which must
    be the descriptor's bank key (a different loan's key ref is refused unsigned)."""
    bank_key = checked.descriptor.keys[_BANK_SEAT]
    if isinstance(bank_key, HDKey):
        return _sign_with_seed(signer, checked, key_ref, bank_key)
    pub = signer.public_key(key_ref)
    if not isinstance(bank_key, FixedKey) or bank_key.public_key != pub:
        raise PolicyViolation(
            "bank_key",
            f"the key {key_ref!r} is not this loan's bank key (a different loan's key?)",
        )
    pubkey = PublicKey.parse(pub)
    tx = checked.tx
    new_sigs: list[bytes] = []
    for i, (inp, amount) in enumerate(zip(checked.psbt.inputs, checked.input_amounts, strict=True)):
        witness_script: Script = inp.witness_script
        if _push(pub) not in witness_script.data:
            raise PolicyViolation(
                "bank_key", f"input {i}'s witness script does not contain the bank key"
            )
        sighash: bytes = tx.sighash_segwit(i, witness_script, amount, SIGHASH.ALL)
        der = signer.sign_digest(key_ref, sighash)
        try:
            sig = Signature.parse(der)
            good = bool(pubkey.verify(sig, sighash)) and sig.serialize() == der
        except Exception:
            good = False
        if not good:
            raise SignerError(
                f"the signer {signer.name} returned a signature for input {i} that does not "
                "verify: not added"
            )
        new_sigs.append(der + bytes([SIGHASH.ALL]))
    psbt = checked.psbt
    for inp, sig_bytes in zip(psbt.inputs, new_sigs, strict=True):
        inp.partial_sigs[pubkey] = sig_bytes
    out: str = psbt.to_string()
    if PSBT.from_string(out).tx.serialize() != tx.serialize():
        raise SignerError("the signed PSBT's unsigned transaction changed while signing")
    return SignedPsbt(out, checked.report, len(new_sigs))


def _sign_with_seed(
    signer: DigestSigner, checked: CheckedPsbt, key_ref: str, bank_key: HDKey
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
    tx = checked.tx
    requests: list[tuple[str, bytes]] = []
    children: list[bytes] = []
    for i, ((index, change), inp, amount) in enumerate(
        zip(checked.input_paths, checked.psbt.inputs, checked.input_amounts, strict=True)
    ):
        child = bank_key.public_key(int(change), index)
        witness_script: Script = inp.witness_script
        if _push(child) not in witness_script.data:
            raise PolicyViolation(
                "bank_key", f"input {i}'s witness script does not contain the bank key"
            )
        sighash: bytes = tx.sighash_segwit(i, witness_script, amount, SIGHASH.ALL)
        requests.append((f"{key_ref}/{int(change)}/{index}", sighash))
        children.append(child)
    ders: list[bytes] = sign_digests(requests)
    pubkeys = [PublicKey.parse(child) for child in children]
    for i, (pubkey, der, (_, sighash)) in enumerate(zip(pubkeys, ders, requests, strict=True)):
        try:
            sig = Signature.parse(der)
            good = bool(pubkey.verify(sig, sighash)) and sig.serialize() == der
        except Exception:
            good = False
        if not good:
            raise SignerError(
                f"the bank seed's signature for input {i} does not verify against this "
                "loan's bank key: is this the seed the loan was made from? Not added"
            )
    psbt = checked.psbt
    for inp, pubkey, der in zip(psbt.inputs, pubkeys, ders, strict=True):
        inp.partial_sigs[pubkey] = der + bytes([SIGHASH.ALL])
    out: str = psbt.to_string()
    if PSBT.from_string(out).tx.serialize() != tx.serialize():
        raise SignerError("the signed PSBT's unsigned transaction changed while signing")
    return SignedPsbt(out, checked.report, len(ders))


def sign_psbt_with(
    signer: Signer, psbt_b64: str, ctx: LoanContext, approved: ApprovedAction
) -> str:
    """Check the PSBT against the loan and the approved action, then add the bank's
    partial signatures (DER + SIGHASH_ALL). Refusals raise PolicyViolation/SignerRefused."""
    return sign_psbt_with_report(signer, psbt_b64, ctx, approved).psbt
