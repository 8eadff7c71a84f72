"""Statements people sign for the bank's signer, and their one canonical byte form.

Why in the kernel: the approver's own machine builds and signs a statement (the service's
CLI, later a passkey in the console) and the signer verifies it; both must produce the
same bytes from the same facts, without either running the other's code.

A statement is a flat JSON object with a `kind` and an `expires_at`. Its canonical form
is `STATEMENT_DOMAIN` followed by the JSON with sorted keys and no whitespace (UTF-8).
That byte string is what an Ed25519 or ECDSA P-256 (SHA-256) key signs. A passkey
(WebAuthn) assertion will carry `statement_digest(statement)` as its challenge: it then
signs `authenticatorData || SHA-256(clientDataJSON)` whose `challenge` is that digest.

Floats are refused: amounts are integers and prices decimal strings, so two machines can
never serialise a number differently.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from pledge.errors import InvalidInput

__all__ = [
    "STATEMENT_DOMAIN",
    "TRANSACTION_KEYS",
    "canonical_statement",
    "iso",
    "sign_statement",
    "statement_digest",
    "transaction_statement",
]

STATEMENT_DOMAIN: Final = b"pledge-custody/statement/v1\n"
TRANSACTION_KEYS: Final = frozenset(
    {
        "kind",
        "network",
        "loan_ref",
        "action",
        "unsigned_txid",
        "inputs",
        "outputs",
        "fee_sats",
        "nonce",
        "expires_at",
    }
)


def _check(value: Any, where: str) -> None:
    if isinstance(value, float):
        raise InvalidInput(f"{where} is a float; use an integer or a string", field="statement")
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidInput(f"{where} has a non-string key", field="statement")
            _check(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for n, v in enumerate(value):
            _check(v, f"{where}[{n}]")
    elif value is not None and not isinstance(value, str | int | bool):
        raise InvalidInput(
            f"{where} has an unsupported type {type(value).__name__}", field="statement"
        )


def canonical_statement(statement: Mapping[str, Any]) -> bytes:
    """The exact bytes a person signs."""
    if not isinstance(statement, Mapping):
        raise InvalidInput("a statement is a JSON object", field="statement")
    _check(statement, "statement")
    body = json.dumps(
        dict(statement), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return STATEMENT_DOMAIN + body.encode("utf-8")


def statement_digest(statement: Mapping[str, Any]) -> bytes:
    """SHA-256 of the canonical statement: the challenge a passkey assertion signs."""
    return hashlib.sha256(canonical_statement(statement)).digest()


def iso(when: datetime) -> str:
    """A statement's time format: UTC, seconds, `Z`."""
    if when.tzinfo is None:
        raise ValueError("statement times must be timezone-aware")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sign_statement(
    private_key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
    statement: Mapping[str, Any],
) -> str:
    """Base64 of the signature over the canonical statement (what an approver sends)."""
    message = canonical_statement(statement)
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        raw = private_key.sign(message)
    else:
        raw = private_key.sign(message, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(raw).decode("ascii")


def transaction_statement(
    *,
    network: str,
    loan_ref: str,
    action: str,
    unsigned_txid: str,
    inputs: Sequence[tuple[str, int, int]],
    outputs: Sequence[tuple[str, int]],
    fee_sats: int,
    nonce: str,
    expires_at: datetime,
) -> dict[str, Any]:
    """What an approver of a transaction signs: every input (outpoint, amount) and every
    output (address, amount) in transaction order, the fee, and a nonce the signer issued
    for this one request (a cancelled request's nonce is dead, so is its approval)."""
    return {
        "kind": "transaction",
        "network": network,
        "loan_ref": loan_ref,
        "action": action,
        "unsigned_txid": unsigned_txid,
        "inputs": [f"{txid}:{vout}:{amount}" for txid, vout, amount in inputs],
        "outputs": [f"{address}:{amount}" for address, amount in outputs],
        "fee_sats": fee_sats,
        "nonce": nonce,
        "expires_at": iso(expires_at),
    }
