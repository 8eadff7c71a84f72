"""The custody service's client for a signer running as its own process (`hsm serve`).

It speaks the same small vocabulary as the in-process signer (`hsm.signer` errors,
`hsm.policy.PolicyViolation` for refusals) so the service handles both modes with
the same `except` clauses. HTTP status -> error:

- 401 -> SignerUnavailable("signer refused our credentials") (an operator must fix it)
- 422 `refused_by_signer` -> PolicyViolation(check, reason); other 422/400 -> SignerRefused
- 404 -> SignerKeyNotFound; 409 -> SignerConflict (terms/descriptor already recorded)
- 503 -> SignerBusy (`signer_busy`) or SignerUnavailable; connection errors -> SignerUnavailable

Key generation needs the loan's terms: `generate_loan_key(loan_ref, *, network,
miner_return_address, bank_liquidation_address)`. The signer records them ONCE and
later signs only towards them, so custody MUST pass the loan's real addresses here
(the in-process `LoanKeyGenerator` protocol takes only `loan_ref`; the caller in
`custody.loans.service.generate_bank_hsm_key` has to pass the terms in this mode).

Only loopback `http://` (127.0.0.1, ::1, localhost) or `https://` URLs are accepted:
the bearer token must not cross a network in clear text.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlsplit

import httpx
from embit.psbt import PSBT

from hsm.policy import PolicyViolation
from hsm.signer import (
    SignerBusy,
    SignerError,
    SignerKeyNotFound,
    SignerRefused,
    SignerUnavailable,
)
from pledge.errors import Conflict

__all__ = ["RemoteKeyEvidence", "RemoteSigner", "SignerConflict"]

_LOOPBACK_NAMES = frozenset({"localhost"})


class SignerConflict(SignerRefused, Conflict):
    """The signer already recorded a different value (terms, descriptor) for the loan."""

    status_code = 409
    code = "conflict"


@dataclass(frozen=True, slots=True)
class RemoteKeyEvidence:
    """What the signer reports about a freshly generated key (same fields the
    in-process `HsmKeyInfo` offers to `custody.loans.service`)."""

    key_ref: str
    public_key: bytes
    local: bool
    never_extractable: bool
    always_sensitive: bool

    @property
    def label(self) -> str:
        return self.key_ref


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return url.rstrip("/")
    if parts.scheme == "http":
        loopback = host in _LOOPBACK_NAMES
        if not loopback:
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
        if loopback:
            return url.rstrip("/")
    raise ValueError(
        "the signer URL must be https:// or http:// on the loopback interface "
        "(127.0.0.1, ::1, localhost)"
    )


def _json_default(value: object) -> str:
    if isinstance(value, Decimal):
        return str(value)  # exact, unlike a float
    raise TypeError(f"cannot send a {type(value).__name__} to the signer")


class RemoteSigner:
    """HTTP client of `hsm serve`. Thread-safe (httpx.Client is); `close()` when done."""

    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        self.url = _check_url(url)
        if not token:
            raise ValueError("the signer token is required")
        self._client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"RemoteSigner(url={self.url!r})"

    @property
    def name(self) -> str:
        return f"remote:{self.url}"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------

    def _call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        content = None if payload is None else json.dumps(payload, default=_json_default)
        headers = {} if content is None else {"Content-Type": "application/json"}
        try:
            response = self._client.request(method, path, content=content, headers=headers)
        except httpx.TimeoutException:
            raise SignerUnavailable(f"the signer at {self.url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise SignerUnavailable(
                f"cannot reach the signer at {self.url} ({type(exc).__name__})"
            ) from None
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        if response.status_code == 200:
            if not isinstance(body, dict):
                raise SignerError("the signer answered 200 without a JSON object")
            return body
        raise self._error(response.status_code, body if isinstance(body, dict) else {})

    def _error(self, status: int, body: dict[str, Any]) -> SignerError:
        message = str(body.get("message") or f"the signer answered HTTP {status}")
        code = str(body.get("error") or "")
        field = body.get("field")
        field = field if isinstance(field, str) else None
        if status == 401:
            return SignerUnavailable("signer refused our credentials")
        if status == 422 and code == "refused_by_signer":
            return PolicyViolation(str(body.get("check") or "unknown"), message)
        if status in (400, 422):
            return SignerRefused(message, field=field)
        if status == 404:
            return SignerKeyNotFound(message, field=field)
        if status == 409:
            return SignerConflict(message, field=field)
        if status == 503:
            if code == "signer_busy":
                return SignerBusy(message)
            return SignerUnavailable(message)
        return SignerError(f"the signer failed (HTTP {status}): {message}")

    # -- the signer's API -------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/health")
        return result

    def generate_loan_key(
        self,
        loan_ref: str,
        *,
        network: str,
        miner_return_address: str,
        bank_liquidation_address: str,
    ) -> RemoteKeyEvidence:
        """Generate the loan's key in the signer's HSM; the signer records the terms
        (payout addresses) once and will only ever sign towards them."""
        body = self._call(
            "POST",
            "/keys",
            {
                "loan_ref": loan_ref,
                "network": network,
                "miner_return_address": miner_return_address,
                "bank_liquidation_address": bank_liquidation_address,
            },
        )
        try:
            return RemoteKeyEvidence(
                key_ref=str(body["key_ref"]),
                public_key=bytes.fromhex(body["public_key"]),
                local=body["local"] is True,
                never_extractable=body["never_extractable"] is True,
                always_sensitive=body["always_sensitive"] is True,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SignerError(f"the signer's key evidence is malformed ({exc!r})") from None

    def register_descriptor(self, loan_ref: str, descriptor: str) -> str:
        """Record the loan's complete descriptor with the signer (once)."""
        body = self._call(
            "POST", f"/loans/{quote(loan_ref, safe='')}/descriptor", {"descriptor": descriptor}
        )
        return str(body["descriptor"])

    def sign(
        self,
        loan_ref: str,
        psbt_b64: str,
        action: dict[str, Any],
        authorization: dict[str, Any],
    ) -> tuple[str, dict[str, Any]]:
        """Ask the signer to check and sign; returns (signed PSBT, the signer's report).

        `action` holds the ApprovedAction evidence (action, debt_kopecks,
        price_rub_per_btc, target_ltv_bps, change_address_index); the signer applies
        its own fee caps and velocity limit. `authorization` says who asked and who
        approved which txid (or carries the risk engine's evidence); the signer checks it
        against the PSBT itself. Refusals raise PolicyViolation."""
        body = self._call(
            "POST",
            "/sign",
            {
                "loan_ref": loan_ref,
                "psbt": psbt_b64,
                "action": action,
                "authorization": authorization,
            },
        )
        signed = body.get("psbt")
        report = body.get("report")
        if not isinstance(signed, str) or not isinstance(report, dict):
            raise SignerError("the signer's answer has no signed PSBT or report")
        try:
            same = PSBT.from_string(signed).tx.txid() == PSBT.from_string(psbt_b64).tx.txid()
        except Exception:
            same = False
        if not same:
            raise SignerError("the signer returned a PSBT for a different transaction")
        return signed, report
