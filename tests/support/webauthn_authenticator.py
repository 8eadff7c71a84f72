"""A software passkey for tests: what a platform authenticator and the browser together
hand the page, built from the WebAuthn spec (not from py_webauthn, which the signer uses to
check it, so the two are independent).

An assertion is authenticatorData (SHA-256(rp_id) || flags || 32-bit counter), the
clientDataJSON `{type: "webauthn.get", challenge, origin}` and the signature over
authenticatorData || SHA-256(clientDataJSON): ECDSA P-256 (ES256) by default, Ed25519
(EdDSA) on request. Every part a test attacks can be set per assertion.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pledge.statements import statement_digest

__all__ = ["FLAG_UP", "FLAG_UV", "PasskeyPerson", "SoftwarePasskey", "b64url"]

FLAG_UP = 0x01
FLAG_UV = 0x04
FLAG_AT = 0x40
RP_ID = "custody.bank.test"
ORIGIN = "https://custody.bank.test"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass
class SoftwarePasskey:
    """One credential: its key, id and counter (`counter` None: one that never counts,
    as synced passkeys report 0)."""

    rp_id: str = RP_ID
    origin: str = ORIGIN
    algorithm: Literal["es256", "eddsa"] = "es256"
    counter: int | None = 0
    credential_id: bytes = field(default_factory=lambda: os.urandom(32))
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey = field(init=False)

    def __post_init__(self) -> None:
        self.key = (
            ed25519.Ed25519PrivateKey.generate()
            if self.algorithm == "eddsa"
            else ec.generate_private_key(ec.SECP256R1())
        )

    @property
    def credential_id_b64(self) -> str:
        return b64url(self.credential_id)

    def cose_key(self) -> bytes:
        """The credential's public key as COSE (what registration hands the RP)."""
        public = self.key.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            x = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
            return cbor2.dumps({1: 1, 3: -8, -1: 6, -2: x})
        point = public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        return cbor2.dumps({1: 2, 3: -7, -1: 1, -2: point[1:33], -3: point[33:65]})

    def clone(self) -> SoftwarePasskey:
        """The same key and id with its own counter, as a cloned authenticator has."""
        twin = SoftwarePasskey(self.rp_id, self.origin, self.algorithm, self.counter)
        twin.credential_id, twin.key = self.credential_id, self.key
        return twin

    def _sign(self, data: bytes) -> bytes:
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return self.key.sign(data)
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))

    def assertion(
        self,
        challenge: bytes,
        *,
        origin: str | None = None,
        rp_id: str | None = None,
        flags: int = FLAG_UP | FLAG_UV,
        counter: int | None = None,
        kind: str = "webauthn.get",
    ) -> dict[str, str]:
        """`navigator.credentials.get()`'s answer over `challenge`, as the endorsement's
        `webauthn` body (base64url fields). Each call moves the counter on (if it counts)."""
        if counter is None:
            if self.counter is not None:
                self.counter += 1
            counter = self.counter or 0
        auth_data = (
            hashlib.sha256((rp_id or self.rp_id).encode()).digest()
            + bytes([flags])
            + struct.pack(">I", counter)
        )
        client_data = json.dumps(
            {
                "type": kind,
                "challenge": b64url(challenge),
                "origin": origin or self.origin,
                "crossOrigin": False,
            },
            separators=(",", ":"),
        ).encode()
        signature = self._sign(auth_data + hashlib.sha256(client_data).digest())
        return {
            "credential_id": self.credential_id_b64,
            "authenticator_data": b64url(auth_data),
            "client_data_json": b64url(client_data),
            "signature": b64url(signature),
        }

    def registration(
        self, challenge: bytes, *, origin: str | None = None, flags: int = FLAG_UP | FLAG_UV
    ) -> dict[str, Any]:
        """`navigator.credentials.create()`'s answer (`PublicKeyCredential.toJSON()`), with
        a `none` attestation: what a person hands in to be enrolled."""
        auth_data = (
            hashlib.sha256(self.rp_id.encode()).digest()
            + bytes([flags | FLAG_AT])
            + struct.pack(">I", self.counter or 0)
            + bytes(16)  # AAGUID
            + struct.pack(">H", len(self.credential_id))
            + self.credential_id
            + self.cose_key()
        )
        client_data = json.dumps(
            {
                "type": "webauthn.create",
                "challenge": b64url(challenge),
                "origin": origin or self.origin,
            },
            separators=(",", ":"),
        ).encode()
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        return {
            "id": self.credential_id_b64,
            "rawId": self.credential_id_b64,
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client_data),
                "attestationObject": b64url(attestation),
            },
        }


@dataclass
class PasskeyPerson:
    """A person of the bank who approves with a passkey (duck-types `regtest.people.Staff`:
    `name`, `role`, `endorse`)."""

    name: str
    role: str
    passkey: SoftwarePasskey = field(default_factory=SoftwarePasskey)

    def enrolment(self, expires_at: str, *, origins: list[str] | None = None) -> dict[str, Any]:
        """The statement two admins sign to enrol this person's passkey."""
        return {
            "kind": "enroll",
            "name": self.name,
            "role": self.role,
            "algorithm": "webauthn",
            "public_key": b64url(self.passkey.cose_key()),
            "credential_id": self.passkey.credential_id_b64,
            "rp_id": self.passkey.rp_id,
            "origins": origins or [self.passkey.origin],
            "expires_at": expires_at,
        }

    def endorse(self, statement: dict[str, Any], **options: Any) -> dict[str, Any]:
        """Their passkey's approval of the statement, as the console would send it."""
        return {
            "person": self.name,
            "webauthn": self.passkey.assertion(statement_digest(statement), **options),
        }
