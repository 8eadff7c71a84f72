"""Passkeys (WebAuthn) as one more way for an enrolled person to sign a statement.

Why the signer checks the assertion itself: the console that shows the approval page runs
in the service, which the signer does not trust. So a passkey approval reaches the signer
as the authenticator made it (authenticatorData, clientDataJSON, signature) and is checked
here against what enrolment recorded: the credential, its COSE public key, the relying
party id and the origins it may be used from. The challenge is `statement_digest` (SHA-256
of the canonical statement), so the assertion signs that exact statement and no other.

All parsing (CBOR, COSE, authenticatorData, clientDataJSON) is py_webauthn's
(`verify_authentication_response`, `decode_credential_public_key`); user verification is
required. The signature counter is compared here with the one the registry keeps
(`People.verify_quorum` records it only when the whole quorum verifies), so a resend of
the very assertion last counted is not taken for a clone.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from webauthn import verify_authentication_response
from webauthn.helpers import (
    base64url_to_bytes,
    bytes_to_base64url,
    decode_credential_public_key,
    decoded_public_key_to_cryptography,
)
from webauthn.helpers.cose import COSECRV, COSEKTY, COSEAlgorithmIdentifier
from webauthn.helpers.decode_credential_public_key import (
    DecodedEC2PublicKey,
    DecodedOKPPublicKey,
)
from webauthn.helpers.exceptions import WebAuthnException

from hsm.signer import PolicyViolation

__all__ = [
    "ENROL_KEYS",
    "Assertion",
    "PasskeyEnrolment",
    "assertion_hash",
    "cose_public_key",
    "enrolment_of",
    "verify_assertion",
]

# What a passkey enrolment statement carries besides the common ones.
ENROL_KEYS: Final = frozenset(
    {
        "kind",
        "name",
        "role",
        "algorithm",
        "public_key",
        "credential_id",
        "rp_id",
        "origins",
        "expires_at",
    }
)
MAX_CREDENTIAL_ID_BYTES: Final = 1023  # WebAuthn's own bound
MAX_ORIGINS: Final = 8
_B64URL: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_LABEL: Final = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_RP_ID: Final = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


@dataclass(frozen=True, slots=True)
class Assertion:
    """A WebAuthn assertion as `navigator.credentials.get()` returned it (base64url)."""

    credential_id: str
    authenticator_data: str
    client_data_json: str
    signature: str


@dataclass(frozen=True, slots=True)
class PasskeyEnrolment:
    """The passkey an enrolment statement names."""

    credential_id: str  # canonical base64url (no padding)
    public_key: bytes  # the credential's COSE public key
    rp_id: str
    origins: tuple[str, ...]


def _b64url(text: Any, field: str, max_bytes: int) -> bytes:
    if not isinstance(text, str) or not _B64URL.match(text) or len(text) > max_bytes * 4 // 3 + 4:
        raise PolicyViolation("enrolment", f"{field} must be base64url (no padding)", field=field)
    raw = base64url_to_bytes(text)
    if not raw or len(raw) > max_bytes or bytes_to_base64url(raw) != text:
        raise PolicyViolation("enrolment", f"{field} is not canonical base64url", field=field)
    return raw


def cose_public_key(text: Any) -> bytes:
    """The COSE key of an ES256 (P-256) or EdDSA (Ed25519) passkey, checked by decoding
    it into a key (py_webauthn): anything else is refused at enrolment."""
    raw = _b64url(text, "public_key", 1024)
    try:
        if raw[0] == 0x04:  # a U2F raw point the library would take: not a COSE key
            raise ValueError("not COSE")
        decoded = decode_credential_public_key(raw)
        es256 = (
            isinstance(decoded, DecodedEC2PublicKey)
            and decoded.kty == COSEKTY.EC2
            and decoded.alg == COSEAlgorithmIdentifier.ECDSA_SHA_256
            and decoded.crv == COSECRV.P256
        )
        eddsa = (
            isinstance(decoded, DecodedOKPPublicKey)
            and decoded.kty == COSEKTY.OKP
            and decoded.alg == COSEAlgorithmIdentifier.EDDSA
            and decoded.crv == COSECRV.ED25519
        )
        if not (es256 or eddsa):
            raise ValueError("not ES256 or EdDSA")
        decoded_public_key_to_cryptography(decoded)  # refuses a point off the curve
    except (WebAuthnException, ValueError, KeyError, TypeError, IndexError):
        raise PolicyViolation(
            "enrolment",
            "public_key is not the COSE key of an ES256 (P-256) or EdDSA (Ed25519) passkey",
            field="public_key",
        ) from None
    return raw


def _rp_id(value: Any) -> str:
    if not isinstance(value, str) or not _RP_ID.match(value) or value.replace(".", "").isdigit():
        raise PolicyViolation(
            "enrolment", "rp_id must be a domain name (lower case, no port)", field="rp_id"
        )
    return value


def _origins(value: Any, rp_id: str) -> tuple[str, ...]:
    """Origins a passkey of `rp_id` may be used from: https on the rp_id or a subdomain of
    it (http only on localhost, as browsers allow), no path."""
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= MAX_ORIGINS:
        raise PolicyViolation(
            "enrolment", f"origins must be a list of 1-{MAX_ORIGINS} origins", field="origins"
        )
    out: list[str] = []
    for origin in value:
        try:
            parts = urlsplit(origin) if isinstance(origin, str) and len(origin) <= 300 else None
            host, _ = (parts.hostname, parts.port) if parts else (None, None)
        except ValueError:
            parts, host = None, None
        ok = (
            parts is not None
            and host is not None
            and (parts.scheme == "https" or (parts.scheme == "http" and host == "localhost"))
            and (host == rp_id or host.endswith("." + rp_id))
            and origin == f"{parts.scheme}://{parts.netloc}"
            and parts.netloc == parts.netloc.lower()
        )
        if not ok:
            raise PolicyViolation(
                "enrolment",
                f"origin {str(origin)[:80]!r} is not https://{rp_id} or a subdomain of it "
                "(scheme and host only)",
                field="origins",
            )
        out.append(str(origin))
    if len(set(out)) != len(out):
        raise PolicyViolation("enrolment", "an origin is listed twice", field="origins")
    return tuple(out)


def enrolment_of(statement: Mapping[str, Any]) -> PasskeyEnrolment:
    """The passkey named by a `webauthn` enrolment statement, every field checked."""
    credential = _b64url(statement["credential_id"], "credential_id", MAX_CREDENTIAL_ID_BYTES)
    rp_id = _rp_id(statement["rp_id"])
    return PasskeyEnrolment(
        credential_id=bytes_to_base64url(credential),
        public_key=cose_public_key(statement["public_key"]),
        rp_id=rp_id,
        origins=_origins(statement["origins"], rp_id),
    )


def assertion_hash(assertion: Assertion) -> str:
    """Names one assertion exactly (a resend of it is the same; a clone's differs)."""
    parts = (assertion.authenticator_data, assertion.client_data_json, assertion.signature)
    return hashlib.sha256("\n".join(parts).encode("ascii", "replace")).hexdigest()


def verify_assertion(
    assertion: Assertion,
    *,
    person: str,
    challenge: bytes,
    credential_id: str,
    public_key: bytes,
    rp_id: str,
    origins: Sequence[str],
) -> int:
    """The assertion's signature counter once py_webauthn has checked it: made by the
    enrolled credential over `challenge`, for `rp_id`, from one of `origins`, with the
    user present and verified. The counter itself is compared by the caller."""
    if assertion.credential_id != credential_id:
        raise PolicyViolation(
            "approval_credential",
            f"the passkey that signed is not the one enrolled for {person}",
            field="approvals",
        )
    credential = {
        "id": assertion.credential_id,
        "rawId": assertion.credential_id,
        "type": "public-key",
        "response": {
            "authenticatorData": assertion.authenticator_data,
            "clientDataJSON": assertion.client_data_json,
            "signature": assertion.signature,
        },
    }
    try:
        verified = verify_authentication_response(
            credential=credential,
            expected_challenge=challenge,
            expected_rp_id=rp_id,
            expected_origin=list(origins),
            credential_public_key=public_key,
            # The counter is compared by the caller, which also knows a resend of the last
            # assertion counted (py_webauthn would take that for a clone).
            credential_current_sign_count=0,
            require_user_verification=True,
        )
    except (WebAuthnException, ValueError, KeyError, TypeError, IndexError) as exc:
        reason = str(exc)[:200] if isinstance(exc, WebAuthnException) else "it is malformed"
        raise PolicyViolation(
            "approval_signature",
            f"{person}'s passkey assertion does not verify over this statement: {reason}",
            field="approvals",
        ) from None
    return int(verified.new_sign_count)
