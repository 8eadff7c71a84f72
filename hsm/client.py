"""The one typed interface the service uses to talk to the bank's signer, and its two
transports.

- `InProcessTransport`: the signer's code runs in the service's process (its own token
  login, its own registry file and node connection). Protects against an attacker who
  has the service's database: nothing the signer decides comes from it.
- `HttpTransport`: `hsm serve`, its own process on loopback with its own bearer token.
  Protects against a compromised service process too: the PIN, the registry and the
  enrolled people's keys are out of its reach.

Both hand the same JSON bytes to the same `SignerCore.handle`, so they accept and refuse
exactly the same things; the answer is mapped to the same typed errors here, once:
a refusal is `PolicyViolation(check, reason)`, an unreachable signer `SignerUnavailable`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Self

import httpx

from hsm.logs import REQUEST_ID_HEADER, current_request_id
from hsm.signer import PolicyViolation, SignerError, SignerUnavailable
from hsm.urls import check_secret_url
from pledge.psbts import unsigned_txid
from pledge.tls import client_tls

if TYPE_CHECKING:
    from hsm.core import SignerCore

__all__ = [
    "BankSigner",
    "HttpTransport",
    "InProcessTransport",
    "Signed",
    "Transport",
]


class Transport(Protocol):
    name: str

    def call(self, op: str, payload: Mapping[str, Any]) -> dict[str, Any]: ...
    def close(self) -> None: ...


def _answer(status: int, body: Any) -> dict[str, Any]:
    """One mapping of the signer's answer to results and typed errors."""
    if not isinstance(body, dict):
        raise SignerError(f"the signer answered HTTP {status} without a JSON object")
    if status == 200:
        return body
    if body.get("error") == PolicyViolation.code:
        field = body.get("field")
        raise PolicyViolation(
            str(body.get("check") or "unknown"),
            str(body.get("message") or "refused"),
            field=field if isinstance(field, str) else None,
        )
    if status == 401:
        raise SignerUnavailable("the signer refused our credentials")
    if status == 503:
        raise SignerUnavailable(str(body.get("message") or "the signer is unavailable"))
    raise SignerError(f"the signer failed (HTTP {status}): {body.get('message', '')}")


def _body(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(payload), separators=(",", ":")).encode("utf-8")


class InProcessTransport:
    """Calls the signer's code in this process, through its JSON entry point."""

    def __init__(self, core: SignerCore, *, max_body_bytes: int = 1 << 20) -> None:
        self.core = core
        self.max_body_bytes = max_body_bytes
        self.name = f"in-process:{core.hsm.name}"

    def call(self, op: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        body = _body(payload)
        if len(body) > self.max_body_bytes:
            return _answer(*self.core.refuse_oversized(len(body), self.max_body_bytes))
        return _answer(*self.core.handle(op, body))

    def close(self) -> None:
        """The core's resources belong to whoever built it."""


class HttpTransport:
    """`hsm serve` over HTTP with a bearer token. Thread-safe (httpx.Client is)."""

    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        self.url = check_secret_url(url, "the signer")
        if not token:
            raise ValueError("the signer token is required")
        self.name = f"hsm-serve:{self.url}"
        self._client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            follow_redirects=False,
            verify=client_tls(),
        )

    def __repr__(self) -> str:
        return f"HttpTransport(url={self.url!r})"

    def call(self, op: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        request_id = current_request_id()  # the service's request, if one is being served
        if request_id is not None:
            headers[REQUEST_ID_HEADER] = request_id
        try:
            response = self._client.post(f"/v1/{op}", content=_body(payload), headers=headers)
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
        return _answer(response.status_code, body)

    def close(self) -> None:
        self._client.close()


@dataclass(frozen=True, slots=True)
class Signed:
    psbt: str
    txid: str
    signatures: int
    authorized: str
    report: dict[str, Any]


WEBAUTHN_FIELDS = ("credential_id", "authenticator_data", "client_data_json", "signature")


def _approvals(approvals: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Endorsements as the signer takes them: `{person, signature}` or, for a passkey,
    `{person, webauthn: {credential_id, authenticator_data, client_data_json, signature}}`."""
    out: list[dict[str, Any]] = []
    for a in approvals:
        assertion = a.get("webauthn")
        if isinstance(assertion, Mapping):
            webauthn = {k: str(assertion.get(k, "")) for k in WEBAUTHN_FIELDS}
            out.append({"person": str(a["person"]), "webauthn": webauthn})
        else:
            out.append({"person": str(a["person"]), "signature": str(a["signature"])})
    return out


class BankSigner:
    """The signer's operations, typed. The service holds one of these and nothing else
    of the signer; which transport carries the calls is a deployment choice."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    @property
    def name(self) -> str:
        return self.transport.name

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self) -> dict[str, Any]:
        return self.transport.call("health", {})

    def _statement(
        self, op: str, statement: Mapping[str, Any], approvals: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        return self.transport.call(
            op, {"statement": dict(statement), "approvals": _approvals(approvals)}
        )

    def enroll(
        self, statement: Mapping[str, Any], approvals: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        return self._statement("enroll", statement, approvals)

    def remove(
        self, statement: Mapping[str, Any], approvals: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        return self._statement("remove", statement, approvals)

    def register_loan(
        self, statement: Mapping[str, Any], approvals: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        """Make the loan's bank key and record the loan; answers key, evidence, descriptor."""
        return self._statement("register_loan", statement, approvals)

    def amend_loan(
        self, statement: Mapping[str, Any], approvals: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        return self._statement("amend_loan", statement, approvals)

    def record_repayment(
        self, statement: Mapping[str, Any], approvals: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        return self._statement("repayment", statement, approvals)

    def desk_quote(
        self, statement: Mapping[str, Any], approvals: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        return self._statement("desk_quote", statement, approvals)

    def loan(self, loan_ref: str) -> dict[str, Any]:
        return self.transport.call("loan", {"loan_ref": loan_ref})

    def valuation(self, loan_ref: str) -> dict[str, Any]:
        """The signer's own price, debt, collateral, LTV and verdict, stored under an id."""
        return self.transport.call("valuation", {"loan_ref": loan_ref})

    def prepare(
        self, loan_ref: str, action: str, psbt: str, valuation_id: str | None = None
    ) -> dict[str, Any]:
        """The statement (with its nonce) two bank people must sign for this PSBT."""
        return self.transport.call(
            "prepare",
            {"loan_ref": loan_ref, "action": action, "psbt": psbt, "valuation_id": valuation_id},
        )

    def sign_proof(self, loan_ref: str, psbt: str, challenge: str) -> Signed:
        """The bank's signatures on a control proof (BIP-127) for `challenge`."""
        body = self.transport.call(
            "sign_proof", {"loan_ref": loan_ref, "psbt": psbt, "challenge": challenge}
        )
        signed = body.get("psbt")
        if not isinstance(signed, str):
            raise SignerError("the signer's answer has no signed PSBT")
        if unsigned_txid(signed) != unsigned_txid(psbt):
            raise SignerError("the signer returned a PSBT for a different transaction")
        return Signed(
            psbt=signed,
            txid=str(body.get("txid")),
            signatures=int(body.get("signatures") or 0),
            authorized="proof of reserves",
            report=dict(body.get("report") or {}),
        )

    def cancel(self, nonce: str) -> dict[str, Any]:
        return self.transport.call("cancel", {"nonce": nonce})

    def sign(
        self,
        loan_ref: str,
        action: str,
        psbt: str,
        *,
        nonce: str | None = None,
        approvals: Sequence[Mapping[str, Any]] = (),
        automatic: bool = False,
        valuation_id: str | None = None,
    ) -> Signed:
        body = self.transport.call(
            "sign",
            {
                "loan_ref": loan_ref,
                "action": action,
                "psbt": psbt,
                "automatic": automatic,
                "nonce": nonce,
                "approvals": _approvals(approvals),
                "valuation_id": valuation_id,
            },
        )
        signed = body.get("psbt")
        if not isinstance(signed, str):
            raise SignerError("the signer's answer has no signed PSBT")
        try:
            same = unsigned_txid(signed) == unsigned_txid(psbt)
        except ValueError:
            same = False
        if not same:
            raise SignerError("the signer returned a PSBT for a different transaction")
        return Signed(
            psbt=signed,
            txid=str(body.get("txid")),
            signatures=int(body.get("signatures") or 0),
            authorized=str(body.get("authorized") or ""),
            report=dict(body.get("report") or {}),
        )
