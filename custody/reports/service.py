"""The reports an auditor and the AML officer file: the collateral register at a moment
and a loan's statement. Read from the audit log (`history.py`) in one read transaction,
then the node is asked (with no transaction open) how high the chain was at that moment.

Only auditors and compliance officers read them (`READERS`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Protocol, runtime_checkable

from sqlalchemy.engine import Engine
from sqlmodel import Session

from custody.auth.context import Context
from custody.auth.policy import require_role
from custody.db.models import (
    Approval,
    AuditEvent,
    Deposit,
    Loan,
    LoanKey,
    Party,
    Role,
    SignerEndorsement,
    SignerStatement,
    SigningAction,
    SigningRequest,
    as_utc,
)
from custody.db.session import transaction
from custody.errors import LoanNotFound, NodeNotConfigured
from custody.reports import history, repository
from custody.reports.history import Holdings, PriceAt, Valuation
from custody.reports.miners import miner_inn
from pledge.amounts import kopecks_for_sats, ltv_bps
from pledge.errors import InvalidInput

READERS: Final = (Role.auditor, Role.compliance_officer)


@runtime_checkable
class ChainClock(Protocol):
    """What a report asks the node: how high the chain was at a moment (NodeRpc has it)."""

    def get_block_count(self) -> int: ...
    def get_block_hash(self, height: int) -> str: ...
    def get_block_header(self, block_hash: str) -> dict[str, Any]: ...


def chain_clock(chain: object | None) -> ChainClock:
    if chain is None or not isinstance(chain, ChainClock):
        raise NodeNotConfigured("no Bitcoin node is configured for this service")
    return chain


def report_moment(at: datetime | None, now: datetime) -> datetime:
    """T: the moment asked for (aware, not in the future), or now."""
    if at is None:
        return now
    if at.tzinfo is None or at.utcoffset() is None:
        raise InvalidInput("at must carry a timezone (e.g. 2026-12-01T00:00:00Z)", field="at")
    moment = at.astimezone(UTC)
    if moment > now:
        raise InvalidInput("at is in the future: the register is of what was held", field="at")
    return moment


def tip_at(chain: ChainClock, at: datetime, *, live: bool) -> int:
    """The chain's height at `at`: its tip now when `live`, else the last block whose
    header's second was over by `at` (a block stamped 12:00:00 may have been mined at
    12:00:00.9, so it counts from 12:00:01: never a confirmation too many). Binary search
    over heights; -1 before genesis."""
    tip = chain.get_block_count()
    if live:
        return tip
    stamp = at.timestamp()

    def before(height: int) -> bool:
        return int(chain.get_block_header(chain.get_block_hash(height))["time"]) + 1 <= stamp

    if before(tip):
        return tip
    below, above = -1, tip  # before(below), not before(above)
    while above - below > 1:
        middle = (below + above) // 2
        if before(middle):
            below = middle
        else:
            above = middle
    return below


# -- the collateral register ---------------------------------------------------------------


@dataclass(frozen=True)
class RegisterRow:
    loan_id: int
    loan_state: str
    miner: str
    miner_inn: str
    descriptor: str
    txid: str
    vout: int
    amount_sats: int
    block_height: int | None
    confirmations: int | None
    price_rub_per_btc: Decimal | None
    price_source: str | None
    value_kopecks: int | None
    debt_kopecks: int  # the loan's, on each of its outpoints
    ltv_bps: int | None  # the loan's

    @property
    def outpoint(self) -> str:
        return f"{self.txid}:{self.vout}"


@dataclass(frozen=True)
class RegisterTotals:
    loans: int
    outpoints: int
    amount_sats: int
    value_kopecks: int | None
    debt_kopecks: int
    ltv_bps: int | None  # the book's: all debt over all collateral


@dataclass(frozen=True)
class Register:
    at: datetime
    height: int  # the chain's at `at`
    price: PriceAt | None
    rows: list[RegisterRow]
    totals: RegisterTotals
    generated_at: datetime


@dataclass(frozen=True)
class _Book:
    """What the database says of the book at T, read in one transaction."""

    holdings: Holdings
    loans: dict[int, Loan]
    parties: dict[int, Party]
    inns: dict[int, str]
    states: dict[int, str]
    credits: dict[int, int]
    price: PriceAt | None


def _request_credits(session: Session, events: list[AuditEvent]) -> dict[int, int]:
    """Each partial liquidation's credit (its evidence), for the requests these events name."""
    ids = {e.request_id for e in events if e.request_id is not None}
    found = repository.requests_by_ids(session, ids)
    return {
        rid: int(json.loads(req.evidence_json).get("credited_kopecks", 0))
        for rid, req in found.items()
        if req.action == SigningAction.partial_liquidation
    }


def price_at(session: Session, at: datetime) -> PriceAt | None:
    """The price in effect at `at`: the manual price confirmed last by then, or the price a
    risk pass last recorded (its median), whichever took effect later."""
    manual = repository.manual_prices_until(session, at, last_only=True)
    evidence = repository.price_evidence_until(session, at, last_only=True)
    return history.latest(
        *(
            history.manual_price(p.id, p.price_rub_per_btc, as_utc(p.confirmed_at or at))
            for p in manual
        ),
        *(history.evidence_price(e, as_utc(e.at)) for e in evidence),
    )


def _read_book(session: Session, at: datetime) -> _Book:
    held = history.holdings(repository.events_until(session, at, repository.DEPOSIT_ACTIONS))
    loan_ids = sorted(held.by_loan)
    loans = repository.loans_by_ids(session, loan_ids)
    parties = repository.parties_by_ids(session, {loan.miner_party_id for loan in loans.values()})
    credit_events = repository.events_until(session, at, repository.CREDIT_ACTIONS, loan_ids)
    return _Book(
        holdings=held,
        loans=loans,
        parties=parties,
        inns={pid: miner_inn(session, party) for pid, party in parties.items()},
        states=history.states(
            repository.events_until(session, at, repository.STATE_ACTIONS, loan_ids)
        ),
        credits=history.credits(credit_events, _request_credits(session, credit_events)),
        price=price_at(session, at),
    )


def collateral_register(
    engine: Engine,
    ctx: Context,
    chain: object | None,
    at: datetime | None = None,
    *,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Register:
    """Every outpoint held as collateral at `at` (default now), with its loan's figures."""
    require_role(ctx.principal, *READERS)
    node = chain_clock(chain)
    now = clock()
    moment = report_moment(at, now)
    with transaction(engine, write=False) as session:
        book = _read_book(session, moment)
    # The node, with no transaction open; never below a height the service had seen by T.
    height = max(tip_at(node, moment, live=at is None), book.holdings.known_height)
    rows: list[RegisterRow] = []
    debts: dict[int, Valuation] = {}
    price = book.price
    for loan_id in sorted(book.holdings.by_loan):
        loan = book.loans[loan_id]
        held = sorted(book.holdings.by_loan[loan_id], key=lambda h: (h.txid, h.vout))
        valuation = history.value(
            loan, moment, sum(h.amount_sats for h in held), book.credits.get(loan_id, 0), price
        )
        debts[loan_id] = valuation
        party = book.parties.get(loan.miner_party_id)
        for h in held:
            rows.append(
                RegisterRow(
                    loan_id=loan_id,
                    loan_state=book.states.get(loan_id, str(loan.state)),
                    miner=party.name if party else "",
                    miner_inn=book.inns.get(loan.miner_party_id, ""),
                    descriptor=loan.descriptor or "",
                    txid=h.txid,
                    vout=h.vout,
                    amount_sats=h.amount_sats,
                    block_height=h.block_height,
                    confirmations=None if h.block_height is None else height - h.block_height + 1,
                    price_rub_per_btc=price.price_rub_per_btc if price else None,
                    price_source=price.source if price else None,
                    value_kopecks=(
                        kopecks_for_sats(h.amount_sats, price.price_rub_per_btc) if price else None
                    ),
                    debt_kopecks=valuation.debt_kopecks,
                    ltv_bps=valuation.ltv_bps,
                )
            )
    total_sats = sum(r.amount_sats for r in rows)
    total_debt = sum(v.debt_kopecks for v in debts.values())
    totals = RegisterTotals(
        loans=len(debts),
        outpoints=len(rows),
        amount_sats=total_sats,
        value_kopecks=(sum(r.value_kopecks or 0 for r in rows) if price is not None else None),
        debt_kopecks=total_debt,
        ltv_bps=(
            ltv_bps(total_debt, total_sats, price.price_rub_per_btc)
            if price is not None and total_sats > 0
            else None
        ),
    )
    return Register(moment, height, price, rows, totals, now)


# -- a loan's statement --------------------------------------------------------------------

# The events after which a loan's valuation can have moved (besides time).
_VALUED: Final = (
    *repository.DEPOSIT_ACTIONS[1:],
    *repository.CREDIT_ACTIONS,
    "loan.state_changed",
)


@dataclass(frozen=True)
class ValuationPoint:
    at: datetime
    event_id: int | None  # None: the statement's own moment
    action: str
    state: str
    valuation: Valuation
    price: PriceAt | None


@dataclass(frozen=True)
class Statement:
    at: datetime
    generated_at: datetime
    loan: Loan
    parties: dict[str, Party]  # miner, bank, arbiter
    miner_inn: str
    keys: list[LoanKey]
    deposits: list[Deposit]
    held: list[history.Held]
    valuations: list[ValuationPoint]
    events: list[AuditEvent]
    requests: list[SigningRequest]
    approvals: list[Approval]
    statements: list[SignerStatement]
    endorsements: list[SignerEndorsement]


def _prices_over_time(session: Session, at: datetime) -> list[PriceAt]:
    manual = repository.manual_prices_until(session, at, last_only=False)
    evidence = repository.price_evidence_until(session, at, last_only=False)
    found = [
        history.manual_price(p.id, p.price_rub_per_btc, as_utc(p.confirmed_at or at))
        for p in manual
    ]
    found += [p for e in evidence if (p := history.evidence_price(e, as_utc(e.at))) is not None]
    return sorted(found, key=lambda p: p.since)


def _price_then(prices: list[PriceAt], moment: datetime) -> PriceAt | None:
    then = [p for p in prices if p.since <= moment]
    return then[-1] if then else None


def loan_statement(
    engine: Engine,
    ctx: Context,
    loan_id: int,
    at: datetime | None = None,
    *,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Statement:
    """Everything an auditor reads of one loan up to `at` (default now), with its
    valuation after each event that could move it."""
    require_role(ctx.principal, *READERS)
    now = clock()
    moment = report_moment(at, now)
    with transaction(engine, write=False) as session:
        loan = repository.loans_by_ids(session, [loan_id]).get(loan_id)
        if loan is None:
            raise LoanNotFound()
        ids = {"miner": loan.miner_party_id, "bank": loan.bank_party_id}
        ids["arbiter"] = loan.arbiter_party_id
        found = repository.parties_by_ids(session, set(ids.values()))
        parties = {role: found[pid] for role, pid in ids.items() if pid in found}
        inn = miner_inn(session, parties["miner"]) if "miner" in parties else ""
        events = repository.events_of_loan(session, loan_id, moment)
        prices = _prices_over_time(session, moment)
        credits_of = _request_credits(session, events)
        keys = repository.keys_of_loan(session, loan_id)
        deposits = repository.deposits_of_loan(session, loan_id)
        requests = repository.requests_of_loan(session, loan_id)
        approvals = repository.approvals_of_requests(
            session, [r.id for r in requests if r.id is not None]
        )
        statements = repository.statements_of_loan(session, loan_id)
        endorsements = repository.endorsements_of(
            session, [s.id for s in statements if s.id is not None]
        )
    points = [
        _point(loan, events[: index + 1], prices, credits_of, as_utc(event.at), event)
        for index, event in enumerate(events)
        if event.action in _VALUED
    ]
    points.append(_point(loan, events, prices, credits_of, moment, None))
    final = history.holdings(e for e in events if e.action in repository.DEPOSIT_ACTIONS)
    return Statement(
        at=moment,
        generated_at=now,
        loan=loan,
        parties=parties,
        miner_inn=inn,
        keys=keys,
        deposits=deposits,
        held=final.by_loan.get(loan_id, []),
        valuations=points,
        events=events,
        requests=requests,
        approvals=approvals,
        statements=statements,
        endorsements=endorsements,
    )


def _point(
    loan: Loan,
    events: list[AuditEvent],
    prices: list[PriceAt],
    credits_of: dict[int, int],
    moment: datetime,
    event: AuditEvent | None,
) -> ValuationPoint:
    """The loan's valuation right after the last of `events` (the replay of its prefix)."""
    held = history.holdings(e for e in events if e.action in repository.DEPOSIT_ACTIONS)
    credited = history.credits(
        (e for e in events if e.action in repository.CREDIT_ACTIONS), credits_of
    )
    state = history.states(e for e in events if e.action in repository.STATE_ACTIONS)
    assert loan.id is not None
    price = _price_then(prices, moment)
    return ValuationPoint(
        at=moment,
        event_id=event.id if event is not None else None,
        action=event.action if event is not None else "statement",
        state=state.get(loan.id, str(loan.state)),
        valuation=history.value(
            loan, moment, held.collateral_sats(loan.id), credited.get(loan.id, 0), price
        ),
        price=price,
    )
