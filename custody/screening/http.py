"""The adapter for a commercial screening service over HTTP (JSON).

Request: `POST {base_url}/v1/screen`, `Authorization: Bearer <api key>`, body
    {"network": "mainnet", "subject": {"kind": "transaction", "txid": "...", "vout": 0,
     "amount_sats": 1000, "inputs": [{"txid": "...", "vout": 1, "address": "bc1..."}]}}
or  {"network": ..., "subject": {"kind": "address", "address": "bc1...",
     "purpose": "miner_return"}}
Answer (200): {"result": "clear" | "review" | "block", "score": 0..100,
    "reasons": ["..."], "reference": "the provider's case id"}.

Anything else (an error status, a timeout, a body that is not that JSON, a larger one
than `MAX_RESPONSE_BYTES`) is `review` with the reason "provider unavailable": it fails
closed, never clear. The API key is never logged or stored (it is a `SecretStr` until
the header is made), and a failure names only its kind, not the URL."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import structlog
from pydantic import BaseModel, Field, SecretStr, ValidationError

from custody.screening.providers import (
    UNAVAILABLE,
    AddressSubject,
    Decision,
    Result,
    Subject,
)
from pledge.tls import client_tls

log = structlog.get_logger(__name__)
MAX_RESPONSE_BYTES = 64 * 1024


class _Answer(BaseModel):
    result: Result
    score: int = Field(ge=0, le=100)
    reasons: list[str] = Field(default_factory=list, max_length=50)
    reference: str | None = Field(default=None, max_length=200)


def request_body(subject: Subject, network: str) -> dict[str, Any]:
    """The JSON the service is sent for `subject` (the mapping above)."""
    if isinstance(subject, AddressSubject):
        body: dict[str, Any] = {
            "kind": "address",
            "address": subject.address,
            "purpose": subject.purpose,
        }
    else:
        body = {
            "kind": "transaction",
            "txid": subject.txid,
            "vout": subject.vout,
            "amount_sats": subject.amount_sats,
            "inputs": [
                {"txid": i.txid, "vout": i.vout, "address": i.address} for i in subject.inputs
            ],
        }
    return {"network": network, "subject": body}


class HttpProvider:
    name = "http"

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        *,
        network: str,
        timeout: float = 5.0,
        name: str = "http",
    ) -> None:
        self.url = base_url.rstrip("/") + "/v1/screen"
        self._api_key = api_key
        self.network = network
        self.timeout = timeout
        self.name = name

    @property
    def needs_inputs(self) -> bool:
        return True

    def screen(self, subject: Subject) -> Decision:
        try:
            answer = self._ask(request_body(subject, self.network))
        except _Unavailable as exc:
            log.warning("screening.provider_unavailable", provider=self.name, why=str(exc))
            return Decision(Result.review, 0, [f"{UNAVAILABLE}: {exc}"], self.name)
        return Decision(
            answer.result,
            answer.score,
            [r[:500] for r in answer.reasons],
            self.name,
            answer.reference,
        )

    def _ask(self, body: dict[str, Any]) -> _Answer:
        headers = {
            "Authorization": f"Bearer {self._api_key.get_secret_value()}",
            "Accept": "application/json",
        }
        # httpx's timeouts are per operation: the deadline bounds a server that dribbles.
        deadline = time.monotonic() + self.timeout
        try:
            with (
                httpx.Client(
                    timeout=self.timeout, follow_redirects=False, verify=client_tls()
                ) as client,
                client.stream("POST", self.url, json=body, headers=headers) as response,
            ):
                if response.status_code != 200:
                    raise _Unavailable(f"HTTP {response.status_code}")
                raw = bytearray()
                for chunk in response.iter_bytes():
                    raw += chunk
                    if len(raw) > MAX_RESPONSE_BYTES:
                        raise _Unavailable(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise _Unavailable(f"timed out after {self.timeout}s")
        except httpx.TimeoutException as exc:
            raise _Unavailable(f"timed out after {self.timeout}s") from exc
        except httpx.HTTPError as exc:
            raise _Unavailable(f"request failed ({type(exc).__name__})") from exc
        try:
            return _Answer.model_validate(json.loads(bytes(raw)))
        except (ValueError, ValidationError) as exc:
            raise _Unavailable("answer is not the expected JSON") from exc


class _Unavailable(Exception):
    """The provider gave no usable answer (why, without the URL or the key)."""
