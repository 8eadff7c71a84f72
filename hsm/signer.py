"""The one signer interface every key-holding backend implements.

Modelled on HWI: one abstract class here, one module per backend
(`hsm.pkcs11_backend` today; hardware wallets and PSBT files later). Callers
(the PSBT signing service) depend only on this module, so a backend can be
swapped without touching policy code.

Errors are translated at the backend's edge into the small typed set below.
They subclass `pledge.errors` types so the API maps them to HTTP once,
with no signer-specific code in the API layer:

- `SignerRefused` (422 signer_refused): the request is not acceptable (bad
  digest length, malformed key reference). Retrying will not help.
- `PolicyViolation` (422 refused_by_signer): a rule of the signer says no; the
  answer carries the rule's `check` too.
- `SignerKeyNotFound` (404 signer_key_not_found) / `SignerKeyExists` (409
  signer_key_exists): refusals about the key itself; they are `SignerRefused`
  so "catch refused" stays one clause.
- `SignerUnavailable` (503 signer_unavailable): module, token, login or
  device problems. The operator must act (or retry later).
- `SignerBusy` (503 signer_busy): the signer could not serve the request in
  time (lock contention, session limits). Retrying soon is reasonable.
- `SignerError` (500): anything else, including a signature that failed our
  own verification, which must never be handed out.

Messages never carry PINs or key material: they are safe to log and return.
"""

from __future__ import annotations

import abc
from types import TracebackType
from typing import Any, Self

from pledge.errors import Conflict, CustodyError, InvalidInput, NotFound, UpstreamUnavailable

__all__ = [
    "PolicyViolation",
    "Signer",
    "SignerBusy",
    "SignerError",
    "SignerKeyExists",
    "SignerKeyNotFound",
    "SignerRefused",
    "SignerUnavailable",
]


class SignerError(CustodyError):
    """Base of every signer failure; on its own it means an internal fault."""

    status_code = 500
    code = "signer_error"


class SignerRefused(SignerError, InvalidInput):
    """The signer will not do this: bad input or a policy says no.

    `check` names the refusal in the signer's decision log; it is the log's own vocabulary,
    kept apart from the HTTP `code` (a PolicyViolation sets it per rule)."""

    status_code = 422
    code = "signer_refused"
    check = "invalid_input"


class PolicyViolation(SignerRefused):
    """The signer refuses: a PSBT, an approval, a registration or evidence breaks a rule.

    `check` is a stable short name of the rule that failed (for tests and metrics);
    `reason` is the human sentence. Every refusal the signer makes is one of these, so
    both transports and both logs carry the same (check, reason) pair."""

    code = "refused_by_signer"

    def __init__(self, check: str, reason: str, *, field: str | None = "psbt") -> None:
        super().__init__(f"the bank's signer refused: {reason}", field=field)
        self.check = check
        self.reason = reason

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "check": self.check}


class SignerKeyNotFound(SignerRefused, NotFound):
    """No key behind this key reference (404, like any unknown resource)."""

    status_code = 404
    code = "signer_key_not_found"
    check = "not_found"


class SignerKeyExists(SignerRefused, Conflict):
    """A key already exists where the policy allows exactly one (one key per loan)."""

    status_code = 409
    code = "signer_key_exists"
    check = "conflict"


class SignerUnavailable(SignerError, UpstreamUnavailable):
    """The signing device/module/token cannot be used right now (or the login failed)."""

    status_code = 503
    code = "signer_unavailable"


class SignerBusy(SignerError, UpstreamUnavailable):
    """The signer is alive but could not take the request in time; retry later."""

    status_code = 503
    code = "signer_busy"


class Signer(abc.ABC):
    """What every signing backend can answer, whatever holds the key.

    `key_ref` is backend-defined but opaque to callers: it is what the backend
    returned when the key was created/registered, stored next to the loan.
    """

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short human-readable backend name for logs and the audit trail."""

    @abc.abstractmethod
    def public_key(self, key_ref: str) -> bytes:
        """Return the 33-byte compressed secp256k1 public key behind `key_ref`."""

    @abc.abstractmethod
    def sign_digest(self, key_ref: str, digest: bytes) -> bytes:
        """Sign a 32-byte digest (a sighash) and return a DER, low-S ECDSA signature.

        Implementations must verify the signature against `public_key(key_ref)`
        before returning it: a bad signature in a PSBT is only discovered at
        broadcast time, far from its cause.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release sessions/handles. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
