"""The risk engine: on every pass, every open loan's LTV at the current price, moved
along the ladder; a liquidation is built, signed by the bank's HSM under its policy
(with the price quote and LTV as evidence instead of human approvals), and left for
the arbiter's signature.

A pass does nothing automatic when the price is not trustworthy (stale, or sources
disagree): it says why, once, in the audit log and in its report."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

import structlog
from sqlalchemy.engine import Engine
from sqlmodel import Session

from custody.audit.service import record
from custody.auth.context import Context
from custody.db.models import (
    Loan,
    LoanState,
    Principal,
    RequestState,
    Role,
    SigningAction,
    SigningRequest,
    as_utc,
)
from custody.db.session import transaction
from custody.errors import SignerNotConfigured
from custody.loans import repository as loans_repository
from custody.loans.debt import outstanding_debt_kopecks
from custody.loans.service import change_state
from custody.notify.events import notify_loan
from custody.risk import metrics, repository
from custody.risk.ladder import LoanPosition, Move, evaluate
from custody.screening import service as screening
from custody.signing.approvals import record_automatic_signature
from custody.signing.broadcast import broadcast_ready
from custody.signing.building import RequestParams, create_request
from custody.signing.cancel import cancel_unsigned
from custody.signing.chain import Chain, FeePolicy, PrefetchedChain
from custody.signing.repository import confirmed_txids
from custody.signing.statements import bank_hsm_key, signer_loan_ref
from hsm.client import BankSigner, Signed
from hsm.signer import PolicyViolation
from pledge.errors import UpstreamUnavailable
from pledge.network import NetworkName

log = structlog.get_logger(__name__)
ACTOR = "risk_engine:auto"


class Quote(Protocol):
    price_rub_per_btc: Decimal
    source: str
    quoted_at: datetime


class ConsensusLike(Protocol):
    @property
    def quote(self) -> Any: ...
    @property
    def usable(self) -> bool: ...
    @property
    def reason(self) -> str | None: ...


class Prices(Protocol):
    def consensus(self) -> ConsensusLike: ...


Notify = Callable[[Session, Loan, str, dict[str, Any]], None]


@dataclass
class RiskReport:
    paused: str | None = None
    price: str | None = None
    loans: int = 0
    margin_calls: list[int] = field(default_factory=list)
    cured: list[int] = field(default_factory=list)
    liquidations: list[int] = field(default_factory=list)  # signing request ids
    errors: dict[int, str] = field(default_factory=dict)
    stopped: bool = False  # told to stop before every loan was seen


UNSIGNED_GRACE = timedelta(seconds=60)


@dataclass(frozen=True)
class _SignerWork:
    """What a loan's pass leaves for the bank's signer, done after its commit."""

    loan_ref: str | None  # None: the bank's key is an xpub, the signer is not involved
    liquidate: bool
    quote: Any
    evidence: dict[str, Any]


def _robot() -> Principal:
    return Principal(
        id=None, name="auto", role=Role.risk_engine, party_id=None, key_hash="-", key_prefix="-"
    )


class RiskEngine:
    def __init__(
        self,
        engine: Engine,
        *,
        network: NetworkName,
        prices: Prices,
        chain: Chain,
        signer: BankSigner | None,
        fees: FeePolicy,
        notify: Notify | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        unsigned_grace: timedelta = UNSIGNED_GRACE,
        screener: screening.Screener | None = None,
        concurrency: int = 1,
    ) -> None:
        if concurrency < 1:
            raise ValueError("a risk pass works on at least one loan at a time")
        self.engine, self.network, self.prices = engine, network, prices
        self.concurrency = concurrency
        self.screener = screener or screening.Screener(screening.ScreeningConfig(network=network))
        self.unsigned_grace = unsigned_grace
        self.chain, self.signer, self.fees = chain, signer, fees
        self.notify, self.clock = notify, clock
        # The pause as last recorded (read at the first pass: an engine restarted while
        # paused records its resumption, so the audit log and the API's
        # `custody_risk_paused` never stay paused after the price is back).
        self._paused: str | None = None
        self._pause_read = False

    def run_once(
        self,
        stop: threading.Event | None = None,
        progress: Callable[[], None] | None = None,
    ) -> RiskReport:
        """One pass over every open loan (`_pass`), counted and timed (`risk.metrics`).
        `stop` is looked at between loans: a pass told to stop leaves the rest for the next
        start (each loan's work is its own transactions and signer call, so nothing is half
        done); `progress` is called between loans too (a long pass's heartbeat)."""
        started = time.perf_counter()
        report = self._pass(stop, progress)
        took = time.perf_counter() - started
        metrics.PASSES.inc()
        metrics.PASS_SECONDS.observe(took)
        metrics.LAST_PASS_SECONDS.set(took)
        metrics.LAST_PASS.set_to_current_time()
        metrics.PAUSED.set(int(report.paused is not None))
        metrics.LOANS.set(report.loans)
        metrics.LIQUIDATIONS.inc(len(report.liquidations))
        metrics.MARGIN_CALLS.inc(len(report.margin_calls))
        metrics.LOAN_ERRORS.inc(len(report.errors))
        return report

    def _pass(
        self, stop: threading.Event | None, progress: Callable[[], None] | None
    ) -> RiskReport:
        if not self._pause_read:
            with transaction(self.engine, write=False) as session:
                last = repository.last_pause_change(session)
                if last is not None and last.action == "risk.paused":
                    self._paused = last.reason or "paused"
            self._pause_read = True
        report = RiskReport()
        now = self.clock()
        consensus = self.prices.consensus()
        if not consensus.usable or consensus.quote is None:
            reason = consensus.reason or "no usable price"
            report.paused = reason
            if reason != self._paused:  # say it once per change, not every pass
                with transaction(self.engine) as session:
                    record(
                        session, actor=ACTOR, action="risk.paused", decision="paused", reason=reason
                    )
                log.warning("risk.paused", reason=reason)
            self._paused = reason
            return report
        if self._paused is not None:
            with transaction(self.engine) as session:
                record(session, actor=ACTOR, action="risk.resumed", reason="price usable again")
            self._paused = None
        quote = consensus.quote
        report.price = f"{quote.price_rub_per_btc} ({quote.source})"
        self._reconcile_unsigned(now)  # first: a rebuilt loan is open again for this pass
        with transaction(self.engine, write=False) as session:
            loan_ids = repository.loan_ids_in_states(
                session, [LoanState.active, LoanState.margin_call]
            )
        report.loans = len(loan_ids)
        # Up to `concurrency` loans at once, each in a part of the report of its own; the
        # parts are put together in the loans' order, whichever finished first.
        if self.concurrency == 1:  # in this thread, as a profiler or a debugger expects
            for loan_id in loan_ids:
                assert loan_id is not None
                if progress is not None:
                    progress()
                if stop is not None and stop.is_set():
                    report.stopped = True
                    break
                self._loan(loan_id, quote, now, report)
            return report
        parts: list[RiskReport] = []
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="risk-loan") as pool:
            running: set[Future[None]] = set()
            for loan_id in loan_ids:
                assert loan_id is not None
                if len(running) >= self.concurrency:
                    running = wait(running, return_when=FIRST_COMPLETED).not_done
                if progress is not None:
                    progress()
                if stop is not None and stop.is_set():
                    report.stopped = True
                    break
                parts.append(RiskReport())
                run = contextvars.copy_context().run  # the pass's log context, per loan
                running.add(pool.submit(run, self._loan, loan_id, quote, now, parts[-1]))
        for part in parts:
            report.margin_calls += part.margin_calls
            report.cured += part.cured
            report.liquidations += part.liquidations
            report.errors.update(part.errors)
        return report

    def _loan(self, loan_id: int, quote: Quote, now: datetime, report: RiskReport) -> None:
        """One loan's work: its own transactions, the signer called between them."""
        try:
            with transaction(self.engine) as session:
                follow = self._one(session, loan_id, quote, now, report)
            # The bank's signer is called with no database transaction open.
            if follow is not None and follow.liquidate:
                request_id = (
                    self._liquidate_with_signer(loan_id, follow)
                    if follow.loan_ref is not None
                    else self._liquidate(loan_id, follow)
                )
                if request_id is not None:
                    report.liquidations.append(request_id)
            elif follow is not None and follow.loan_ref is not None:
                self._let_the_signer_watch(loan_id, follow.loan_ref)
        except Exception as exc:  # one loan's trouble must not stop the others
            report.errors[loan_id] = f"{type(exc).__name__}: {exc}"
            log.error("risk.loan_failed", loan_id=loan_id, error=str(exc))

    def _reconcile_unsigned(self, now: datetime) -> None:
        """An automatic liquidation the signer never signed (a crash, or the signer down
        between creating it and signing it) is cancelled, so this pass starts again from
        fresh figures instead of leaving the loan liquidating with nobody to sign."""

        cutoff = now - self.unsigned_grace
        with transaction(self.engine) as session:
            stale = repository.automatic_liquidations_awaiting_since(session, cutoff)
            ctx = Context(principal=_robot(), network=self.network)
            for req in stale:
                if (
                    "bank" in req.signed_seats.split(",")
                    or bank_hsm_key(session, req.loan_id) is None
                ):
                    continue
                cancel_unsigned(
                    session,
                    ctx,
                    req,
                    reason=("automatic liquidation never signed by the bank's signer: rebuilt"),
                )

    def _one(
        self, session: Session, loan_id: int, quote: Quote, now: datetime, report: RiskReport
    ) -> _SignerWork | None:
        """The engine's own view of one loan, in one transaction. What needs the bank's
        signer (a valuation, a liquidation it must price and sign) is returned, to be
        done after this transaction has committed."""

        loan = loans_repository.loan(session, loan_id)
        if loan is None or loan.state not in (LoanState.active, LoanState.margin_call):
            return None
        key = bank_hsm_key(session, loan_id)
        loan_ref = signer_loan_ref(key) if key is not None else None
        collateral = repository.confirmed_collateral_sats(session, loan_id)
        debt = outstanding_debt_kopecks(loan, now)
        maturity = as_utc(loan.maturity_at)
        position = LoanPosition(
            state=str(loan.state),
            debt_kopecks=debt,
            collateral_sats=collateral,
            margin_call_ltv_bps=loan.margin_call_ltv_bps,
            liquidation_ltv_bps=loan.liquidation_ltv_bps,
            cure_window=timedelta(hours=loan.cure_window_hours),
            maturity_at=maturity,
            margin_call_since=as_utc(loan.margin_call_at) if loan.margin_call_at else None,
        )
        decision = evaluate(position, quote.price_rub_per_btc, now)
        watch = decision.move != Move.liquidate and (
            loan.state == LoanState.margin_call or decision.move == Move.margin_call
        )
        evidence = {
            "price_rub_per_btc": str(quote.price_rub_per_btc),
            "price_source": quote.source,
            "quoted_at": as_utc(quote.quoted_at).isoformat(),
            "ltv_bps": decision.ltv_bps,
            "debt_kopecks": debt,
            "collateral_sats": collateral,
            "reason": decision.reason,
        }
        if decision.move == Move.margin_call:
            change_state(
                session, ACTOR, loan, LoanState.margin_call, reason=decision.reason, data=evidence
            )
            loan.margin_call_at = now
            report.margin_calls.append(loan_id)
            self._notify(session, loan, "loan.margin_call", evidence)
        elif decision.move == Move.cure:
            change_state(
                session, ACTOR, loan, LoanState.active, reason=decision.reason, data=evidence
            )
            loan.margin_call_at = None
            report.cured.append(loan_id)
        elif decision.move == Move.liquidate:  # built after this commit: it calls the node
            return _SignerWork(loan_ref, liquidate=True, quote=quote, evidence=evidence)
        if watch and loan_ref is not None:
            return _SignerWork(loan_ref, liquidate=False, quote=quote, evidence=evidence)
        return None

    def _let_the_signer_watch(self, loan_id: int, loan_ref: str) -> None:
        """A margin call's cure window counts for the bank's signer only while it keeps
        looking at the loan itself: ask it for a valuation on every pass of the window."""
        if self.signer is None:
            return
        try:
            self.signer.valuation(loan_ref)
        except (PolicyViolation, UpstreamUnavailable) as exc:
            log.warning("risk.valuation_failed", loan_id=loan_id, error=str(exc))

    def _prefetched(self, loan_id: int) -> PrefetchedChain:
        """The node's answers the request will need, asked with no transaction open."""
        with transaction(self.engine, write=False) as session:
            txids = confirmed_txids(session, loan_id)
        return PrefetchedChain(self.chain, txids, self.fees.conf_target)

    def _liquidate(self, loan_id: int, work: _SignerWork) -> int | None:
        """Start a liquidation the bank signs on its own device (an xpub bank key)."""
        ctx = Context(principal=_robot(), network=self.network)
        quote, evidence = work.quote, work.evidence
        params = RequestParams(
            action=SigningAction.liquidation,
            price_rub_per_btc=quote.price_rub_per_btc,
            price_source=quote.source,
            risk_evidence={**evidence, "ltv_bps": evidence["ltv_bps"] or 0},
        )
        # The addresses it pays, screened with no transaction open (a block refuses it).
        screening.screen_payouts(self.engine, ctx, loan_id, "liquidation", self.screener)
        prefetched = self._prefetched(loan_id)
        with transaction(self.engine) as session:
            loan = loans_repository.loan(session, loan_id)
            if loan is None or loan.state not in (LoanState.active, LoanState.margin_call):
                return None  # another pass or person moved it meanwhile
            req = create_request(session, ctx, loan_id, params, prefetched, self.fees)
            self._started(session, loan, req, evidence)
            self._notify(
                session,
                loan,
                "signature.needed",
                {"request_id": req.id, "seats": ["bank", "arbiter"], "action": "liquidation"},
            )
            assert req.id is not None
            return req.id

    def _started(
        self, session: Session, loan: Loan, req: SigningRequest, evidence: dict[str, Any]
    ) -> None:
        self._notify(
            session,
            loan,
            "liquidation.started",
            {**evidence, "request_id": req.id, "unsigned_txid": req.unsigned_txid},
        )

    def _liquidate_with_signer(self, loan_id: int, work: _SignerWork) -> int | None:
        """A liquidation of a loan whose bank key the signer holds: its own valuation
        decides and prices it (the engine's figures are only the hint), then it signs.
        Each call to the signer happens between two committed transactions."""
        if self.signer is None:
            raise SignerNotConfigured("no bank signer is configured: it decides liquidations")
        assert work.loan_ref is not None
        loan_ref, evidence = work.loan_ref, work.evidence
        try:
            valuation = self.signer.valuation(loan_ref)
        except PolicyViolation as refusal:  # e.g. its own price is stale: it will not say
            with transaction(self.engine) as session:
                record(
                    session,
                    actor=ACTOR,
                    action="signer.refused",
                    loan_id=loan_id,
                    decision="refused",
                    reason=refusal.reason,
                    data={"check": refusal.check, "engine": evidence, "step": "valuation"},
                )
            return None
        if valuation["verdict"] != "liquidate":
            with transaction(self.engine) as session:
                record(
                    session,
                    actor=ACTOR,
                    action="risk.signer_disagrees",
                    loan_id=loan_id,
                    decision="not_liquidated",
                    reason=(
                        f"the bank's signer sees LTV {valuation['ltv_bps']} bps at "
                        f"{valuation['price_rub_per_btc']} RUB/BTC: {valuation['verdict']}"
                    ),
                    data={"engine": evidence, "signer_valuation": valuation["valuation_id"]},
                )
            return None
        params = RequestParams(
            action=SigningAction.liquidation,
            price_rub_per_btc=Decimal(valuation["price_rub_per_btc"]),
            price_source="bank signer valuation " + str(valuation["valuation_id"]),
            risk_evidence={**evidence, "signer_reasons": valuation["reasons"]},
            debt_kopecks=int(valuation["debt_kopecks"]),
            valuation_id=str(valuation["valuation_id"]),
        )
        ctx = Context(principal=_robot(), network=self.network)
        # The addresses it pays, screened with no transaction open (a block refuses it).
        screening.screen_payouts(self.engine, ctx, loan_id, "liquidation", self.screener)
        prefetched = self._prefetched(loan_id)
        with transaction(self.engine) as session:
            loan = loans_repository.loan(session, loan_id)
            if loan is None or loan.state not in (LoanState.active, LoanState.margin_call):
                return None  # another pass or person moved it meanwhile
            req = create_request(session, ctx, loan_id, params, prefetched, self.fees)
            self._started(session, loan, req, evidence)
            request_id, psbt = req.id or 0, req.psbt
        outcome: Signed | PolicyViolation
        try:
            outcome = self.signer.sign(
                loan_ref,
                "liquidation",
                psbt,
                automatic=True,
                valuation_id=params.valuation_id,
            )
        except PolicyViolation as refusal:
            outcome = refusal
        # SignerUnavailable propagates: the request stays, and the next pass's reconcile
        # cancels it if it is still unsigned by then.
        with transaction(self.engine) as session:
            decision = record_automatic_signature(session, ctx, request_id, outcome)
            loan = loans_repository.loan(session, loan_id)
            assert loan is not None
            if decision.refused:
                log.error(
                    "risk.liquidation_refused",
                    loan_id=loan_id,
                    check=decision.check,
                    reason=decision.refused,
                )
                return None
            ready = decision.request.state == RequestState.ready
            self._notify(
                session,
                loan,
                "signature.needed",
                {
                    "request_id": request_id,
                    "seat": "arbiter",
                    "seats": ["arbiter"],
                    "action": "liquidation",
                },
            )
        if ready:  # the arbiter had signed first: broadcast with no transaction open
            broadcast_ready(self.engine, ACTOR, request_id, self.chain)
        return request_id

    def _notify(self, session: Session, loan: Loan, event: str, data: dict[str, Any]) -> None:
        if self.notify is not None:
            self.notify(session, loan, event, {"loan_id": loan.id, **data})
        elif event != "signature.needed":  # create_request already queued that one
            notify_loan(session, loan, event, data)
