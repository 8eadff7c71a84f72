"""The bank's signer: one piece of code that decides, whichever transport carries the call.

It trusts nothing the caller says. What it decides from:
- its own registry (`hsm.registry`): each loan's descriptor, terms and payout addresses,
  written when the bank key is made from a statement two enrolled bank people signed;
  repayments recorded the same way; the partial liquidations it signed;
- people enrolled in it (`hsm.approvals`): approvals are signatures over statements the
  signer issued itself, one per request, with an expiry, used once;
- its own node connection (`hsm.node`): a loan's collateral is what the node shows
  paying the loan's scripts, confirmed as the terms require;
- its own price (`hsm.prices`): HTTP sources it fetches and desk quotes two people signed,
  with median, staleness and disagreement rules by its own clock.

An automatic liquidation is signed only when the signer's own valuation says the loan
must be liquidated; a release always needs two people. Every call is answered with a
result or a typed refusal (`PolicyViolation`: a stable `check` and a reason), and every
decision goes to the signer's decision log. Nothing a caller sends can make it answer 500.

`handle(op, body)` is the only entry point: `hsm serve` calls it with the HTTP body, and
the in-process transport with the same JSON bytes, so the two refuse the same things.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Protocol

from embit.psbt import PSBT
from pydantic import BaseModel, ValidationError

from hsm.approvals import (
    APPROVER,
    OPERATOR,
    Assertion,
    Endorsement,
    People,
    exact_keys,
    parse_time,
)
from hsm.messages import (
    CancelBody,
    LoanRefBody,
    PrepareBody,
    ProofBody,
    SignBody,
    StatementBody,
)
from hsm.metrics import SignerMetrics
from hsm.policy import (
    ApprovedAction,
    CheckedPsbt,
    LoanContext,
    evaluate_proof_of_reserves,
    evaluate_psbt,
)
from hsm.prices import DeskQuoteBook, PriceFix, PriceOracle, QuoteSource
from hsm.psbt_signing import sign_checked_psbt
from hsm.registry import BankAccountTaken, LoanRecord, LoanTerms, Registry, ts
from hsm.seed import BankSeed, account_key_ref
from hsm.signer import (
    PolicyViolation,
    SignerBusy,
    SignerError,
    SignerKeyExists,
    SignerRefused,
    SignerUnavailable,
)
from pledge.addresses import validate_address
from pledge.amounts import kopecks_for_sats, ltv_bps
from pledge.debt import outstanding_debt_kopecks
from pledge.descriptors import CollateralDescriptor, parse_collateral_descriptor
from pledge.errors import CustodyError, UpstreamUnavailable
from pledge.keys import FixedKey, HDKey, parse_fixed_key, parse_hd_key
from pledge.network import NetworkName, check_network
from pledge.statements import iso, transaction_statement

__all__ = ["Coin", "HsmBackend", "NodeView", "PriceView", "SignerCore"]

log = logging.getLogger("hsm.core")

_WINDOW: Final = timedelta(hours=24)
_ACCOUNT_TRIES: Final = 8
# Loans whose last confirmed-coin scan `confirmed_coins` keeps (a liquidation storm's
# valuation and signature of one loan are one scan, not two).
_COINS_SEEN: Final = 4096
MAX_PRINCIPAL_KOPECKS: Final = 10**15
BANK_KEY_KINDS: Final = ("hd", "fixed")
REGISTER_KEYS: Final = {
    "kind",
    "bank_key",
    "network",
    "loan_ref",
    "miner_key",
    "arbiter_key",
    "terms",
    "miner_return_address",
    "bank_liquidation_address",
    "expires_at",
}
AMEND_KEYS: Final = {
    "kind",
    "network",
    "loan_ref",
    "terms",
    "miner_return_address",
    "bank_liquidation_address",
    "expires_at",
}
REPAYMENT_KEYS: Final = {
    "kind",
    "network",
    "loan_ref",
    "repayment_id",
    "amount_kopecks",
    "paid_at",
    "expires_at",
}
TERMS_KEYS: Final = {
    "principal_kopecks",
    "interest_rate_bps",
    "start_at",
    "maturity_at",
    "margin_call_ltv_bps",
    "liquidation_ltv_bps",
    "cure_window_hours",
    "required_confirmations",
    "target_ltv_bps",
}


# --------------------------------------------------------------------------- collaborators


class HsmBackend(Protocol):
    """What the core needs from the token (hsm.pkcs11_backend.Pkcs11Signer has it)."""

    @property
    def name(self) -> str: ...

    c_sign_calls: int

    def generate_loan_key(self, loan_ref: str) -> Any: ...
    def key_info(self, key_ref: str) -> Any: ...
    def public_key(self, key_ref: str) -> bytes: ...
    def sign_digest(self, key_ref: str, digest: bytes) -> bytes: ...


class UnspentView(Protocol):
    txid: str
    vout: int
    amount_sats: int
    script_pubkey: bytes
    confirmations: int


class NodeView(Protocol):
    """The signer's read-only node (hsm.node.NodeReader)."""

    def tip_height(self) -> int: ...
    def tx_out(self, txid: str, vout: int) -> Any: ...
    def tx_outs(self, outpoints: Sequence[tuple[str, int]]) -> list[Any]: ...
    def tx_outs_at_tip(
        self, outpoints: Sequence[tuple[str, int]]
    ) -> tuple[list[Any], str | None]: ...
    def unspent_for_scripts(self, scripts: Sequence[bytes], *, network: NetworkName) -> Any: ...
    def unspent_at_tip(
        self, scripts: Sequence[bytes], *, network: NetworkName
    ) -> tuple[list[Any], str | None]: ...
    def transaction_confirmations(self, txid: str) -> int | None: ...


class PriceView(Protocol):
    """The signer's price oracle (hsm.prices.PriceOracle)."""

    def fix(self) -> PriceFix: ...


@dataclass(frozen=True, slots=True)
class Coin:
    """One output of a loan's descriptor that the signer's node shows unspent."""

    txid: str
    vout: int
    amount_sats: int
    index: int
    change: bool
    confirmations: int

    def to_json(self) -> dict[str, Any]:
        return {
            "txid": self.txid,
            "vout": self.vout,
            "amount_sats": self.amount_sats,
            "index": self.index,
            "change": self.change,
            "confirmations": self.confirmations,
        }


def now_utc() -> datetime:
    return datetime.now(UTC)


def _int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PolicyViolation(
            "statement_format", f"{field} must be an integer in [{low}, {high}]", field=field
        )
    return value


def _str(value: Any, field: str, max_len: int = 200) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len or "\x00" in value:
        raise PolicyViolation("statement_format", f"{field} must be a short string", field=field)
    return value


def _terms(body: Any) -> LoanTerms:
    if not isinstance(body, Mapping):
        raise PolicyViolation("statement_format", "terms must be an object", field="terms")
    exact_keys(body, set(TERMS_KEYS))
    terms = LoanTerms(
        principal_kopecks=_int(
            body["principal_kopecks"], "principal_kopecks", 1, MAX_PRINCIPAL_KOPECKS
        ),
        interest_rate_bps=_int(body["interest_rate_bps"], "interest_rate_bps", 0, 100_000),
        start_at=parse_time(body["start_at"], "start_at"),
        maturity_at=parse_time(body["maturity_at"], "maturity_at"),
        margin_call_ltv_bps=_int(body["margin_call_ltv_bps"], "margin_call_ltv_bps", 1, 100_000),
        liquidation_ltv_bps=_int(body["liquidation_ltv_bps"], "liquidation_ltv_bps", 1, 100_000),
        cure_window_hours=_int(body["cure_window_hours"], "cure_window_hours", 0, 24 * 366),
        required_confirmations=_int(
            body["required_confirmations"], "required_confirmations", 1, 1000
        ),
        target_ltv_bps=_int(body["target_ltv_bps"], "target_ltv_bps", 1, 100_000),
    )
    if not terms.target_ltv_bps < terms.margin_call_ltv_bps < terms.liquidation_ltv_bps:
        raise PolicyViolation(
            "terms", "the LTVs must rise: target < margin call < liquidation", field="terms"
        )
    if terms.maturity_at <= terms.start_at:
        raise PolicyViolation("terms", "maturity must be after the start", field="terms")
    return terms


def terms_statement(terms: LoanTerms) -> dict[str, Any]:
    """Terms as a statement carries them (ISO times with `Z`)."""
    return {
        "principal_kopecks": terms.principal_kopecks,
        "interest_rate_bps": terms.interest_rate_bps,
        "start_at": iso(terms.start_at),
        "maturity_at": iso(terms.maturity_at),
        "margin_call_ltv_bps": terms.margin_call_ltv_bps,
        "liquidation_ltv_bps": terms.liquidation_ltv_bps,
        "cure_window_hours": terms.cure_window_hours,
        "required_confirmations": terms.required_confirmations,
        "target_ltv_bps": terms.target_ltv_bps,
    }


class SignerCore:
    """The signer's decisions. Thread-safe: signing is serialised (velocity and the
    one-use statements must not interleave), reads are not."""

    def __init__(
        self,
        *,
        network: NetworkName,
        hsm: HsmBackend,
        registry: Registry,
        node: NodeView,
        price_sources: Sequence[QuoteSource],
        seed: BankSeed | None = None,
        price_max_age: timedelta,
        price_max_spread_bps: int,
        price_min_sources: int,
        desk_max_age: timedelta,
        daily_limit_sats: int,
        max_fee_sats: int,
        max_fee_rate_sat_vb: Decimal,
        approval_ttl: timedelta,
        valuation_max_age: timedelta,
        address_gap: int,
        cure_watch_gap: timedelta = timedelta(minutes=15),
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        self.network = check_network(network)
        self.hsm = hsm
        self.registry = registry
        # The HD bank key: the seed sealed by this token's AES key (a token that cannot
        # seal, as in some unit tests, holds fixed keys only).
        if seed is None and hasattr(hsm, "seal"):
            seed = BankSeed(hsm, registry, self.network)  # type: ignore[arg-type]
        self.seed = seed
        self.metrics = SignerMetrics(
            c_sign=lambda: int(self.hsm.c_sign_calls),
            seed=lambda: self.seed.signatures if self.seed is not None else 0,
        )
        self._register_lock = threading.Lock()
        self.people = People(registry)
        self.node = node
        self.desk = DeskQuoteBook(self.verify_desk_quote, desk_max_age)
        self.prices: PriceView = PriceOracle(
            price_sources,
            self.desk,
            max_age=price_max_age,
            max_spread_bps=price_max_spread_bps,
            min_sources=price_min_sources,
            clock=lambda: self.clock(),  # one clock for the whole signer, however it is set
        )
        self.daily_limit_sats = daily_limit_sats
        self.max_fee_sats = max_fee_sats
        self.max_fee_rate_sat_vb = max_fee_rate_sat_vb
        self.approval_ttl = approval_ttl
        self.valuation_max_age = valuation_max_age
        self.address_gap = address_gap
        self.cure_watch_gap = cure_watch_gap
        self.clock = clock
        self._sign_lock = threading.Lock()
        # confirmed_coins: (loan, descriptor, highest index, gap) -> ((tip, need), coins).
        self._coins_seen: OrderedDict[
            tuple[str, str, int, int], tuple[tuple[str, int], tuple[Coin, ...]]
        ] = OrderedDict()
        self._coins_lock = threading.Lock()
        self._ops: dict[str, tuple[type[BaseModel], Callable[[Any], dict[str, Any]]]] = {
            "health": (_Empty, lambda _: self.health()),
            "enroll": (StatementBody, self._enroll),
            "remove": (StatementBody, self._remove),
            "register_loan": (StatementBody, self._register_loan),
            "amend_loan": (StatementBody, self._amend_loan),
            "repayment": (StatementBody, self._repayment),
            "desk_quote": (StatementBody, self._desk_quote),
            "loan": (LoanRefBody, self._loan_body),
            "valuation": (LoanRefBody, self._valuation),
            "prepare": (PrepareBody, self._prepare),
            "cancel": (CancelBody, self._cancel),
            "sign": (SignBody, self._sign),
            "sign_proof": (ProofBody, self._sign_proof),
        }

    @property
    def operations(self) -> tuple[str, ...]:
        return tuple(self._ops)

    def close(self) -> None:
        """Close the token session, the node client and the registry (idempotent)."""
        sources = tuple(getattr(self.prices, "sources", ()))
        for part in (self.hsm, self.node, self.registry, *sources):
            close = getattr(part, "close", None)
            if close is not None:
                close()

    # -- the entry point ------------------------------------------------------------------

    def handle(self, op: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """Run one operation on a JSON body; (HTTP status, JSON answer). Never raises."""
        loan_ref = "-"
        detail: dict[str, Any] = {"op": op[:40]}
        try:
            entry = self._ops.get(op)
            if entry is None:
                raise PolicyViolation("unknown_operation", f"the signer has no operation {op!r}")
            model, run = entry
            try:
                parsed = model.model_validate_json(body or b"{}")
            except ValidationError as exc:
                where = ", ".join(
                    ".".join(str(p) for p in e.get("loc", ())) or "body"
                    for e in exc.errors(include_url=False)[:5]
                )
                raise PolicyViolation(
                    "malformed_request", f"the request body is malformed ({where})", field=where
                ) from None
            loan_ref = _loan_ref_of(parsed)
            result = run(parsed)
            self.metrics.decided(op, "signed" if op == "sign" else "accepted")
            return 200, result
        except PolicyViolation as exc:
            return self._refused(loan_ref, exc, detail)
        except SignerRefused as exc:
            return self._refused(
                loan_ref, PolicyViolation(exc.check, exc.message, field=exc.field), detail
            )
        except (SignerUnavailable, SignerError) as exc:
            log.warning("signer.unavailable", extra={"op": op[:40], "reason": exc.message})
            self._log_refusal(
                loan_ref, PolicyViolation("unavailable", exc.message, field=None), detail
            )
            # busy / unavailable: retry later (503); anything else is the signer's own fault
            status = 503 if isinstance(exc, UpstreamUnavailable) else 500
            return status, {"error": exc.code, "message": exc.message}
        except CustodyError as exc:  # a kernel rule refused the input
            return self._refused(
                loan_ref, PolicyViolation("invalid_input", exc.message, field=exc.field), detail
            )
        except Exception:  # never a 500 with details: refuse, and keep the traceback here
            log.exception("signer.internal_error", extra={"op": op[:40]})
            return self._refused(
                loan_ref,
                PolicyViolation(
                    "internal_error", "the signer could not evaluate this request", field=None
                ),
                detail,
            )

    def _refused(
        self, loan_ref: str, refusal: PolicyViolation, detail: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        self._log_refusal(loan_ref, refusal, detail)
        status = 400 if refusal.check == "malformed_request" else 422
        return status, {
            "error": PolicyViolation.code,
            "check": refusal.check,
            "message": refusal.reason,
            "field": refusal.field,
        }

    def refuse_oversized(self, size: int, limit: int) -> tuple[int, dict[str, Any]]:
        """What both transports answer for a body above the limit (never parsed)."""
        refusal = PolicyViolation(
            "body_too_large", f"the request body ({size} bytes) is above {limit} bytes", field=None
        )
        self._log_refusal("-", refusal, {"bytes": size})
        return 413, {
            "error": PolicyViolation.code,
            "check": refusal.check,
            "message": refusal.reason,
            "field": None,
        }

    def _op_label(self, detail: dict[str, Any]) -> str:
        """The operation as a metric label: only the signer's own (a caller picks the path)."""
        op = detail.get("op")
        return op if isinstance(op, str) and op in self._ops else "unknown"

    def _log_refusal(self, loan_ref: str, refusal: PolicyViolation, detail: dict[str, Any]) -> None:
        op = self._op_label(detail)
        result = "unavailable" if refusal.check == "unavailable" else "refused"
        self.metrics.decided(op, result, refusal.check)
        log.info(
            "signer.decision",
            extra={
                "op": op,
                "loan": loan_ref,
                "decision": result,
                "check": refusal.check,
                "reason": refusal.reason,
            },
        )
        try:
            self.registry.log_decision(
                loan_ref=loan_ref,
                txid=detail.get("txid"),
                decision="refused",
                check=refusal.check,
                reason=refusal.reason,
                detail=detail,
            )
        except Exception:  # the answer is a refusal either way; the log failure is logged
            log.exception("signer.decision_log_failed")

    def _log(self, loan_ref: str, decision: str, reason: str, **detail: Any) -> None:
        log.info(
            "signer.decision",
            extra={
                "loan": loan_ref,
                "decision": decision,
                "reason": reason,
                "txid": detail.get("txid"),
            },
        )
        self.registry.log_decision(
            loan_ref=loan_ref,
            txid=detail.get("txid"),
            decision=decision,
            check=None,
            reason=reason,
            detail=detail,
        )

    # -- health -----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        _, used = self.registry.usage_window(self.clock())
        return {
            "status": "ok",
            "network": self.network,
            "signer": self.hsm.name,
            "loans": self.registry.loan_count(),
            "people": len(self.people.active()),
            "daily_limit_sats": self.daily_limit_sats,
            "used_last_24h_sats": used,
            "c_sign_calls": int(self.hsm.c_sign_calls),
            # every signature the bank key made: the token's (fixed keys) and the seed's
            "signatures": int(self.hsm.c_sign_calls)
            + (self.seed.signatures if self.seed is not None else 0),
            "seed_fingerprint": self.seed.fingerprint if self.seed is not None else None,
        }

    # -- people -----------------------------------------------------------------------------

    @staticmethod
    def _endorsements(body: StatementBody | SignBody) -> list[Endorsement]:
        return [
            Endorsement(
                a.person,
                a.signature or "",
                Assertion(
                    a.webauthn.credential_id,
                    a.webauthn.authenticator_data,
                    a.webauthn.client_data_json,
                    a.webauthn.signature,
                )
                if a.webauthn is not None
                else None,
            )
            for a in body.approvals
        ]

    def _enroll(self, body: StatementBody) -> dict[str, Any]:
        person = self.people.enroll(body.statement, self._endorsements(body), self.clock())
        self._log("-", "recorded", f"enrolled {person.name} as {person.role}")
        return {"name": person.name, "role": person.role, "algorithm": person.algorithm}

    def _remove(self, body: StatementBody) -> dict[str, Any]:
        person = self.people.remove(body.statement, self._endorsements(body), self.clock())
        self._log("-", "recorded", f"removed {person.name}")
        return {"name": person.name, "removed": True}

    # -- loans ------------------------------------------------------------------------------

    def _check_network(self, statement: Mapping[str, Any]) -> None:
        if statement.get("network") != self.network:
            raise PolicyViolation(
                "network",
                f"the statement is for {statement.get('network')!r}; this signer is on "
                f"{self.network}",
                field="network",
            )

    def _payouts(self, statement: Mapping[str, Any]) -> tuple[str, str]:
        miner = validate_address(
            _str(statement["miner_return_address"], "miner_return_address", 100),
            self.network,
            field="miner_return_address",
        )
        bank = validate_address(
            _str(statement["bank_liquidation_address"], "bank_liquidation_address", 100),
            self.network,
            field="bank_liquidation_address",
        )
        if miner == bank:
            raise PolicyViolation(
                "payout_addresses",
                "the miner's return address and the bank's liquidation address must differ",
                field="bank_liquidation_address",
            )
        return miner, bank

    def _register_loan(self, body: StatementBody) -> dict[str, Any]:
        """Record a loan from a statement an operator and an approver signed, make its
        bank key (an account of the bank seed, or a fixed key in the token, as the
        statement says) and build its descriptor here (never taken from the caller)."""
        st = body.statement
        # A statement written before the choice existed meant a fixed key.
        exact_keys(st, set(REGISTER_KEYS) if "bank_key" in st else REGISTER_KEYS - {"bank_key"})
        kind = st.get("bank_key", "fixed")
        if kind not in BANK_KEY_KINDS:
            raise PolicyViolation(
                "invalid_input",
                f"bank_key must be one of {', '.join(BANK_KEY_KINDS)}",
                field="bank_key",
            )
        if st["kind"] != "register_loan":
            raise PolicyViolation("statement_kind", "not a loan registration statement")
        self._check_network(st)
        loan_ref = _str(st["loan_ref"], "loan_ref", 64)
        from hsm.pkcs11_backend import key_ref_for_loan

        key_ref_for_loan(loan_ref)  # one rule for both kinds: a ref that is a token label
        terms = _terms(st["terms"])
        miner, bank = self._payouts(st)
        keys: list[HDKey] = []
        for seat in ("miner_key", "arbiter_key"):
            keys.append(parse_hd_key(_str(st[seat], seat, 300), self.network, field=seat))
        if keys[0].identity == keys[1].identity:
            # Checked before the token makes a key: a refused registration leaves none.
            raise PolicyViolation(
                "invalid_input",
                "the miner and arbiter keys are the same key: each party needs its own key",
                field="arbiter_key",
            )
        by = self.people.verify_quorum(
            st, self._endorsements(body), roles=(OPERATOR, APPROVER), now=self.clock()
        )
        if self.registry.loan(loan_ref) is not None:
            raise PolicyViolation(
                "loan_registered",
                f"loan {loan_ref!r} is already registered with the signer; "
                "a change needs an amendment signed by two people",
                field="loan_ref",
            )
        if kind == "hd":
            record, info = self._register_hd(loan_ref, keys, terms, miner, bank, by)
        else:
            record, info = self._register_fixed(loan_ref, keys, terms, miner, bank, by)
        try:  # what its first valuation scans, kept now; only a head start, so not fatal
            self._scan_scripts(record, 0, self.address_gap)
        except Exception as exc:  # the valuation derives them again, and says why it cannot
            log.warning(
                "signer.scan_scripts_not_kept",
                extra={"loan": loan_ref, "error": type(exc).__name__},
            )
        self._log(
            loan_ref,
            "recorded",
            f"loan registered by {', '.join(by)} ({kind} bank key)",
            descriptor=record.descriptor,
        )
        log.info("signer.loan_registered", extra={"loan": loan_ref, "by": list(by), "kind": kind})
        return {
            **self._loan_json(record),
            "local": bool(info.local),
            "never_extractable": bool(info.never_extractable),
            "always_sensitive": bool(info.always_sensitive),
        }

    def _register_fixed(
        self,
        loan_ref: str,
        keys: list[HDKey],
        terms: LoanTerms,
        miner: str,
        bank: str,
        by: tuple[str, ...],
    ) -> tuple[LoanRecord, Any]:
        """A secp256k1 key made in the token for this loan only; it never leaves it."""
        try:
            info = self.hsm.generate_loan_key(loan_ref)
        except SignerKeyExists:
            # A key made before a crash, never recorded: the statement is signed, so the
            # registration it authorises may now finish with that key.
            from hsm.pkcs11_backend import key_ref_for_loan

            info = self.hsm.key_info(key_ref_for_loan(loan_ref))
        bank_key = parse_fixed_key(info.public_key.hex(), field="bank_key")
        descriptor = CollateralDescriptor((keys[0], bank_key, keys[1]), self.network)
        loan = self._new_loan(
            loan_ref, info.key_ref, info.public_key, descriptor, terms, (miner, bank), by
        )
        return self.registry.record_loan(loan), info

    def _register_hd(
        self,
        loan_ref: str,
        keys: list[HDKey],
        terms: LoanTerms,
        miner: str,
        bank: str,
        by: tuple[str, ...],
    ) -> tuple[LoanRecord, Any]:
        """The loan's own hardened BIP-48 account of the bank seed; the signer picks the
        account number (the next unused), so no two loans share a bank key."""
        if self.seed is None:
            raise PolicyViolation(
                "seed_missing", "this signer's token cannot hold a bank seed", field="bank_key"
            )
        if self.seed.fingerprint is None:
            raise PolicyViolation(
                "seed_missing",
                "the signer has no bank seed yet: run `hsm seed init` (it makes the seed and "
                "its SLIP-39 backup shares) before making HD bank keys",
                field="bank_key",
            )
        if not self.registry.backups():
            raise PolicyViolation(
                "seed_not_backed_up",
                "the bank seed has no SLIP-39 backup on record: run `hsm seed init` (or "
                "`hsm seed backup`) before making HD bank keys, so losing the token cannot "
                "lose them",
                field="bank_key",
            )
        with self._register_lock:
            for _ in range(_ACCOUNT_TRIES):
                account = self.registry.next_bank_account()
                bank_key = self.seed.account_key(account)  # the token: no transaction open
                descriptor = CollateralDescriptor((keys[0], bank_key, keys[1]), self.network)
                loan = self._new_loan(
                    loan_ref,
                    account_key_ref(bank_key.fingerprint, self.network, account),
                    bank_key.public_key(0, 0),
                    descriptor,
                    terms,
                    (miner, bank),
                    by,
                    account=account,
                )
                try:
                    return self.registry.record_loan(loan), self.seed.key_evidence()
                except BankAccountTaken:
                    continue  # another signer process on this registry took it first
        raise SignerBusy("could not reserve a bank account for the loan; try again")

    def _new_loan(
        self,
        loan_ref: str,
        key_ref: str,
        public_key: bytes,
        descriptor: CollateralDescriptor,
        terms: LoanTerms,
        payouts: tuple[str, str],
        by: tuple[str, ...],
        *,
        account: int | None = None,
    ) -> LoanRecord:
        """A loan as registered now; `account`: the bank seed's account of an HD bank key."""
        return LoanRecord(
            loan_ref=loan_ref,
            network=self.network,
            key_ref=key_ref,
            public_key=public_key,
            descriptor=descriptor.descriptor,
            terms=terms,
            miner_return_address=payouts[0],
            bank_liquidation_address=payouts[1],
            registered_by=by,
            created_at=self.clock(),
            highest_index=0,
            call_seen_at=None,
            bank_key_kind="fixed" if account is None else "hd",
            bank_account=account,
        )

    def _amend_loan(self, body: StatementBody) -> dict[str, Any]:
        st = body.statement
        exact_keys(st, set(AMEND_KEYS))
        if st["kind"] != "amend_loan":
            raise PolicyViolation("statement_kind", "not a loan amendment statement")
        self._check_network(st)
        loan = self._known_loan(_str(st["loan_ref"], "loan_ref", 64))
        terms = _terms(st["terms"])
        miner, bank = self._payouts(st)
        by = self.people.verify_quorum(
            st, self._endorsements(body), roles=(OPERATOR, APPROVER), now=self.clock()
        )
        record = self.registry.amend_loan(
            loan.loan_ref,
            terms=terms,
            miner_return_address=miner,
            bank_liquidation_address=bank,
            statement=dict(st),
            by=by,
            at=self.clock(),
        )
        self._log(loan.loan_ref, "recorded", f"loan amended by {', '.join(by)}")
        return self._loan_json(record)

    def _repayment(self, body: StatementBody) -> dict[str, Any]:
        st = body.statement
        exact_keys(st, set(REPAYMENT_KEYS))
        if st["kind"] != "repayment":
            raise PolicyViolation("statement_kind", "not a repayment statement")
        self._check_network(st)
        loan = self._known_loan(_str(st["loan_ref"], "loan_ref", 64))
        repayment_id = _str(st["repayment_id"], "repayment_id", 64)
        amount = _int(st["amount_kopecks"], "amount_kopecks", 1, MAX_PRINCIPAL_KOPECKS)
        paid_at = parse_time(st["paid_at"], "paid_at")
        now = self.clock()
        if paid_at > now + timedelta(minutes=1):
            raise PolicyViolation("repayment_future", "a repayment cannot be dated in the future")
        by = self.people.verify_quorum(
            st, self._endorsements(body), roles=(OPERATOR, APPROVER), now=now
        )
        new = self.registry.add_repayment(loan.loan_ref, repayment_id, amount, paid_at, by)
        if new:
            self._log(
                loan.loan_ref,
                "recorded",
                f"repayment {repayment_id} of {amount} kopecks, by {', '.join(by)}",
            )
        return {
            "loan_ref": loan.loan_ref,
            "repayment_id": repayment_id,
            "recorded": new,
            "repaid_kopecks": self.registry.repaid_kopecks(loan.loan_ref, now),
        }

    def verify_desk_quote(
        self, statement: Mapping[str, Any], endorsements: Sequence[Any]
    ) -> tuple[str, ...]:
        """A desk quote counts only when a bank operator and a different approver signed it."""
        return self.people.verify_quorum(
            statement, endorsements, roles=(OPERATOR, APPROVER), now=self.clock()
        )

    def _desk_quote(self, body: StatementBody) -> dict[str, Any]:
        quote = self.desk.submit(body.statement, self._endorsements(body), self.clock())
        by = ", ".join(self.desk.approved_by)
        self._log("-", "recorded", f"desk quote {quote.price_rub_per_btc} RUB/BTC by {by}")
        return {
            "source": quote.source,
            "price_rub_per_btc": str(quote.price_rub_per_btc),
            "quoted_at": iso(quote.quoted_at),
        }

    def _known_loan(self, loan_ref: str) -> LoanRecord:
        loan = self.registry.loan(loan_ref)
        if loan is None:
            raise PolicyViolation(
                "unknown_loan",
                f"loan {loan_ref!r} is not registered with this signer",
                field="loan_ref",
            )
        return loan

    @staticmethod
    def _loan_json(loan: LoanRecord) -> dict[str, Any]:
        return {
            "loan_ref": loan.loan_ref,
            "network": loan.network,
            "key_ref": loan.key_ref,
            "public_key": loan.public_key.hex(),
            "bank_key_kind": loan.bank_key_kind,
            "bank_key": _bank_key_text(loan),
            "descriptor": loan.descriptor,
            "terms": terms_statement(loan.terms),
            "miner_return_address": loan.miner_return_address,
            "bank_liquidation_address": loan.bank_liquidation_address,
            "registered_by": list(loan.registered_by),
        }

    def _loan_body(self, body: LoanRefBody) -> dict[str, Any]:
        return self._loan_json(self._known_loan(body.loan_ref))

    # -- the chain, the debt, the valuation ---------------------------------------------------

    def _descriptor(self, loan: LoanRecord) -> CollateralDescriptor:
        return parse_collateral_descriptor(loan.descriptor, check_network(loan.network))

    def confirmed_coins(self, loan: LoanRecord, *, tip: str | None = None) -> list[Coin]:
        """The loan's coins with the confirmations its terms need, as of the node's tip.

        Read from the node, unless ``tip`` (a best block hash the node just gave) is the
        very tip an earlier full scan of this loan was consistent at: a confirmed output
        appears, gains confirmations or goes only with a new block (an output a mempool
        transaction spends still counts, see ``NodeReader.tx_out``), so that scan's answer
        is still the node's. Only this signer's own earlier reads are reused; with terms
        that count unconfirmed coins nothing is."""
        need = loan.terms.required_confirmations
        key = (loan.loan_ref, loan.descriptor, loan.highest_index, self.address_gap)
        if tip is not None and need >= 1:
            with self._coins_lock:
                seen = self._coins_seen.get(key)
            if seen is not None and seen[0] == (tip, need):
                return list(seen[1])
        coins, at, highest = self._scan_at_tip(loan)
        confirmed = [c for c in coins if c.confirmations >= need]
        if at is not None and need >= 1:
            # A scan from the highest index it found covers no more than this one did.
            with self._coins_lock:
                for k in {key, (*key[:2], highest, key[3])}:
                    self._coins_seen[k] = ((at, need), tuple(confirmed))
                    self._coins_seen.move_to_end(k)
                while len(self._coins_seen) > _COINS_SEEN:
                    self._coins_seen.popitem(last=False)
        return confirmed

    def _scan_at_tip(self, loan: LoanRecord) -> tuple[list[Coin], str | None, int]:
        """Every unspent output of the loan's descriptor the signer's node shows, scanning
        both branches from index 0 to the highest index seen in use plus the gap (and
        further while coins keep turning up near the end); the best block hash every read
        of it held at (None if the tip moved during the scan); the highest index in use."""
        highest = loan.highest_index
        scanned = -1
        found: dict[tuple[str, int], Coin] = {}
        tips: list[str | None] = []
        while True:
            limit = highest + self.address_gap
            scripts = {spk: at for at, spk in self._scan_scripts(loan, scanned + 1, limit).items()}
            utxos, tip = self.node.unspent_at_tip(list(scripts), network=self.network)
            tips.append(tip)
            for utxo in utxos:
                index, change = scripts[bytes(utxo.script_pubkey)]
                found[(utxo.txid, int(utxo.vout))] = Coin(
                    utxo.txid,
                    int(utxo.vout),
                    int(utxo.amount_sats),
                    index,
                    change,
                    int(utxo.confirmations),
                )
                highest = max(highest, index)
            scanned = limit
            if highest + self.address_gap <= limit:
                break
        if highest > loan.highest_index:
            self.registry.note_index(loan.loan_ref, highest)
        at = tips[0] if all(t is not None and t == tips[0] for t in tips) else None
        return sorted(found.values(), key=lambda c: (c.txid, c.vout)), at, highest

    def _scan_scripts(
        self, loan: LoanRecord, first: int, last: int
    ) -> dict[tuple[int, bool], bytes]:
        """The loan's output scripts at indices `first`..`last` of both branches, by (index,
        change): those kept in the registry, the rest derived (bdkpython and embit
        agreeing, `CollateralDescriptor.script_pubkey`) and kept. A fresh loan's descriptor
        parse and derivations were a third of a valuation; kept, a restarted signer pays
        them once per loan, at its registration."""
        kept = self.registry.scan_scripts(loan.descriptor, first, last)
        wanted = [(index, change) for index in range(first, last + 1) for change in (False, True)]
        missing = [at for at in wanted if at not in kept]
        if missing:
            descriptor = self._descriptor(loan)
            derived = {at: descriptor.script_pubkey(*at) for at in missing}
            self.registry.keep_scan_scripts(loan.descriptor, derived)
            kept.update(derived)
        return {at: kept[at] for at in wanted}

    def debt_kopecks(self, loan: LoanRecord, at: datetime) -> tuple[int, int, int]:
        """(debt, repaid, credited): the terms' principal and interest, less the
        repayments two people recorded and the partial liquidations this signer signed
        that its node shows confirmed."""
        repaid = self.registry.repaid_kopecks(loan.loan_ref, at)
        credited = 0
        for txid, kopecks in self.registry.credits(loan.loan_ref):
            confirmations = self.node.transaction_confirmations(txid)
            if confirmations is not None and confirmations >= 1:
                credited += kopecks
        t = loan.terms
        debt = outstanding_debt_kopecks(
            t.principal_kopecks, t.interest_rate_bps, t.start_at, at, repaid + credited
        )
        return debt, repaid, credited

    def valuate(self, loan: LoanRecord) -> dict[str, Any]:
        """The signer's own view of a loan now: price, debt, collateral, LTV and what its
        terms say must happen. Stored, so a later signature can cite it by id."""
        now = self.clock()
        fix = self.prices.fix()
        price: Decimal = fix.price_rub_per_btc
        coins = self.confirmed_coins(loan)
        collateral = sum(c.amount_sats for c in coins)
        debt, repaid, credited = self.debt_kopecks(loan, now)
        t = loan.terms
        reasons: list[str] = []
        ltv: int | None = ltv_bps(debt, collateral, price) if collateral > 0 else None
        call_seen = loan.call_seen_at
        last = loan.last_valued_at
        unwatched = call_seen is not None and (last is None or now - last > self.cure_watch_gap)
        if ltv is not None and ltv >= t.margin_call_ltv_bps:
            if unwatched and call_seen is not None:
                # The signer did not watch the loan through this window (nobody asked it):
                # the call may have been cured and come back meanwhile. It does not assume
                # the window ran: it starts again now (a hostile caller can delay this by
                # not asking, never hasten it).
                reasons.append(
                    f"the margin call seen at {iso(call_seen)} was not watched continuously "
                    "by the signer: its cure window starts again"
                )
                call_seen = now
            call_seen = call_seen or now
        else:
            call_seen = None
        self.registry.set_call_seen(loan.loan_ref, call_seen, valued_at=now)
        verdict = "ok"
        if ltv is not None and ltv >= t.margin_call_ltv_bps:
            verdict = "margin_call"
        if ltv is not None and ltv >= t.liquidation_ltv_bps:
            verdict = "liquidate"
            reasons.append(f"LTV {ltv} bps >= liquidation {t.liquidation_ltv_bps} bps")
        if debt > 0 and now >= t.maturity_at:
            verdict = "liquidate"
            reasons.append(f"maturity {iso(t.maturity_at)} passed with {debt} kopecks owed")
        if (
            call_seen is not None
            and now - call_seen >= timedelta(hours=t.cure_window_hours)
            and verdict == "margin_call"
        ):
            verdict = "liquidate"
            reasons.append(
                f"the cure window of {t.cure_window_hours} h the signer saw open at "
                f"{iso(call_seen)} has expired"
            )
        if collateral == 0:
            verdict = "ok"
            reasons = ["no confirmed collateral"]
        valuation_id = secrets.token_urlsafe(18)
        body = {
            "valuation_id": valuation_id,
            "loan_ref": loan.loan_ref,
            "at": iso(now),
            "price_rub_per_btc": str(price),
            "price": fix.to_json(),
            "debt_kopecks": debt,
            "repaid_kopecks": repaid,
            "credited_kopecks": credited,
            "collateral_sats": collateral,
            "coins": [c.to_json() for c in coins],
            "ltv_bps": ltv,
            "verdict": verdict,
            "reasons": reasons,
            "margin_call_seen_at": iso(call_seen) if call_seen else None,
        }
        self.registry.save_valuation(valuation_id, loan.loan_ref, now, body)
        return body

    def _valuation(self, body: LoanRefBody) -> dict[str, Any]:
        return self.valuate(self._known_loan(body.loan_ref))

    # -- checking a PSBT ----------------------------------------------------------------------

    def _stored_valuation(self, loan: LoanRecord, valuation_id: str | None) -> dict[str, Any]:
        if valuation_id is None:
            raise PolicyViolation(
                "valuation_missing",
                "a liquidation is priced from the signer's own valuation: ask for one first",
                field="valuation_id",
            )
        stored = self.registry.valuation(valuation_id)
        if stored is None or stored[0] != loan.loan_ref:
            raise PolicyViolation(
                "valuation_unknown",
                "the signer made no such valuation of this loan",
                field="valuation_id",
            )
        return stored[2]

    def _still_current(self, loan: LoanRecord, valuation: Mapping[str, Any]) -> None:
        """A valuation's debt is the signer's records at that moment: a repayment, a
        confirmed partial liquidation or an amendment recorded since makes it wrong."""
        _, repaid, credited = self.debt_kopecks(loan, self.clock())
        since = ts(parse_time(valuation["at"], "valuation.at"))
        amended = self.registry.read_one(
            "SELECT 1 FROM amendment WHERE loan_ref = ? AND at >= ?", (loan.loan_ref, since)
        )
        if (
            repaid != valuation["repaid_kopecks"]
            or credited != valuation["credited_kopecks"]
            or amended is not None
        ):
            raise PolicyViolation(
                "valuation_outdated",
                "the loan's repayments, credits or terms changed after the signer's "
                "valuation: its debt no longer stands, ask for a new one",
                field="valuation_id",
            )

    def check_transaction(
        self,
        loan: LoanRecord,
        psbt_b64: str,
        action: str,
        valuation: dict[str, Any] | None,
    ) -> CheckedPsbt:
        """Everything about the transaction, from the signer's own records and node."""
        try:
            psbt = PSBT.from_string(psbt_b64.strip())
        except Exception:
            raise PolicyViolation(
                "psbt_format", "the PSBT cannot be parsed", field="psbt"
            ) from None
        descriptor = self._descriptor(loan)
        need = loan.terms.required_confirmations
        loan_scripts: set[bytes] = set()
        outpoints = [(inp.txid.hex(), int(inp.vout)) for inp in psbt.inputs]
        outs, tip = self.node.tx_outs_at_tip(outpoints)
        for n, ((txid, vout), seen) in enumerate(zip(outpoints, outs, strict=True)):
            where = f"input {n} ({txid}:{vout})"
            if seen is None:
                raise PolicyViolation(
                    "input_unknown",
                    f"{where} is not an unspent output on the signer's node (never mined, or "
                    "already spent)",
                )
            if not loan_scripts:
                watched = loan.highest_index + self.address_gap
                loan_scripts = set(self._scan_scripts(loan, 0, watched).values())
            if bytes(seen.script_pubkey) not in loan_scripts:
                raise PolicyViolation(
                    "foreign_input", f"{where} does not pay a script of this loan's descriptor"
                )
            if int(seen.confirmations) < need:
                raise PolicyViolation(
                    "input_unconfirmed",
                    f"{where} has {seen.confirmations} confirmation(s); the loan's terms "
                    f"need {need}",
                )
        coins = self.confirmed_coins(loan, tip=tip)
        change_index = _change_index(psbt, descriptor) if action == "partial_liquidation" else None
        watched = loan.highest_index + self.address_gap
        if change_index is not None and change_index[0] > watched:
            # The signer scans a loan's addresses up to the highest in use plus the gap:
            # change sent further is collateral it cannot see (or a scan it cannot finish).
            raise PolicyViolation(
                "change_index",
                f"the partial liquidation's change goes to address index {change_index[0]}; "
                f"the signer watches this loan's addresses up to index {watched}",
            )
        debt: int | None = None
        price: Decimal | None = None
        if action != "release":
            assert valuation is not None
            self._still_current(loan, valuation)
            debt = int(valuation["debt_kopecks"])
            price = Decimal(valuation["price_rub_per_btc"])
            if debt <= 0:
                raise PolicyViolation(
                    "nothing_owed", "the signer's figures show no debt to collect"
                )
        ctx = LoanContext(
            network=check_network(loan.network),
            descriptor=loan.descriptor,
            bank_key_ref=loan.key_ref,
            collateral={(c.txid, c.vout): (c.amount_sats, c.index, c.change) for c in coins},
            miner_return_address=loan.miner_return_address,
            bank_liquidation_address=loan.bank_liquidation_address,
            tip_height=self.node.tip_height(),
        )
        approved = ApprovedAction(
            action=action,  # type: ignore[arg-type]
            debt_kopecks=debt,
            price_rub_per_btc=price,
            target_ltv_bps=loan.terms.target_ltv_bps if action == "partial_liquidation" else None,
            change_address_index=change_index[0] if change_index else None,
            change_address_change=change_index[1] if change_index else False,
            max_fee_sats=self.max_fee_sats,
            max_fee_rate_sat_vb=self.max_fee_rate_sat_vb,
        )
        return evaluate_psbt(psbt_b64, ctx, approved)

    def _statement_for(
        self, loan: LoanRecord, checked: CheckedPsbt, action: str, nonce: str, expires_at: datetime
    ) -> dict[str, Any]:
        from embit.script import Script

        from pledge.network import embit_network

        params = embit_network(check_network(loan.network))
        return transaction_statement(
            network=loan.network,
            loan_ref=loan.loan_ref,
            action=action,
            unsigned_txid=checked.tx.txid().hex(),
            inputs=checked.report.inputs,
            outputs=[
                (Script(o.script_pubkey.data).address(params), int(o.value))
                for o in checked.tx.vout
            ],
            fee_sats=checked.report.fee_sats,
            nonce=nonce,
            expires_at=expires_at,
        )

    # -- prepare, cancel, sign ----------------------------------------------------------------

    def _prepare(self, body: PrepareBody) -> dict[str, Any]:
        """Check the PSBT now and issue the one statement two bank people must sign."""
        loan = self._known_loan(body.loan_ref)
        valuation = (
            None if body.action == "release" else self._stored_valuation(loan, body.valuation_id)
        )
        if valuation is not None:
            self._fresh(valuation, self.valuation_max_age)
        checked = self.check_transaction(loan, body.psbt, body.action, valuation)
        now = self.clock()
        nonce = secrets.token_urlsafe(24)
        expires = (now + self.approval_ttl).replace(microsecond=0)
        statement = self._statement_for(loan, checked, body.action, nonce, expires)
        record = {"statement": statement, "valuation_id": body.valuation_id}
        self.registry.open_statement(
            nonce, loan.loan_ref, statement["unsigned_txid"], record, expires
        )
        self._log(
            loan.loan_ref,
            "recorded",
            f"statement issued for a {body.action}",
            txid=statement["unsigned_txid"],
            nonce=nonce,
        )
        return {"nonce": nonce, "statement": statement, "checks": list(checked.report.checks)}

    def _cancel(self, body: CancelBody) -> dict[str, Any]:
        record = self.registry.statement(body.nonce)
        if record is None:
            raise PolicyViolation(
                "approval_unknown_statement", "the signer issued no such statement"
            )
        closed = self.registry.close_statement(body.nonce, "cancelled")
        if closed:
            self._log(
                record.loan_ref,
                "recorded",
                "statement cancelled",
                txid=record.unsigned_txid,
                nonce=body.nonce,
            )
        current = self.registry.statement(body.nonce)
        return {"nonce": body.nonce, "state": current.state if current else "cancelled"}

    def _fresh(self, valuation: dict[str, Any], max_age: timedelta) -> None:
        at = parse_time(valuation["at"], "valuation.at")
        age = self.clock() - at
        if age > max_age:
            raise PolicyViolation(
                "valuation_stale",
                f"the signer's valuation is {int(age.total_seconds())} s old (at most "
                f"{int(max_age.total_seconds())} s): ask for a new one",
                field="valuation_id",
            )

    def _sign(self, body: SignBody) -> dict[str, Any]:
        loan = self._known_loan(body.loan_ref)
        try:
            txid = PSBT.from_string(body.psbt.strip()).tx.txid().hex()
        except Exception:
            raise PolicyViolation("psbt_format", "the PSBT cannot be parsed") from None
        detail: dict[str, Any] = {"txid": txid, "action": body.action, "automatic": body.automatic}
        with self._sign_lock:
            now = self.clock()
            who: str
            nonce: str | None = None
            if body.automatic:
                if body.action != "liquidation":
                    raise PolicyViolation(
                        "automatic_action",
                        f"a {body.action} is never signed without two people's approval; "
                        "only a full liquidation can be automatic",
                    )
                if body.nonce is not None or body.approvals:
                    raise PolicyViolation(
                        "automatic_action",
                        "an automatic liquidation carries no approvals: it is decided on "
                        "the signer's own valuation",
                    )
                valuation = self._stored_valuation(loan, body.valuation_id)
                self._fresh(valuation, self.valuation_max_age)
                if valuation["verdict"] != "liquidate":
                    raise PolicyViolation(
                        "not_liquidatable",
                        f"the signer's own valuation (LTV {valuation['ltv_bps']} bps, "
                        f"verdict {valuation['verdict']}) does not call for a liquidation",
                    )
                checked = self.check_transaction(loan, body.psbt, body.action, valuation)
                who = "the signer's valuation: " + "; ".join(valuation["reasons"])
            else:
                if body.valuation_id is not None:
                    raise PolicyViolation(
                        "approval_format",
                        "an approved request is priced by the valuation its statement was "
                        "issued on, not one the caller names",
                        field="valuation_id",
                    )
                if body.nonce is None:
                    raise PolicyViolation(
                        "approval_missing",
                        "the bank signs only on the approvals of a statement it issued",
                        field="nonce",
                    )
                nonce = body.nonce
                record = self.registry.statement(nonce)
                if record is None or record.loan_ref != loan.loan_ref:
                    raise PolicyViolation(
                        "approval_unknown_statement",
                        "the signer issued no such statement for this loan",
                        field="nonce",
                    )
                if record.state != "open":
                    raise PolicyViolation(
                        "approval_replayed" if record.state == "used" else "approval_cancelled",
                        f"the statement was {record.state}: its approvals cannot be used again",
                        field="nonce",
                    )
                if record.unsigned_txid != txid:
                    raise PolicyViolation(
                        "approval_other_txid",
                        f"the statement is for transaction {record.unsigned_txid}; this PSBT is "
                        f"{txid}: a changed PSBT needs a new statement",
                        field="psbt",
                    )
                statement = record.body["statement"]
                if statement["action"] != body.action:
                    raise PolicyViolation(
                        "approval_other_action",
                        f"the statement approves a {statement['action']}, not a {body.action}",
                    )
                by = self.people.verify_quorum(
                    statement, self._endorsements(body), roles=(OPERATOR, APPROVER), now=now
                )
                valuation = None
                if body.action != "release":
                    valuation = self._stored_valuation(loan, record.body.get("valuation_id"))
                checked = self.check_transaction(loan, body.psbt, body.action, valuation)
                again = self._statement_for(
                    loan, checked, body.action, nonce, parse_time(statement["expires_at"], "e")
                )
                if again != statement:
                    raise PolicyViolation(
                        "approval_mismatch", "the PSBT no longer matches the approved statement"
                    )
                who = f"requested by {by[0]}, approved by {by[1]}"
            amount = checked.report.total_in_sats
            used = self.registry.signed_since(now - _WINDOW, excluding_txid=txid)
            if used + amount > self.daily_limit_sats:
                raise PolicyViolation(
                    "velocity",
                    f"signing {amount} sats would bring the last 24 hours to {used + amount} "
                    f"sats, above the signer's daily limit of {self.daily_limit_sats} sats",
                )
            if checked.report.inputs:
                top = max(p[0] for p in checked.input_paths)
                self.registry.note_index(loan.loan_ref, top)
            holder = self.seed if loan.bank_key_kind == "hd" else self.hsm
            if holder is None:
                raise PolicyViolation("seed_missing", "this signer holds no bank seed")
            signed = sign_checked_psbt(holder, checked, loan.key_ref)
            self.registry.record_usage(loan.loan_ref, txid, amount, now)
            if nonce is not None:
                self.registry.close_statement(nonce, "used")
            if body.action == "partial_liquidation":
                assert valuation is not None and checked.report.expected_bank_sats is not None
                credit = kopecks_for_sats(
                    checked.report.expected_bank_sats, Decimal(valuation["price_rub_per_btc"])
                )
                self.registry.add_credit(loan.loan_ref, txid, credit, now)
                change = _change_index(checked.psbt, self._descriptor(loan))
                if change is not None:
                    self.registry.note_index(loan.loan_ref, change[0])
        self._log(
            loan.loan_ref, "signed", who, **detail, fee_sats=checked.report.fee_sats, sats=amount
        )
        log.info("signer.signed", extra={"loan": loan.loan_ref, "txid": txid})
        return {
            "psbt": signed.psbt,
            "txid": txid,
            "signatures": signed.signatures,
            "authorized": who,
            "report": {
                "checks": list(checked.report.checks),
                "fee_sats": checked.report.fee_sats,
                "total_in_sats": checked.report.total_in_sats,
                "expected_bank_sats": checked.report.expected_bank_sats,
            },
        }

    def _sign_proof(self, body: ProofBody) -> dict[str, Any]:
        """The bank's signature on a control proof (BIP-127) over the loan's confirmed
        coins on the signer's own node: `hsm.policy.evaluate_proof_of_reserves` decides."""
        loan = self._known_loan(body.loan_ref)
        with self._sign_lock:
            coins = self.confirmed_coins(loan)
            ctx = LoanContext(
                network=check_network(loan.network),
                descriptor=loan.descriptor,
                bank_key_ref=loan.key_ref,
                collateral={(c.txid, c.vout): (c.amount_sats, c.index, c.change) for c in coins},
                miner_return_address=loan.miner_return_address,
                bank_liquidation_address=loan.bank_liquidation_address,
                tip_height=self.node.tip_height(),
            )
            checked = evaluate_proof_of_reserves(body.psbt, ctx, body.challenge)
            holder = self.seed if loan.bank_key_kind == "hd" else self.hsm
            if holder is None:
                raise PolicyViolation("seed_missing", "this signer holds no bank seed")
            signed = sign_checked_psbt(holder, checked, loan.key_ref, first_input=1)
        txid = checked.tx.txid().hex()
        amount = checked.report.total_in_sats
        self._log(
            loan.loan_ref,
            "signed",
            f"proof of reserves for the challenge {body.challenge[:80]!r}",
            op="sign_proof",
            txid=txid,
            sats=amount,
        )
        return {
            "psbt": signed.psbt,
            "txid": txid,
            "signatures": signed.signatures,
            "report": {"checks": list(checked.report.checks), "total_in_sats": amount},
        }


class _Empty(BaseModel):
    model_config = {"extra": "forbid"}


def _loan_ref_of(parsed: BaseModel) -> str:
    ref = getattr(parsed, "loan_ref", None)
    if isinstance(ref, str):
        return ref
    statement = getattr(parsed, "statement", None)
    if isinstance(statement, dict) and isinstance(statement.get("loan_ref"), str):
        return str(statement["loan_ref"])[:64]
    return "-"


def _bank_key_text(loan: LoanRecord) -> str:
    """The loan's bank key as its descriptor has it: `[fp/48h/..]xpub` or the hex key."""
    bank = parse_collateral_descriptor(loan.descriptor, check_network(loan.network)).keys[1]
    return bank.key_expression if isinstance(bank, HDKey) else bank.public_key_hex


def _change_index(psbt: PSBT, descriptor: CollateralDescriptor) -> tuple[int, bool] | None:
    """(index, change) of the one output that pays back into the loan's descriptor, read
    from its BIP-32 derivations (the policy then checks the script really is that one)."""
    found: set[tuple[int, bool]] = set()
    for out in psbt.outputs:
        for pub, der in (out.bip32_derivations or {}).items():
            for key in descriptor.hd_keys:
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
    if not found:
        if all(isinstance(k, FixedKey) for k in descriptor.keys):
            return 0, False
        return None
    if len(found) != 1:
        raise PolicyViolation(
            "output_derivation", "the PSBT's outputs name more than one of the loan's addresses"
        )
    return found.pop()


def dumps(body: Any) -> bytes:
    """JSON bytes as both transports send them (Decimals as exact strings)."""
    return json.dumps(body, default=lambda v: str(v) if isinstance(v, Decimal) else v).encode()
