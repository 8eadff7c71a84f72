"""Reconciling intents whose outcome is unknown.

Every call to the node or the bank's signer is made between two transactions: the intent
is committed, the call is made, the outcome is recorded in a new transaction. A crash (or
a lost answer) between the call and the record leaves the intent without its outcome:

- a signing request committed whose signer statement was never stored (a crash before
  or during `signer.prepare`): the signer is asked again; a refusal cancels the request
  as at creation. So is a request whose statement the signer used for a signature whose
  answer was lost (it refuses the statement as replayed): people sign a fresh one;
- a statement taken to the signer whose answer was never recorded, or recorded but never
  applied (`custody.signer.service.execute` commits `TAKEN_TO_SIGNER` first, then the
  answer in `result`): it is taken to the signer again, which makes that safe (a used
  statement is refused, a registration or a repayment is recorded once);
- a request left `ready` after its transaction may have reached the node: the node is
  asked whether it has the transaction (mempool or chain) and the broadcast recorded; if
  it has not, and had not refused it, it is broadcast again.

`Reconciler.run_once` is run by `custody watch` when it starts and then periodically, only
while it holds the database's watcher lease (one reconciler per database), and by
`custody reconcile`. Only intents older than `grace` are touched, so a call still in
flight in another process is not taken for a lost one. Each finding writes an audit
event (`reconcile.*`) saying what was found and what was done, and every write re-reads
and locks the row it changes: nothing here is written on a stale read.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog
from sqlalchemy.engine import Engine
from sqlmodel import Session

from custody.audit.service import record
from custody.auth.context import Context
from custody.chain.rpc import RpcNotFound
from custody.db.models import (
    KeyRole,
    Principal,
    RequestState,
    Role,
    SigningAction,
    SigningRequest,
    StatementState,
    utcnow,
)
from custody.db.session import transaction
from custody.signer import repository
from custody.signer import service as statements
from custody.signing.broadcast import broadcast_ready, record_broadcast
from custody.signing.building import refused_request
from custody.signing.repository import evidence, transaction_statement_of
from custody.signing.rules import REQUIRED_SEATS
from custody.signing.statements import (
    bank_hsm_key,
    open_transaction_statement,
    signer_loan_ref,
)
from hsm.client import BankSigner
from hsm.signer import PolicyViolation, SignerError
from pledge.errors import UpstreamUnavailable
from pledge.network import NetworkName

__all__ = ["ACTOR", "DEFAULT_GRACE", "ReconcileReport", "Reconciler"]

log = structlog.get_logger(__name__)

ACTOR = "system:reconcile"
# Longer than any call may take (the node's and the signer's HTTP timeouts are 30 s).
DEFAULT_GRACE = timedelta(seconds=120)
# The signer's answer to a statement it already used: after a lost answer, the signature
# was made but never reached the service.
_REPLAYED = "refused (approval_replayed)"


class Node(Protocol):
    """What reconciling needs from the node (NodeRpc satisfies it, as does Chain)."""

    def get_raw_transaction(self, txid: str, block_hash: str | None = None) -> bytes: ...
    def test_mempool_accept(
        self, tx_hex: str, max_fee_rate_btc_kvb: float = 0.1
    ) -> dict[str, Any]: ...
    def send_raw_transaction(self, tx_hex: str) -> str: ...
    def estimate_fee_rate_sat_vb(self, conf_target: int) -> float | None: ...


@dataclass(frozen=True)
class _SystemContext(Context):
    """The reconciler acts as itself in the audit log, with the automation's view."""

    @property
    def actor(self) -> str:
        return ACTOR


def _system_context(network: NetworkName) -> Context:
    principal = Principal(
        id=None,
        name="reconcile",
        role=Role.risk_engine,
        party_id=None,
        key_hash="-",
        key_prefix="-",
    )
    return _SystemContext(principal=principal, network=network)


@dataclass
class ReconcileReport:
    broadcast_found: list[int] = field(default_factory=list)  # ready requests the node had
    rebroadcast: list[int] = field(default_factory=list)  # ready requests sent again
    statements_retried: dict[int, str] = field(default_factory=dict)  # id -> state after
    statements_reissued: list[int] = field(default_factory=list)  # request ids
    cancelled: list[int] = field(default_factory=list)  # request ids the signer refused
    errors: list[str] = field(default_factory=list)

    @property
    def acted(self) -> bool:
        return bool(
            self.broadcast_found
            or self.rebroadcast
            or self.statements_retried
            or self.statements_reissued
            or self.cancelled
        )


@dataclass(frozen=True)
class _Unstated:
    """A request that needs the signer's statement and has none to sign."""

    request_id: int
    loan_id: int
    psbt: str
    action: SigningAction
    loan_ref: str
    valuation_id: str | None
    found: str


class Reconciler:
    def __init__(
        self,
        engine: Engine,
        *,
        network: NetworkName,
        chain: Node,
        signer: BankSigner | None,
        grace: timedelta = DEFAULT_GRACE,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine, self.network, self.chain, self.signer = engine, network, chain, signer
        self.grace, self.clock = grace, clock
        self.ctx = _system_context(network)

    def run_once(self) -> ReconcileReport:
        """One pass over every kind of unknown outcome. The signer's answers first (one
        applied may make a request ready, and `execute` broadcasts it), then requests
        without a statement, then ready requests."""
        report = ReconcileReport()
        cutoff = self.clock() - self.grace
        for name, part in (
            ("statements", self._statements),
            ("unstated requests", self._unstated),
            ("ready requests", self._ready),
        ):
            try:
                part(cutoff, report)
            except Exception as exc:  # the node or the signer may be away; next pass
                report.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                log.warning("reconcile.failed", part=name, error=str(exc))
        if report.acted:
            log.info("reconcile.done", **{k: v for k, v in report.__dict__.items() if v})
        return report

    def run(
        self, stop: threading.Event, every_seconds: float, *, only_while: threading.Event
    ) -> None:
        """Reconcile whenever `only_while` is set (the watcher holds the lease), at once and
        then every `every_seconds`, until `stop` is set."""
        while not stop.is_set():
            if only_while.is_set():
                self.run_once()
                if stop.wait(every_seconds):
                    return
            else:
                only_while.wait(min(every_seconds, 1.0))

    # -- the signer's answers ----------------------------------------------------------------

    def _statements(self, cutoff: datetime, report: ReconcileReport) -> None:
        if self.signer is None:
            return
        with transaction(self.engine, write=False) as session:  # reads only
            rows = repository.open_statements_with_outcome_unknown(
                session,
                cutoff,
                taken=statements.TAKEN_TO_SIGNER,
                unreachable=statements.UNREACHABLE,
            )
            found = {
                st.id or 0: (
                    "the signer's answer was stored but never applied"
                    if st.result is not None
                    else "taken to the signer, its answer never recorded"
                    if st.outcome == statements.TAKEN_TO_SIGNER
                    else "the signer could not be reached last time",
                    self._on_behalf_of(session, st.created_by),
                )
                for st in rows
            }
        for statement_id, (what, ctx) in sorted(found.items()):
            try:
                outcome = statements.execute(
                    self.engine, statement_id, self.signer, ctx, self.chain
                )
            except (UpstreamUnavailable, SignerError) as exc:
                outcome = {"state": "open", "reason": str(exc)}
            with transaction(self.engine) as session:
                st = repository.statement_by_id(session, statement_id)
                assert st is not None
                record(
                    session,
                    actor=ACTOR,
                    action="reconcile.signer_answer_unknown",
                    loan_id=st.loan_id,
                    request_id=st.request_id,
                    decision=str(outcome.get("state")),
                    reason=what,
                    data={
                        "statement_id": statement_id,
                        "kind": st.kind,
                        "state": str(st.state),
                        "check": outcome.get("check"),
                        "outcome": st.outcome,
                    },
                )
                report.statements_retried[statement_id] = str(st.state)

    def _on_behalf_of(self, session: Session, actor: str) -> Context:
        """Finishing a statement, the reconciler acts for whoever opened it (what it
        makes, a bank key, is theirs), under its own name in the audit log."""
        role, _, name = actor.partition(":")
        principal = repository.principal_named(session, role, name)
        if principal is None:
            return self.ctx
        session.expunge(principal)
        return _SystemContext(principal=principal, network=self.network)

    # -- requests with no statement to sign --------------------------------------------------

    def _unstated(self, cutoff: datetime, report: ReconcileReport) -> None:
        if self.signer is None:
            return
        with transaction(self.engine, write=False) as session:  # reads only
            rows = repository.requests_in_state_updated_before(
                session, RequestState.awaiting_signatures, cutoff
            )
            work = [w for w in (self._needs_statement(session, r) for r in rows) if w]
        for item in work:
            self._reissue(item, report)

    def _needs_statement(self, session: Session, req: SigningRequest) -> _Unstated | None:
        """The request's bank seat is the signer's and there is no statement to sign: none
        was stored, or the last was used for a signature whose answer was lost."""
        action = SigningAction(req.action)
        if (
            req.created_by.startswith("risk_engine:")  # the risk engine's own reconcile
            or KeyRole.bank not in REQUIRED_SEATS[action]
            or KeyRole.bank.value in req.signed_seats.split(",")
        ):
            return None
        key = bank_hsm_key(session, req.loan_id)
        if key is None:
            return None
        st = transaction_statement_of(session, req.id or 0)
        if st is None:
            found = "no signer statement was stored for the request"
        elif st.state == StatementState.refused and (st.outcome or "").startswith(_REPLAYED):
            found = "the signer used the statement, but its signature never reached the service"
        else:
            return None
        return _Unstated(
            request_id=req.id or 0,
            loan_id=req.loan_id,
            psbt=req.psbt,
            action=action,
            loan_ref=signer_loan_ref(key),
            valuation_id=evidence(req).get("valuation_id"),
            found=found,
        )

    def _reissue(self, item: _Unstated, report: ReconcileReport) -> None:
        """Ask the signer for a statement (no transaction open), then store it, or its
        refusal (the request is cancelled), if the request still needs one."""
        assert self.signer is not None
        prepared: dict[str, Any] | PolicyViolation
        try:
            prepared = self.signer.prepare(
                item.loan_ref, item.action.value, item.psbt, item.valuation_id
            )
        except PolicyViolation as refusal:
            prepared = refusal
        unused: str | None = None
        with transaction(self.engine) as session:
            req = repository.request_by_id(session, item.request_id, for_update=True)
            assert req is not None
            if (
                req.state != RequestState.awaiting_signatures
                or req.psbt != item.psbt
                or self._needs_statement(session, req) is None
            ):  # someone acted meanwhile: what we asked for is not needed
                if not isinstance(prepared, PolicyViolation):
                    unused = str(prepared["nonce"])
            elif isinstance(prepared, PolicyViolation):
                refused_request(session, self.ctx, req, prepared)
                self._audit_unstated(session, item, "cancelled", check=prepared.check)
                report.cancelled.append(item.request_id)
            else:
                st = open_transaction_statement(session, self.ctx, req, prepared)
                ev = evidence(req)
                ev["signer_statement_id"] = st.id
                req.evidence_json = json.dumps(ev, default=str)
                req.updated_at = utcnow()
                session.add(req)
                self._audit_unstated(session, item, "reissued", statement_id=st.id)
                report.statements_reissued.append(item.request_id)
        if unused is not None:  # kill the statement nobody will sign
            try:
                self.signer.cancel(unused)
            except (PolicyViolation, UpstreamUnavailable) as exc:
                log.info("reconcile.statement_left_to_expire", error=str(exc))

    def _audit_unstated(self, session: Session, item: _Unstated, done: str, **data: Any) -> None:
        record(
            session,
            actor=ACTOR,
            action="reconcile.statement_missing",
            loan_id=item.loan_id,
            request_id=item.request_id,
            decision=done,
            reason=item.found,
            data=data,
        )

    # -- ready requests ------------------------------------------------------------------

    def _ready(self, cutoff: datetime, report: ReconcileReport) -> None:
        with transaction(self.engine, write=False) as session:  # reads only
            rows = [
                (r.id or 0, r.unsigned_txid, r.psbt, r.reject_reason)
                for r in repository.requests_in_state_updated_before(
                    session, RequestState.ready, cutoff
                )
            ]
        for request_id, txid, psbt, rejected in rows:
            if self._node_has(txid):
                self._found_broadcast(request_id, txid, psbt, report)
            elif rejected is None:  # never refused by the node: the send was lost
                broadcast_ready(self.engine, ACTOR, request_id, self.chain)
                with transaction(self.engine) as session:
                    req = repository.request_by_id(session, request_id)
                    assert req is not None
                    record(
                        session,
                        actor=ACTOR,
                        action="reconcile.broadcast_unknown",
                        loan_id=req.loan_id,
                        request_id=request_id,
                        decision="sent" if req.state == RequestState.broadcast else "refused",
                        reason="ready, and the node did not have the transaction",
                        data={"txid": txid, "state": str(req.state), "node": req.reject_reason},
                    )
                report.rebroadcast.append(request_id)

    def _node_has(self, txid: str) -> bool:
        """Is the transaction in the node's mempool or chain (btcd and Core with -txindex)?"""
        try:
            self.chain.get_raw_transaction(txid)
        except RpcNotFound:
            return False
        return True

    def _found_broadcast(
        self, request_id: int, txid: str, psbt: str, report: ReconcileReport
    ) -> None:
        with transaction(self.engine) as session:
            req = repository.request_by_id(session, request_id, for_update=True)
            assert req is not None
            if req.state != RequestState.ready or req.psbt != psbt:
                return  # the watcher or a person recorded it meanwhile
            record_broadcast(session, ACTOR, req, {"allowed": True})
            record(
                session,
                actor=ACTOR,
                action="reconcile.broadcast_unknown",
                loan_id=req.loan_id,
                request_id=request_id,
                decision="found",
                reason="ready, but the node already has the transaction: it was sent",
                data={"txid": txid},
            )
        report.broadcast_found.append(request_id)
