"""`hsm serve`: the bank's signer as its own process, with its own policy and records.

Why a separate process: the custody API is the biggest attack surface of the
system. In this mode the API holds neither the HSM PIN nor the loan terms the
signer trusts; it can only ASK. The signer answers from its own registry
(`hsm.registry`): payout addresses and the descriptor recorded once, collateral
amounts read from the PSBT's own previous transactions (hash-checked against the
outpoints), the address index from the inputs' BIP-32 derivations (then the
policy checks the script really derives from the descriptor there), fee caps and
a daily velocity limit from the signer's configuration. What the request claims
is evidence for the amounts (debt, price), never a source of addresses.

One rule for authentication: every path (health included, 404s included) needs
`Authorization: Bearer <token>`, checked in a middleware before any routing or
body parsing, with a constant-time comparison. Neither the token nor the PIN is
ever logged or returned.
"""

from __future__ import annotations

import hmac
import logging
import threading
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Literal

from embit.psbt import PSBT
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from hsm.boundary import Approval, Authorization, check_authorization
from hsm.pkcs11_backend import HsmKeyInfo, Pkcs11Signer
from hsm.policy import (
    MAX_PSBT_BASE64_CHARS,
    ApprovedAction,
    LoanContext,
    PolicyViolation,
    check_psbt,
    proven_prev_output,
)
from hsm.psbt_signing import sign_psbt_with_report
from hsm.registry import LoanRecord, Registry, RegistryConflict
from hsm.signer import SignerBusy, SignerKeyNotFound, SignerRefused, SignerUnavailable
from pledge.addresses import validate_address
from pledge.descriptors import CollateralDescriptor, parse_collateral_descriptor
from pledge.errors import CustodyError, InvalidInput
from pledge.keys import FixedKey, HDKey
from pledge.network import check_network

__all__ = [
    "DEFAULT_DAILY_LIMIT_SATS",
    "DEFAULT_MAX_FEE_RATE",
    "DEFAULT_MAX_FEE_SATS",
    "KeyRequest",
    "SignRequest",
    "create_signer_app",
]

log = logging.getLogger(__name__)

DEFAULT_DAILY_LIMIT_SATS: Final = 10 * 100_000_000
DEFAULT_MAX_FEE_SATS: Final = ApprovedAction("release").max_fee_sats
DEFAULT_MAX_FEE_RATE: Final = ApprovedAction("release").max_fee_rate_sat_vb
_BANK_SEAT: Final = 1  # descriptor keys are in (miner, bank, arbiter) order
_WINDOW: Final = timedelta(hours=24)


# --------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeyRequest(_Body):
    loan_ref: str = Field(min_length=1, max_length=64)
    network: Literal["mainnet", "testnet", "signet", "regtest"]
    miner_return_address: str = Field(min_length=1, max_length=100)
    bank_liquidation_address: str = Field(min_length=1, max_length=100)


class DescriptorRequest(_Body):
    descriptor: str = Field(min_length=1, max_length=2000)


class ActionBody(_Body):
    """The approved action's evidence. Fee caps and tolerance are NOT accepted from
    the caller: they are the signer's own configuration."""

    action: Literal[
        "release", "liquidation", "partial_liquidation", "dispute_release", "dispute_liquidation"
    ]
    debt_kopecks: int | None = None
    price_rub_per_btc: Decimal | None = None
    target_ltv_bps: int | None = None
    change_address_index: int | None = None
    change_address_change: bool = False


class ApprovalBody(_Body):
    principal: str = Field(min_length=1, max_length=160)
    role: str = Field(min_length=1, max_length=32)
    unsigned_txid: str = Field(min_length=64, max_length=64)


class AuthorizationBody(_Body):
    """Who asked and who approved (or the risk engine's evidence): checked by
    hsm.boundary.check_authorization against the PSBT's own txid."""

    requested_by: str = Field(min_length=1, max_length=160)
    requester_role: str = Field(min_length=1, max_length=32)
    approvals: list[ApprovalBody] = Field(default_factory=list, max_length=32)
    risk_evidence: dict[str, Any] | None = None


class SignRequest(_Body):
    loan_ref: str = Field(min_length=1, max_length=64)
    psbt: str = Field(min_length=1, max_length=MAX_PSBT_BASE64_CHARS)
    action: ActionBody
    authorization: AuthorizationBody


# --------------------------------------------------------------------------- auth


class _BearerAuth:
    """Pure ASGI middleware: 401 for anything without the right bearer token.

    Runs before routing and body parsing, so an unauthenticated caller learns
    nothing (not even which paths exist or whether its JSON was valid)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value
                break
        scheme, _, credential = given.partition(b" ")
        ok = scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self._token)
        if not ok:
            response = JSONResponse(
                {"error": "not_authenticated", "message": "a valid bearer token is required"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------- helpers


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status)


def _key_body(info: HsmKeyInfo) -> dict[str, Any]:
    return {
        "key_ref": info.key_ref,
        "label": info.label,
        "public_key": info.public_key.hex(),
        "local": info.local,
        "never_extractable": info.never_extractable,
        "always_sensitive": info.always_sensitive,
    }


def _parse_psbt(psbt_b64: str) -> tuple[PSBT, str]:
    """The PSBT and its unsigned txid (the key of the decisions log and of velocity)."""
    try:
        psbt = PSBT.from_string(psbt_b64.strip())
        txid: str = psbt.tx.txid().hex()
    except Exception as exc:
        raise PolicyViolation(
            "psbt_format", f"the PSBT cannot be parsed ({type(exc).__name__})"
        ) from None
    return psbt, txid


def _collateral_from_psbt(
    psbt: PSBT, descriptor: CollateralDescriptor
) -> dict[tuple[str, int], tuple[int, int, bool]]:
    """The collateral the PSBT claims to spend, with amounts PROVEN by the previous
    transactions (hashed to the outpoint txid) and the (index, change) path read
    from the inputs' BIP-32 derivations. The policy then checks every script
    derives from the loan's descriptor at that path, so a lie here is refused there."""
    hd_keys = descriptor.hd_keys
    collateral: dict[tuple[str, int], tuple[int, int, bool]] = {}
    for n, inp in enumerate(psbt.inputs):
        outpoint = (inp.txid.hex(), int(inp.vout))
        where = f"input {n} ({outpoint[0]}:{outpoint[1]})"
        amount = int(proven_prev_output(inp, where).value)
        collateral[outpoint] = (amount, *_input_path(inp.bip32_derivations, hd_keys, where))
    return collateral


def _input_path(derivations: dict[Any, Any], hd_keys: list[HDKey], where: str) -> tuple[int, bool]:
    """(address index, change) of an input, from the derivation of one of the loan's
    HD keys. A loan whose keys are all fixed has one address: index 0, receive."""
    if not hd_keys:
        return 0, False
    found: set[tuple[int, bool]] = set()
    for pub, der in derivations.items():
        for key in hd_keys:
            base = key.path
            path = list(der.derivation)
            if (
                der.fingerprint.hex() == key.fingerprint
                and len(path) == len(base) + 2
                and path[: len(base)] == base
                and path[-2] in (0, 1)
                and path[-1] < 2**31
                and key.public_key(path[-2], path[-1]) == pub.sec()
            ):
                found.add((int(path[-1]), bool(path[-2])))
    if len(found) != 1:
        raise PolicyViolation(
            "input_derivation",
            f"{where} does not say (by one BIP-32 derivation of the loan's keys) which of "
            "the loan's addresses it spends",
        )
    return found.pop()


# --------------------------------------------------------------------------- the app


def create_signer_app(
    signer: Pkcs11Signer,
    registry: Registry,
    token: str,
    daily_limit_sats: int,
    *,
    max_fee_sats: int = DEFAULT_MAX_FEE_SATS,
    max_fee_rate_sat_vb: Decimal = DEFAULT_MAX_FEE_RATE,
    token_label: str | None = None,
) -> FastAPI:
    """The signer's HTTP app. `token` is the bearer secret callers must present;
    fee caps and the daily limit are this process's own configuration."""
    if len(token) < 32:
        raise ValueError("the serve token must be at least 32 characters")
    if daily_limit_sats < 0 or max_fee_sats < 0 or max_fee_rate_sat_vb <= 0:
        raise ValueError("limits must be positive")
    label = token_label or signer.name.removeprefix("pkcs11:")
    # Velocity check, signature and usage record must not interleave between two
    # requests (both would pass the check): one signing at a time (the HSM
    # serialises calls anyway).
    sign_lock = threading.Lock()

    app = FastAPI(
        title="pledge-custody bank signer",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(_BearerAuth, token=token)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        # 400, not 422: 422 means "the signer's policy refused" to our client.
        where = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()[:5])
        return _error(400, "invalid_request", f"malformed request body ({where})")

    @app.exception_handler(CustodyError)
    async def _custody_error(_: Request, exc: CustodyError) -> Response:
        if isinstance(exc, PolicyViolation):
            return _error(422, "refused_by_signer", exc.reason, check=exc.check)
        if isinstance(exc, SignerUnavailable | SignerBusy):
            log.warning("signer unavailable: %s", exc.message)
            return _error(503, exc.code, f"the HSM cannot sign right now: {exc.message}")
        body = exc.to_dict()
        return JSONResponse(body, status_code=exc.status_code)

    # -- health ----------------------------------------------------------------------

    @app.get("/health")
    def health() -> dict[str, Any]:
        _, used = registry.usage_window()
        return {
            "status": "ok",
            "token_label": label,
            "keys": registry.loan_count(),
            "daily_limit_sats": daily_limit_sats,
            "used_last_24h_sats": used,
        }

    # -- keys ------------------------------------------------------------------------

    @app.post("/keys")
    def generate_key(body: KeyRequest) -> dict[str, Any]:
        network = check_network(body.network)
        miner = validate_address(body.miner_return_address, network, field="miner_return_address")
        bank = validate_address(
            body.bank_liquidation_address, network, field="bank_liquidation_address"
        )
        if miner == bank:
            raise InvalidInput(
                "the miner's return address and the bank's liquidation address must differ",
                field="bank_liquidation_address",
            )
        existing = registry.loan(body.loan_ref)
        if existing is not None:
            # A retry with the same terms gets the same key; other terms are refused
            # (record_loan raises) rather than re-pointing the loan.
            registry.record_loan(
                loan_ref=body.loan_ref,
                network=network,
                key_ref=existing.key_ref,
                public_key=existing.public_key,
                miner_return_address=miner,
                bank_liquidation_address=bank,
            )
            return _key_body(signer.key_info(existing.key_ref))
        info = signer.generate_loan_key(body.loan_ref)
        registry.record_loan(
            loan_ref=body.loan_ref,
            network=network,
            key_ref=info.key_ref,
            public_key=info.public_key,
            miner_return_address=miner,
            bank_liquidation_address=bank,
        )
        log.info("generated key %s for loan %s on %s", info.key_ref, body.loan_ref, network)
        return _key_body(info)

    # -- descriptor ------------------------------------------------------------------

    @app.post("/loans/{loan_ref}/descriptor")
    def register_descriptor(loan_ref: str, body: DescriptorRequest) -> dict[str, Any]:
        loan = _loan(loan_ref)
        text = body.descriptor.strip()
        if "#" not in text:
            raise InvalidInput("the descriptor must carry its checksum", field="descriptor")
        parsed = parse_collateral_descriptor(text, check_network(loan.network))
        bank = parsed.keys[_BANK_SEAT]
        if not isinstance(bank, FixedKey) or bank.public_key != loan.public_key:
            raise InvalidInput(
                "the descriptor's bank key (second key) is not this loan's HSM key",
                field="descriptor",
            )
        others = [k for i, k in enumerate(parsed.keys) if i != _BANK_SEAT]
        if any(isinstance(k, FixedKey) and k.public_key == loan.public_key for k in others):
            raise InvalidInput("the loan's HSM key appears twice", field="descriptor")
        record = registry.record_descriptor(loan_ref, parsed.descriptor)
        log.info("registered the descriptor of loan %s", loan_ref)
        return {"loan_ref": loan_ref, "descriptor": record.descriptor}

    def _loan(loan_ref: str) -> LoanRecord:
        loan = registry.loan(loan_ref)
        if loan is None:
            raise SignerKeyNotFound(f"loan {loan_ref!r} has no key in this signer")
        return loan

    # -- sign ------------------------------------------------------------------------

    @app.post("/sign")
    def sign(body: SignRequest) -> Response:
        detail: dict[str, Any] = {
            "action": body.action.model_dump(mode="json"),
            "authorization": body.authorization.model_dump(mode="json"),
        }
        txid: str | None = None
        try:
            psbt, txid = _parse_psbt(body.psbt)
            loan = _loan(body.loan_ref)
            if loan.descriptor is None:
                raise PolicyViolation(
                    "descriptor_missing", "the loan's descriptor is not registered with the signer"
                )
            descriptor = parse_collateral_descriptor(
                loan.descriptor,
                check_network(loan.network),
            )
            collateral = _collateral_from_psbt(psbt, descriptor)
            ctx = LoanContext(
                network=check_network(loan.network),
                descriptor=loan.descriptor,
                bank_key_ref=loan.key_ref,
                collateral=collateral,
                miner_return_address=loan.miner_return_address,
                bank_liquidation_address=loan.bank_liquidation_address,
            )
            a = body.action
            approved = ApprovedAction(
                action=a.action,
                debt_kopecks=a.debt_kopecks,
                price_rub_per_btc=a.price_rub_per_btc,
                target_ltv_bps=a.target_ltv_bps,
                change_address_index=a.change_address_index,
                change_address_change=a.change_address_change,
                max_fee_sats=max_fee_sats,
                max_fee_rate_sat_vb=max_fee_rate_sat_vb,
            )
            report = check_psbt(body.psbt, ctx, approved)
            auth = body.authorization
            detail["authorized"] = check_authorization(
                body.psbt,
                Authorization(
                    requested_by=auth.requested_by,
                    requester_role=auth.requester_role,
                    approvals=tuple(
                        Approval(a.principal, a.role, a.unsigned_txid) for a in auth.approvals
                    ),
                    risk_evidence=auth.risk_evidence,
                ),
            )
            with sign_lock:
                now = datetime.now(UTC)
                used = registry.signed_since(now - _WINDOW, excluding_txid=txid)
                amount = report.total_in_sats
                if used + amount > daily_limit_sats:
                    raise PolicyViolation(
                        "velocity",
                        f"signing {amount} sats would bring the last 24 hours to "
                        f"{used + amount} sats, above the signer's daily limit of "
                        f"{daily_limit_sats} sats",
                    )
                signed = sign_psbt_with_report(signer, body.psbt, ctx, approved)
                registry.record_usage(body.loan_ref, txid, amount, now)
        except PolicyViolation as refusal:
            registry.log_decision(
                loan_ref=body.loan_ref,
                txid=txid,
                decision="refused",
                check=refusal.check,
                reason=refusal.reason,
                detail=detail,
            )
            log.info("refused %s for loan %s: %s", txid, body.loan_ref, refusal.check)
            raise
        except (SignerRefused, RegistryConflict) as refusal:
            registry.log_decision(
                loan_ref=body.loan_ref,
                txid=txid,
                decision="refused",
                check=refusal.code,
                reason=refusal.message,
                detail=detail,
            )
            raise
        report_body = asdict(signed.report)
        registry.log_decision(
            loan_ref=body.loan_ref,
            txid=txid,
            decision="signed",
            check=None,
            reason=f"{signed.signatures} input(s) signed",
            detail={**detail, "fee_sats": report_body["fee_sats"]},
        )
        log.info("signed %s for loan %s", txid, body.loan_ref)
        return JSONResponse(
            {
                "psbt": signed.psbt,
                "txid": txid,
                "signatures": signed.signatures,
                "report": report_body,
            }
        )

    return app
