"""A passkey's registration, read for its enrolment in the bank's signer.

What a person hands in is what `navigator.credentials.create()` returned (as
`PublicKeyCredential.toJSON()` writes it). py_webauthn parses and checks it
(`verify_registration_response`: made for this rp_id, from one of these origins, the user
present and verified, its attestation statement valid): the enrolment statement then names
the credential id and COSE public key it holds, and two signer admins sign that statement.
The registration's own challenge only proved freshness to the page that asked for it; what
makes the passkey the person's is the admins' signatures, so the challenge is taken from
the registration unless the caller knows the one it issued.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from webauthn import verify_registration_response
from webauthn.helpers import parse_client_data_json, parse_registration_credential_json
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.exceptions import WebAuthnException

from pledge.errors import InvalidInput

__all__ = ["enrolment_from_registration"]


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def enrolment_from_registration(
    registration: str,
    *,
    rp_id: str,
    origins: Sequence[str],
    challenge: bytes | None = None,
) -> dict[str, Any]:
    """The passkey fields of an enrolment (`POST /v1/signer-people` with `"algorithm":
    "webauthn"`) from a registration response, once py_webauthn has checked it."""
    try:
        credential = parse_registration_credential_json(registration)
        client_data = parse_client_data_json(credential.response.client_data_json)
        origin = client_data.origin
        if origin not in origins:
            raise InvalidInput(
                f"the passkey was registered from {origin!r}, not one of {', '.join(origins)}",
                field="origin",
            )
        verified = verify_registration_response(
            credential=credential,
            expected_challenge=challenge if challenge is not None else client_data.challenge,
            expected_rp_id=rp_id,
            expected_origin=list(origins),
            require_user_verification=True,
            # what the bank's signer accepts: ES256 (P-256) and EdDSA (Ed25519)
            supported_pub_key_algs=[
                COSEAlgorithmIdentifier.ECDSA_SHA_256,
                COSEAlgorithmIdentifier.EDDSA,
            ],
        )
    except WebAuthnException as exc:
        raise InvalidInput(f"the passkey registration does not verify: {exc}") from None
    return {
        "algorithm": "webauthn",
        "public_key": _b64url(verified.credential_public_key),
        "credential_id": _b64url(verified.credential_id),
        "rp_id": rp_id,
        "origins": list(origins),
    }
