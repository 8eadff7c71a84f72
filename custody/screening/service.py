"""Screening's rules: which providers run, what a deposit or payout address is judged,
how a decision is recorded (audited; a block alerts the bank), resolved by a compliance
officer, and what it does to collateral.

No transaction is open across a call to the node or a provider: the subject is persisted
`pending` first (the watcher inserts it with its deposit), the providers are asked, and the
outcome is recorded in a transaction of its own (`record_outcomes`, which skips a decision
that is no longer pending, so a replay records nothing twice). A crash in between leaves
the decision `pending`: the watcher's next step asks again. When nothing would be called
out (only the bank's lists, and none that needs the funding transaction's inputs from the
node) the deposit is decided before the transaction that inserts it commits, and inserted
decided (`insert_deposit_screenings`), so a crash leaves neither.

A deposit counts as collateral only when its decision is `clear` or `cleared`: until then
the watcher leaves it `pending` (never `confirmed`), so the loan does not activate on it
and nothing that sums confirmed collateral (the risk engine's LTV, the inputs of a release
or a liquidation) sees it. A decision that lets a deposit count is marked `settle_pending`;
the watcher then settles its loan (confirms the deposit, activates the loan) and clears it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Protocol

import structlog
from embit.script import Script
from embit.transaction import Transaction
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from sqlmodel import Session

from custody.audit.service import record
from custody.auth.context import Context
from custody.auth.policy import require_role
from custody.config import Settings
from custody.db.models import (
    Loan,
    Role,
    ScreeningDecision,
    ScreeningListEntry,
    ScreeningStatus,
    utcnow,
)
from custody.db.session import transaction
from custody.errors import (
    PayoutAddressBlocked,
    PayoutAddressUnderReview,
    ScreeningAlreadyResolved,
    ScreeningDecisionNotFound,
    ScreeningListEntryExists,
    ScreeningListEntryNotFound,
    ScreeningNotDecided,
)
from custody.loans import repository as loans_repository
from custody.notify.events import notify_loan
from custody.screening import repository
from custody.screening.builtin import BuiltinProvider, Lists
from custody.screening.http import HttpProvider
from custody.screening.providers import (
    AddressSubject,
    Decision,
    Input,
    Result,
    ScreeningProvider,
    TransactionSubject,
    worst,
)
from pledge.errors import InvalidInput
from pledge.network import NetworkName, embit_network

log = structlog.get_logger(__name__)

RESOLVERS = (Role.compliance_officer,)  # clear or confirm a block
READERS = (Role.compliance_officer, Role.auditor)  # the decisions and their export
LIST_EDITORS = (Role.compliance_officer, Role.admin)
LIST_READERS = (Role.compliance_officer, Role.admin, Role.auditor)
LIST_KINDS = ("address", "txid", "outpoint")
LIST_ACTIONS = ("block", "review")
PENDING_PER_STEP = 100  # deposit screenings the watcher decides per step


class RawTransactions(Protocol):
    """The node's one answer screening needs: a transaction by its id (btcd with
    --txindex, Core with -txindex)."""

    def get_raw_transaction(self, txid: str, block_hash: str | None = None) -> bytes: ...


@dataclass(frozen=True)
class ScreeningConfig:
    """Which providers run. The built-in one always does; the HTTP one when it has a URL.
    The worst result wins."""

    network: NetworkName = "regtest"
    http_url: str | None = None
    http_api_key: SecretStr = field(default_factory=lambda: SecretStr(""))
    http_timeout: float = 5.0
    review_inputs_over: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ScreeningConfig:
        return cls(
            network=settings.network,
            http_url=settings.screening_http_url,
            http_api_key=settings.screening_http_api_key,
            http_timeout=settings.screening_http_timeout_seconds,
            review_inputs_over=settings.screening_review_inputs_over,
        )


class Screener:
    """Asks the configured providers, with no transaction open."""

    def __init__(self, config: ScreeningConfig, node: RawTransactions | None = None) -> None:
        self.config = config
        self.node = node

    def lists(self, engine: Engine) -> Lists:
        """The bank's lists as of now (a short read transaction)."""
        with transaction(engine, write=False) as session:
            return load_lists(session, self.config.review_inputs_over)

    def providers(self, lists: Lists) -> list[ScreeningProvider]:
        found: list[ScreeningProvider] = [BuiltinProvider(lists)]
        if self.config.http_url:
            found.append(
                HttpProvider(
                    self.config.http_url,
                    self.config.http_api_key,
                    network=self.config.network,
                    timeout=self.config.http_timeout,
                )
            )
        return found

    @property
    def addresses_offline(self) -> bool:
        """Whether an address is screened with no call out (the bank's lists alone)."""
        return not self.config.http_url

    def offline(self, lists: Lists) -> bool:
        """Whether a deposit is decided with no call out: no HTTP provider, and none that
        reads the funding transaction's inputs from the node."""
        providers = self.providers(lists)
        return all(isinstance(p, BuiltinProvider) and not p.needs_inputs for p in providers)

    def screen_deposit(
        self, lists: Lists, txid: str, vout: int, amount_sats: int
    ) -> tuple[Decision, TransactionSubject]:
        """A deposit's funding transaction, its inputs read from the node when a provider
        needs them (a network call: the node's errors propagate, the decision stays
        pending and is asked again)."""
        providers = self.providers(lists)
        inputs: tuple[Input, ...] = ()
        if any(p.needs_inputs for p in providers):
            inputs = self.funding_inputs(txid)
        subject = TransactionSubject(txid, vout, amount_sats, inputs)
        return worst([p.screen(subject) for p in providers]), subject

    def screen_address(self, lists: Lists, address: str, purpose: str) -> Decision:
        subject = AddressSubject(address, purpose)
        return worst([p.screen(subject) for p in self.providers(lists)])

    def funding_inputs(self, txid: str) -> tuple[Input, ...]:
        """The outpoints a transaction spends and the address each paid (from the spent
        transactions' own outputs)."""
        assert self.node is not None, "screening a transaction's inputs needs the node"
        tx = Transaction.parse(self.node.get_raw_transaction(txid))
        network = embit_network(self.config.network)
        found: list[Input] = []
        for vin in tx.vin:
            prev_txid = vin.txid.hex()
            prev = Transaction.parse(self.node.get_raw_transaction(prev_txid))
            spk = prev.vout[vin.vout].script_pubkey
            try:
                address: str | None = Script(spk.data).address(network)
            except Exception:  # a script with no address form (bare multisig, OP_RETURN)
                address = None
            found.append(Input(prev_txid, vin.vout, address))
        return tuple(found)


def load_lists(session: Session, review_inputs_over: int | None = None) -> Lists:
    return Lists(
        entries={(e.kind, e.value): (e.action, e.note) for e in repository.list_entries(session)},
        review_inputs_over=review_inputs_over,
    )


# -- deposits --------------------------------------------------------------------------------


def pending_deposit_row(loan_id: int, txid: str, vout: int, amount_sats: int) -> dict[str, Any]:
    """The `pending` decision of a deposit seen for the first time (every column but the
    id), inserted by the watcher with the deposit itself."""
    now = utcnow()
    return {
        "subject": "deposit",
        "loan_id": loan_id,
        "deposit_key": f"{txid}:{vout}",
        "txid": txid,
        "vout": vout,
        "amount_sats": amount_sats,
        "address": None,
        "purpose": "deposit",
        "status": ScreeningStatus.pending,
        "result": None,
        "score": None,
        "reasons": "[]",
        "providers": "",
        "reference": None,
        "inputs": "[]",
        "attempts": 0,
        "settle_pending": False,
        "created_at": now,
        "decided_at": None,
        "resolution_reason": None,
        "resolved_by": None,
        "resolved_by_id": None,
        "resolved_at": None,
    }


Outcome = tuple[Decision, Sequence[Input]]  # what the providers said, and the inputs read


def record_outcomes(
    session: Session, outcomes: dict[int, Outcome], actor: str
) -> list[ScreeningDecision]:
    """Record what the providers said of pending screenings (by id), their rows read and
    locked together; one recorded already (a replay) is left as it is. Audited; a block
    alerts the bank."""
    rows = repository.decisions_locked(session, ids=sorted(outcomes))
    return [row for row in rows if _record(session, row, outcomes[row.id or 0], actor) is not None]


def _record(
    session: Session, row: ScreeningDecision, outcome: Outcome, actor: str
) -> ScreeningDecision | None:
    if row.status != ScreeningStatus.pending:
        return None
    decision, inputs = outcome
    for name, value in _decided_columns(decision, inputs, row.attempts).items():
        setattr(row, name, value)
    row.settle_pending = row.subject == "deposit" and decision.result == Result.clear
    session.add(row)
    _audit_decided(session, row.model_dump(), decision, actor)
    return row


def _decided_columns(decision: Decision, inputs: Sequence[Input], attempts: int) -> dict[str, Any]:
    """The columns a decision sets on its pending row."""
    return {
        "status": ScreeningStatus(decision.result.value),
        "result": decision.result.value,
        "score": decision.score,
        "reasons": json.dumps(decision.reasons),
        "providers": decision.provider[:200],
        "reference": decision.reference,
        "inputs": json.dumps([asdict(i) for i in inputs]),
        "attempts": attempts + 1,
        "decided_at": utcnow(),
    }


def _audit_decided(
    session: Session, values: Mapping[str, Any], decision: Decision, actor: str
) -> None:
    """`screening.decided` for a decided row's columns (`values`, its id among them); a
    block alerts the bank."""
    why = "; ".join(decision.reasons)
    record(
        session,
        actor=actor,
        action="screening.decided",
        loan_id=values["loan_id"],
        decision=decision.result.value,
        reason=why or None,
        data=decision_data(values),
    )
    if decision.result == Result.block:
        _alert_block(session, values, actor, why)


@dataclass(frozen=True)
class DepositScreenings:
    """What `insert_deposit_screenings` did: how many it decided, and the loans whose
    deposits a clear decision lets count (for the caller to settle in its transaction)."""

    decided: int = 0
    to_settle: tuple[int, ...] = ()


def insert_deposit_screenings(
    session: Session, screener: Screener, rows: Sequence[dict[str, Any]], actor: str
) -> DepositScreenings:
    """Insert the screenings of deposits seen for the first time (`pending_deposit_row`), in
    the watcher's block or mempool transaction, one INSERT for all. When that calls nothing
    out (`Screener.offline`: the bank's lists, read in this transaction, and no HTTP
    provider) each row is decided before it is inserted and audited as `record_outcomes`
    audits, so a crash leaves neither the deposit nor its decision; otherwise they go in
    `pending`, for the watcher's pass, which asks with no transaction open. A deposit that
    has a screening already (a replayed block) keeps it and is not audited again."""
    if not rows:
        return DepositScreenings()
    lists = load_lists(session, screener.config.review_inputs_over)
    if not screener.offline(lists):
        repository.insert_decisions(session, rows)
        return DepositScreenings()
    decided: list[tuple[dict[str, Any], Decision]] = []
    for pending in rows:
        decision, subject = screener.screen_deposit(
            lists, pending["txid"], pending["vout"], pending["amount_sats"]
        )
        columns = _decided_columns(decision, subject.inputs, pending["attempts"])
        # Settled by the caller in this transaction: no mark left for the pass.
        decided.append(({**pending, **columns, "settle_pending": False}, decision))
    ids = repository.insert_decisions(session, [values for values, _ in decided])
    loans: set[int] = set()
    count = 0
    for values, decision in decided:
        decision_id = ids.get(values["deposit_key"])
        if decision_id is None:
            continue
        values["id"] = decision_id
        _audit_decided(session, values, decision, actor)
        count += 1
        if decision.result == Result.clear:
            loans.add(values["loan_id"])
    return DepositScreenings(decided=count, to_settle=tuple(sorted(loans)))


def _alert_block(session: Session, values: Mapping[str, Any], actor: str, why: str) -> None:
    """A block is an alert in the audit log and the bank's webhook (never the miner's: an
    AML finding is not told to its subject)."""
    data = decision_data(values)
    record(
        session,
        actor=actor,
        action="alert.screening_block",
        loan_id=values["loan_id"],
        decision="alert",
        reason=why or "blocked by screening",
        data=data,
    )
    loan = loans_repository.loan(session, values["loan_id"])
    if loan is not None:
        notify_loan(session, loan, "screening.blocked", data, seats=("bank",))
    log.error("screening.blocked", decision_id=values["id"], loan_id=values["loan_id"])


def decision_data(values: Mapping[str, Any]) -> dict[str, Any]:
    """A decision's audit and webhook data, from its row's columns (`model_dump()`)."""
    return {
        "decision_id": values["id"],
        "subject": values["subject"],
        "purpose": values["purpose"],
        "txid": values["txid"],
        "vout": values["vout"],
        "address": values["address"],
        "amount_sats": values["amount_sats"],
        "status": str(values["status"]),
        "result": values["result"],
        "score": values["score"],
        "reasons": json.loads(values["reasons"]),
        "providers": values["providers"],
        "reference": values["reference"],
    }


def pending_deposits(session: Session, limit: int) -> list[ScreeningDecision]:
    """Deposit screenings still waiting for their providers, oldest first."""
    return repository.pending_deposit_decisions(session, limit)


def any_to_settle(session: Session) -> bool:
    return repository.any_to_settle(session)


def held_outpoints(session: Session, loan_ids: Sequence[int]) -> set[tuple[str, int]]:
    """The deposits of these loans that do not count as collateral yet."""
    return repository.held_outpoints(session, loan_ids)


def take_loans_to_settle(session: Session) -> list[int]:
    """The loans whose deposits a decision let count, the marks cleared (the caller
    settles them in this transaction)."""
    return take_loans_of(repository.decisions_to_settle(session))


def take_loans_of(rows: Sequence[ScreeningDecision]) -> list[int]:
    """`take_loans_to_settle` among these decisions (rows of the caller's session)."""
    loans: set[int] = set()
    for row in rows:
        if row.settle_pending:
            loans.add(row.loan_id)
            row.settle_pending = False
    return sorted(loans)


# -- a compliance officer's resolution --------------------------------------------------------


def resolve(
    session: Session, ctx: Context, decision_id: int, outcome: str, reason: str
) -> ScreeningDecision:
    """Clear a decision under review or blocked, or confirm its block, with the reason.
    Once only: a replay, or a resolution of a clear or pending one, is refused (409) and
    changes nothing."""
    require_role(ctx.principal, *RESOLVERS)
    if outcome not in ("clear", "block"):
        raise InvalidInput("outcome must be clear or block", field="outcome")
    row = repository.decision_locked(session, decision_id)
    if row is None:
        raise ScreeningDecisionNotFound()
    if row.status == ScreeningStatus.pending:
        raise ScreeningNotDecided(f"screening {decision_id} has no decision yet")
    if row.status not in (ScreeningStatus.review, ScreeningStatus.block):
        raise ScreeningAlreadyResolved(f"screening {decision_id} is {row.status}: not open")
    before = row.status
    row.status = ScreeningStatus.cleared if outcome == "clear" else ScreeningStatus.blocked
    row.resolution_reason = reason
    row.resolved_by, row.resolved_by_id, row.resolved_at = ctx.actor, ctx.principal.id, utcnow()
    row.settle_pending = row.subject == "deposit" and outcome == "clear"
    session.add(row)
    values = row.model_dump()
    data = {
        **decision_data(values),
        "was": str(before),
        "resolved_by": ctx.actor,
        "resolution_reason": reason,
    }
    record(
        session,
        actor=ctx.actor,
        action="screening.resolved",
        loan_id=row.loan_id,
        decision=str(row.status),
        reason=reason,
        data=data,
    )
    if outcome == "block" and before == ScreeningStatus.review:
        _alert_block(session, values, ctx.actor, reason)
    return row


# -- payout addresses --------------------------------------------------------------------------


def payout_addresses(loan: Loan, action: str) -> list[tuple[str, str]]:
    """(purpose, address) of what a request of `action` would pay."""
    miner = ("miner_return", loan.miner_return_address)
    bank = ("bank_liquidation", loan.bank_liquidation_address)
    return {
        "release": [miner],
        "dispute_release": [miner],
        "liquidation": [bank, miner],
        "partial_liquidation": [bank],
    }.get(action, [bank, miner])


def check_payouts(session: Session, loan: Loan, action: str) -> None:
    """Refuse (409) a request paying an address whose last screening blocks it or awaits a
    compliance officer; reads only, so it runs inside a request's own transaction (the
    risk engine's too)."""
    for purpose, address in payout_addresses(loan, action):
        last = repository.latest_payout_decision(session, loan.id or 0, address)
        if last is None:
            continue
        if last.status in (ScreeningStatus.block, ScreeningStatus.blocked):
            raise PayoutAddressBlocked(
                f"the {purpose} address {address} is blocked by AML screening (decision {last.id})"
            )
        if last.status in (ScreeningStatus.review, ScreeningStatus.pending):
            raise PayoutAddressUnderReview(
                f"the {purpose} address {address} awaits a compliance officer "
                f"(screening decision {last.id})"
            )


_NOT_SCREENED_AGAIN: Final = (
    ScreeningStatus.review,
    ScreeningStatus.block,
    ScreeningStatus.blocked,
    ScreeningStatus.pending,
)


def screen_payouts(
    engine: Engine, ctx: Context, loan_id: int, action: str, screener: Screener
) -> None:
    """Screen the addresses a request would pay, before it is built: the lists and the
    loan read, the providers asked with no transaction open, each outcome recorded and
    committed (so a block stays in the bank's report even though the request is refused),
    then `check_payouts`. A cleared address stays cleared unless screening now blocks it;
    an open review is not screened again (it waits in the queue). With the bank's lists
    alone (`Screener.addresses_offline`) nothing is called out: all of it is one write
    transaction, its refusal raised once it has committed."""
    if screener.addresses_offline:
        with transaction(engine) as session:
            refusal = _screen_payouts_in(session, ctx, loan_id, action, screener)
        if refusal is not None:
            raise refusal
        return
    with transaction(engine, write=False) as session:
        loan = loans_repository.loan(session, loan_id)
        if loan is None:
            return  # the request's own checks answer for a missing loan
        lists = load_lists(session, screener.config.review_inputs_over)
        wanted: list[tuple[str, str]] = []
        for purpose, address in payout_addresses(loan, action):
            last = repository.latest_payout_decision(session, loan_id, address)
            if last is None or last.status not in _NOT_SCREENED_AGAIN:
                wanted.append((purpose, address))
    judged = [(p, a, screener.screen_address(lists, a, p)) for p, a in wanted]
    with transaction(engine) as session:
        for purpose, address, decision in judged:
            last = repository.latest_payout_decision(session, loan_id, address)
            if not _keeps_its_clearance(last, decision):
                _insert_payout_decision(session, ctx, loan_id, purpose, address, decision)
    with transaction(engine, write=False) as session:
        loan = loans_repository.loan(session, loan_id)
        if loan is not None:
            check_payouts(session, loan, action)


def _screen_payouts_in(
    session: Session, ctx: Context, loan_id: int, action: str, screener: Screener
) -> PayoutAddressBlocked | PayoutAddressUnderReview | None:
    """`screen_payouts` inside one transaction, for a screener that calls nothing out: the
    refusal is returned, not raised, so the decisions that make it are committed."""
    loan = loans_repository.loan(session, loan_id)
    if loan is None:
        return None
    lists = load_lists(session, screener.config.review_inputs_over)
    for purpose, address in payout_addresses(loan, action):
        last = repository.latest_payout_decision(session, loan_id, address)
        if last is not None and last.status in _NOT_SCREENED_AGAIN:
            continue
        decision = screener.screen_address(lists, address, purpose)
        if not _keeps_its_clearance(last, decision):
            _insert_payout_decision(session, ctx, loan_id, purpose, address, decision)
    try:
        check_payouts(session, loan, action)
    except (PayoutAddressBlocked, PayoutAddressUnderReview) as refusal:
        return refusal
    return None


def _keeps_its_clearance(last: ScreeningDecision | None, decision: Decision) -> bool:
    """A compliance officer cleared the address, and nothing new blocks it."""
    return (
        last is not None
        and last.status == ScreeningStatus.cleared
        and decision.result != Result.block
    )


def _insert_payout_decision(
    session: Session, ctx: Context, loan_id: int, purpose: str, address: str, decision: Decision
) -> None:
    """A payout address's screening, inserted decided and audited as `record_outcomes` does."""
    row = ScreeningDecision(
        subject="payout",
        loan_id=loan_id,
        address=address,
        purpose=purpose,
        **_decided_columns(decision, (), 0),
    )
    session.add(row)
    session.flush()
    assert row.id is not None
    _audit_decided(session, row.model_dump(), decision, ctx.actor)


# -- the bank's lists ------------------------------------------------------------------------


def add_list_entry(
    session: Session, ctx: Context, kind: str, value: str, action: str, note: str
) -> ScreeningListEntry:
    require_role(ctx.principal, *LIST_EDITORS)
    if kind not in LIST_KINDS:
        raise InvalidInput(f"kind must be one of {', '.join(LIST_KINDS)}", field="kind")
    if action not in LIST_ACTIONS:
        raise InvalidInput("action must be block or review", field="action")
    value = _canonical(kind, value)
    if repository.list_entry_of(session, kind, value) is not None:
        raise ScreeningListEntryExists(f"{kind} {value} is already on the lists")
    entry = ScreeningListEntry(
        kind=kind, value=value, action=action, note=note, created_by=ctx.actor
    )
    session.add(entry)
    session.flush()
    record(
        session,
        actor=ctx.actor,
        action="screening.list_added",
        decision=action,
        reason=note,
        data={"entry_id": entry.id, "kind": kind, "value": value, "action": action},
    )
    return entry


def remove_list_entry(session: Session, ctx: Context, entry_id: int, reason: str) -> None:
    require_role(ctx.principal, *LIST_EDITORS)
    entry = repository.list_entry(session, entry_id)
    if entry is None:
        raise ScreeningListEntryNotFound()
    data = {"entry_id": entry.id, "kind": entry.kind, "value": entry.value, "action": entry.action}
    repository.delete_entry(session, entry)
    record(session, actor=ctx.actor, action="screening.list_removed", reason=reason, data=data)


def list_entries(session: Session, ctx: Context) -> list[ScreeningListEntry]:
    require_role(ctx.principal, *LIST_READERS)
    return repository.list_entries(session)


def _canonical(kind: str, value: str) -> str:
    """Txids and outpoints in lower-case hex, checked; an address as given (bech32 is
    case-insensitive but shown lower-case; base58 is not)."""
    value = value.strip()
    if kind == "address":
        if not 10 <= len(value) <= 100 or not value.isalnum():
            raise InvalidInput("not an address", field="value")
        return value.lower() if value.lower().startswith(("bc1", "tb1", "bcrt1")) else value
    txid, _, vout = value.lower().partition(":")
    if len(txid) != 64 or any(c not in "0123456789abcdef" for c in txid):
        raise InvalidInput("a txid is 64 hex digits", field="value")
    if kind == "txid":
        if vout:
            raise InvalidInput("a txid has no :vout (that is an outpoint)", field="value")
        return txid
    if not vout.isdigit() or int(vout) > 2**32 - 1:
        raise InvalidInput("an outpoint is txid:vout", field="value")
    return f"{txid}:{int(vout)}"


# -- reading decisions -----------------------------------------------------------------------


STATUS_FILTERS: dict[str, tuple[ScreeningStatus, ...]] = {
    "review": (ScreeningStatus.review,),
    "block": (ScreeningStatus.block, ScreeningStatus.blocked),
    "pending": (ScreeningStatus.pending,),
    "clear": (ScreeningStatus.clear, ScreeningStatus.cleared),
}


def decisions(
    session: Session, ctx: Context, result: str | None, *, limit: int, offset: int
) -> list[tuple[ScreeningDecision, Loan, str]]:
    """Decisions (filtered by what they stand at), newest first, with loan and miner name."""
    require_role(ctx.principal, *READERS)
    statuses = None if result is None else STATUS_FILTERS.get(result)
    if result is not None and statuses is None:
        raise InvalidInput(f"result must be one of {', '.join(STATUS_FILTERS)}", field="result")
    rows = repository.decisions_with(session, statuses, limit=limit, offset=offset)
    return [(d, loan, party.name) for d, loan, party in rows]


def decision_by_id(session: Session, ctx: Context, decision_id: int) -> ScreeningDecision:
    require_role(ctx.principal, *READERS)
    row = repository.decision(session, decision_id)
    if row is None:
        raise ScreeningDecisionNotFound()
    return row


def decisions_of_loans(session: Session, loan_ids: Sequence[int]) -> list[ScreeningDecision]:
    """Every decision of these loans (the console's loan page: the caller checked it may
    see them)."""
    return repository.decisions_of_loans(session, loan_ids)


__all__ = ["Decision", "Input", "Screener", "ScreeningConfig"]
