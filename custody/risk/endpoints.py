"""Price endpoints: the desk's manual BTC/RUB price, proposed by one person and confirmed
by a second (`custody.risk.manual` has the rules), and its history.

Proposing and confirming ask the price feeds first, with no transaction open, then write
in a short transaction of their own (so they take `request`, not the request session)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from custody.api.deps import (
    ContextDep,
    PriceId,
    SessionDep,
)
from custody.api.errors import BODY_ERRORS, errors_for
from custody.auth.policy import require_role
from custody.db.models import PriceRecord, as_utc
from custody.db.session import transaction
from custody.errors import (
    PriceFarFromFeeds,
    PriceNotFound,
    PriceNotProposed,
    PriceNotSet,
    PriceProposalExpired,
    PriceQuotedInFuture,
    PriceSuperseded,
    RoleNotAllowed,
    SelfConfirmation,
)
from custody.risk import manual
from custody.risk.schemas import PriceOut, PriceSet
from pledge.errors import InvalidInput, NotAuthenticated

router = APIRouter(prefix="/v1")


def _feeds(request: Request) -> manual.FeedCheck:
    """The feeds' median now (a network call: no transaction is open here)."""
    feeds: manual.Feeds | None = getattr(request.app.state, "price_feeds", None)
    return manual.feed_check(feeds)


def _policy(request: Request) -> manual.PricePolicy:
    return manual.PricePolicy.from_settings(request.app.state.settings)


@router.post(
    "/prices",
    status_code=201,
    tags=["risk"],
    responses=errors_for(
        NotAuthenticated,
        RoleNotAllowed,
        InvalidInput,
        PriceQuotedInFuture,
        PriceFarFromFeeds,
        *BODY_ERRORS,
    ),
)
def propose_price(body: PriceSet, request: Request, ctx: ContextDep) -> PriceOut:
    """Bank staff propose a manual BTC/RUB price (audited). It takes effect only once
    another member of the staff confirms it; refused when dated in the future or far from
    the price feeds' median."""
    require_role(ctx.principal, *manual.DECIDERS)  # before anything is fetched for it
    feeds = _feeds(request)
    with transaction(request.app.state.engine) as session:
        row = manual.propose_price(
            session,
            ctx,
            body.price_rub_per_btc,
            body.quoted_at,
            policy=_policy(request),
            feeds=feeds,
        )
        return price_out(row)


@router.get(
    "/prices",
    tags=["risk"],
    responses=errors_for(NotAuthenticated, InvalidInput, RoleNotAllowed),
)
def price_history(
    session: SessionDep,
    ctx: ContextDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
) -> list[PriceOut]:
    """The manual prices, newest proposal first, with who proposed and who decided (bank
    staff, auditors and the admin only)."""
    rows = manual.price_history(session, ctx, limit=limit, offset=offset)
    return [price_out(row) for row in rows]


@router.get(
    "/prices/latest",
    tags=["risk"],
    responses=errors_for(NotAuthenticated, InvalidInput, RoleNotAllowed, PriceNotSet),
)
def latest_price(session: SessionDep, ctx: ContextDep) -> PriceOut:
    """The manual price in effect: the one confirmed last."""
    return price_out(manual.price_in_effect(session, ctx))


@router.get(
    "/prices/{price_id}",
    tags=["risk"],
    responses=errors_for(NotAuthenticated, InvalidInput, RoleNotAllowed, PriceNotFound),
)
def get_price(price_id: PriceId, session: SessionDep, ctx: ContextDep) -> PriceOut:
    return price_out(manual.get_price(session, ctx, price_id))


# What deciding on a proposal can answer, confirming or rejecting it.
_DECISION_ERRORS = (
    NotAuthenticated,
    RoleNotAllowed,
    InvalidInput,
    PriceNotFound,
    PriceNotProposed,
    PriceProposalExpired,
)


@router.post(
    "/prices/{price_id}/confirm",
    tags=["risk"],
    responses=errors_for(
        *_DECISION_ERRORS,
        SelfConfirmation,
        PriceSuperseded,
        PriceQuotedInFuture,
        PriceFarFromFeeds,
    ),
)
def confirm_price(price_id: PriceId, request: Request, ctx: ContextDep) -> PriceOut:
    """A second member of the bank's staff confirms a proposed price (4-eyes): from then
    on the risk engine uses it. Checked again against the feeds as they are now."""
    require_role(ctx.principal, *manual.DECIDERS)
    feeds = _feeds(request)
    with transaction(request.app.state.engine) as session:
        row = manual.confirm_price(session, ctx, price_id, policy=_policy(request), feeds=feeds)
        return price_out(row)


@router.post(
    "/prices/{price_id}/reject",
    tags=["risk"],
    responses=errors_for(*_DECISION_ERRORS),
)
def reject_price(price_id: PriceId, request: Request, ctx: ContextDep) -> PriceOut:
    """Bank staff turn a proposed price down (its proposer too: a withdrawal)."""
    with transaction(request.app.state.engine) as session:
        return price_out(manual.reject_price(session, ctx, price_id))


def price_out(row: PriceRecord) -> PriceOut:
    assert row.id is not None
    at = as_utc
    return PriceOut(
        id=row.id,
        price_rub_per_btc=row.price_rub_per_btc,
        source=row.source,
        quoted_at=at(row.quoted_at),
        state=manual.shown_state(row),
        proposed_by=row.proposed_by,
        proposed_at=at(row.created_at),
        expires_at=at(row.expires_at) if row.expires_at else None,
        confirmed_by=row.confirmed_by,
        confirmed_at=at(row.confirmed_at) if row.confirmed_at else None,
        rejected_by=row.rejected_by,
        rejected_at=at(row.rejected_at) if row.rejected_at else None,
    )
