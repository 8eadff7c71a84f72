"""The manual price, under 4-eyes: one member of the bank's staff proposes a BTC/RUB price,
a second one confirms it, and only a confirmed price reaches the risk engine.

Who: proposers and confirmers are bank staff (`bank_operator`, `bank_approver`); the
confirmer must be another principal than the proposer (compared by principal id, so a
renamed or re-keyed principal is still the same one). Two API keys that one human holds
under two principals are not knowable here: the admin who creates principals answers for
that, and the history says which principals decided. Staff and auditors (and the admin)
read the history with who proposed and who confirmed; nobody else sees a manual price.

What: a proposal is refused, and nothing is stored, when its quote is dated further in
the future than the allowed clock skew, or when the price feeds (the HTTP sources; never
the manual price itself) have a usable median and the price is further from it than
`price_manual_max_deviation_bps`. Both are checked again at the confirmation, against the
feeds at that moment. With no feed configured, or none usable (the very case a manual
price is for), there is no median to hold it to: the proposal says so in its audit event,
and the second person is the check. A proposal not confirmed within its time to live
expires; confirming a quote older than the price in effect is refused (it would turn the
price back).

The feeds are asked before the transaction opens (`feed_check`), never inside it. Every
decision is an audit event (`price.proposed`, `price.confirmed`, `price.rejected`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_UP, Decimal, localcontext
from typing import Any, Literal, Protocol

import structlog
from sqlalchemy.engine import Engine
from sqlmodel import Session

from custody.audit.service import record
from custody.auth.context import Context
from custody.auth.policy import BANK_STAFF, require_role
from custody.config import Settings
from custody.db.models import PriceRecord, PriceState, Role, as_utc
from custody.db.session import transaction
from custody.errors import (
    PriceFarFromFeeds,
    PriceNotFound,
    PriceNotProposed,
    PriceNotSet,
    PriceProposalExpired,
    PriceQuotedInFuture,
    PriceSuperseded,
    SelfConfirmation,
)
from custody.risk import repository
from custody.risk.prices import Consensus, ManualPriceSource, PriceQuote, PriceUnavailable
from pledge.errors import InvalidInput

log = structlog.get_logger(__name__)

SOURCE = "manual"
# Who proposes and confirms, and who reads the history (with who decided).
DECIDERS = tuple(sorted(BANK_STAFF))
READERS = (*DECIDERS, Role.auditor, Role.admin)
ShownState = Literal["proposed", "confirmed", "rejected", "expired", "legacy"]


class Feeds(Protocol):
    """The automatic price sources' median (`custody.risk.prices.MedianPriceSource`)."""

    def consensus(self) -> Consensus: ...


@dataclass(frozen=True)
class PricePolicy:
    """The bounds a manual price is held to (from `Settings`)."""

    max_deviation_bps: int
    future_skew: timedelta
    proposal_ttl: timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> PricePolicy:
        return cls(
            max_deviation_bps=settings.price_manual_max_deviation_bps,
            future_skew=timedelta(seconds=settings.price_future_skew_seconds),
            proposal_ttl=timedelta(seconds=settings.price_proposal_ttl_seconds),
        )


@dataclass(frozen=True)
class FeedCheck:
    """What the feeds said when a manual price was checked: their median and its source,
    or why there is none (`reason`; None and no median: no feed is configured)."""

    median: Decimal | None
    source: str | None = None
    reason: str | None = None

    def evidence(self) -> dict[str, Any]:
        if self.median is not None:
            return {"feeds_median": str(self.median), "feeds_source": self.source}
        return {"feeds_median": None, "feeds_unavailable": self.reason or "no feed configured"}


def feed_check(feeds: Feeds | None) -> FeedCheck:
    """Ask the feeds (over the network: call it with no transaction open)."""
    if feeds is None:
        return FeedCheck(None)
    consensus = feeds.consensus()
    if not consensus.usable or consensus.quote is None:
        return FeedCheck(None, reason=consensus.reason or "no usable price")
    return FeedCheck(consensus.quote.price_rub_per_btc, consensus.quote.source)


def _deviation_bps(price: Decimal, median: Decimal) -> Decimal:
    with localcontext(prec=60):
        return (abs(price - median) * 10_000 / median).quantize(Decimal(1), rounding=ROUND_UP)


def _check(
    price: Decimal, quoted_at: datetime, *, policy: PricePolicy, feeds: FeedCheck, now: datetime
) -> None:
    """The refusals a proposal meets, and its confirmation again."""
    if quoted_at - now > policy.future_skew:
        raise PriceQuotedInFuture(
            f"the quote is dated {quoted_at.isoformat()}, more than "
            f"{int(policy.future_skew.total_seconds())} s ahead of the service's clock",
            field="quoted_at",
        )
    if feeds.median is None:
        return
    off = _deviation_bps(price, feeds.median)
    if off > policy.max_deviation_bps:
        raise PriceFarFromFeeds(
            f"price {price} is {off} bps from the feeds' median {feeds.median} "
            f"({feeds.source}); the bound is {policy.max_deviation_bps} bps",
            field="price_rub_per_btc",
        )


def shown_state(row: PriceRecord, now: datetime | None = None) -> ShownState:
    """The state as the history shows it: an open proposal past its time is expired."""
    expires_at = row.expires_at
    if row.state == PriceState.proposed and expires_at is not None:
        return "expired" if as_utc(expires_at) <= (now or datetime.now(UTC)) else "proposed"
    return PriceState(row.state).value


def propose_price(
    session: Session,
    ctx: Context,
    price: Decimal,
    quoted_at: datetime | None,
    *,
    policy: PricePolicy,
    feeds: FeedCheck,
    now: datetime | None = None,
) -> PriceRecord:
    """One member of the bank's staff proposes a price; it does nothing until another
    confirms it."""
    require_role(ctx.principal, *DECIDERS)
    now = now or datetime.now(UTC)
    try:  # the source's own validation (decimal, positive, places, timezone, who)
        quote = ManualPriceSource().set(price, quoted_at or now, ctx.actor)
    except InvalidInput as bad:  # named as the request names it
        field = {"price": "price_rub_per_btc", "at": "quoted_at"}.get(bad.field or "", bad.field)
        raise InvalidInput(bad.message, field=field) from None
    try:
        _check(quote.price_rub_per_btc, quote.quoted_at, policy=policy, feeds=feeds, now=now)
    except (PriceQuotedInFuture, PriceFarFromFeeds) as refused:
        log.warning("price.proposal_refused", actor=ctx.actor, code=refused.code)
        raise
    row = PriceRecord(
        price_rub_per_btc=f"{quote.price_rub_per_btc:f}",  # never "1E-8"
        source=SOURCE,
        quoted_at=quote.quoted_at,
        state=PriceState.proposed,
        proposed_by=ctx.actor,
        proposed_by_id=ctx.principal.id,
        created_at=now,
        expires_at=now + policy.proposal_ttl,
    )
    session.add(row)
    session.flush()
    record(
        session,
        actor=ctx.actor,
        action="price.proposed",
        data={
            "price_id": row.id,
            "price_rub_per_btc": row.price_rub_per_btc,
            "quoted_at": quote.quoted_at.isoformat(),
            "expires_at": (now + policy.proposal_ttl).isoformat(),
            **feeds.evidence(),
        },
    )
    return row


def _open_proposal(session: Session, price_id: int, now: datetime) -> PriceRecord:
    repository.lock_price_decisions(session)
    row = repository.price_by_id(session, price_id)
    if row is None:
        raise PriceNotFound()
    if row.state != PriceState.proposed:
        raise PriceNotProposed(f"price {price_id} is {PriceState(row.state).value}, not a proposal")
    if row.expires_at is None or as_utc(row.expires_at) <= now:
        raise PriceProposalExpired(f"price {price_id}: the proposal expired unconfirmed")
    return row


def confirm_price(
    session: Session,
    ctx: Context,
    price_id: int,
    *,
    policy: PricePolicy,
    feeds: FeedCheck,
    now: datetime | None = None,
) -> PriceRecord:
    """A second member of the bank's staff confirms a proposal: from now on it is the
    manual price the risk engine reads."""
    require_role(ctx.principal, *DECIDERS)
    now = now or datetime.now(UTC)
    row = _open_proposal(session, price_id, now)
    if row.proposed_by_id == ctx.principal.id:
        raise SelfConfirmation(
            f"price {price_id} was proposed by {row.proposed_by}: another person must confirm it"
        )
    quoted_at = as_utc(row.quoted_at)
    _check(Decimal(row.price_rub_per_btc), quoted_at, policy=policy, feeds=feeds, now=now)
    current = repository.latest_price(session)
    if current is not None and as_utc(current.quoted_at) >= quoted_at:
        raise PriceSuperseded(
            f"price {current.id}, quoted at {as_utc(current.quoted_at).isoformat()}, is in "
            f"effect; price {price_id} is quoted at {quoted_at.isoformat()}"
        )
    row.state = PriceState.confirmed
    row.confirmed_by, row.confirmed_by_id, row.confirmed_at = ctx.actor, ctx.principal.id, now
    session.add(row)
    session.flush()
    record(
        session,
        actor=ctx.actor,
        action="price.confirmed",
        decision="confirmed",
        data={
            "price_id": row.id,
            "price_rub_per_btc": row.price_rub_per_btc,
            "quoted_at": quoted_at.isoformat(),
            "proposed_by": row.proposed_by,
            **feeds.evidence(),
        },
    )
    return row


def reject_price(
    session: Session, ctx: Context, price_id: int, *, now: datetime | None = None
) -> PriceRecord:
    """Bank staff (the proposer too: a withdrawal) turn a proposal down."""
    require_role(ctx.principal, *DECIDERS)
    now = now or datetime.now(UTC)
    row = _open_proposal(session, price_id, now)
    row.state = PriceState.rejected
    row.rejected_by, row.rejected_at = ctx.actor, now
    session.add(row)
    session.flush()
    record(
        session,
        actor=ctx.actor,
        action="price.rejected",
        decision="rejected",
        data={"price_id": row.id, "price_rub_per_btc": row.price_rub_per_btc},
    )
    return row


def price_history(session: Session, ctx: Context, *, limit: int, offset: int) -> list[PriceRecord]:
    require_role(ctx.principal, *READERS)
    return repository.price_history(session, limit=limit, offset=offset)


def get_price(session: Session, ctx: Context, price_id: int) -> PriceRecord:
    require_role(ctx.principal, *READERS)
    row = repository.price_by_id(session, price_id)
    if row is None:
        raise PriceNotFound()
    return row


def price_in_effect(session: Session, ctx: Context) -> PriceRecord:
    require_role(ctx.principal, *READERS)
    row = repository.latest_price(session)
    if row is None:
        raise PriceNotSet("no manual price has been confirmed")
    return row


class DbManualPriceSource:
    """The confirmed manual price in effect, as a PriceSource for the median. Its quote
    names the price by id (`manual#12`), not by person: the evidence a risk pass writes
    reaches miners, who may not learn who set the price."""

    def __init__(self, engine: Engine, name: str = SOURCE) -> None:
        self.engine, self.name = engine, name

    def quote(self) -> PriceQuote:
        with transaction(self.engine, write=False) as session:
            row = repository.latest_price(session)
        if row is None:
            raise PriceUnavailable(f"{self.name}: no price has been confirmed")
        return PriceQuote(
            Decimal(row.price_rub_per_btc), f"{self.name}#{row.id}", as_utc(row.quoted_at)
        )
