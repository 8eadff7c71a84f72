"""Price endpoints: the desk's manual BTC/RUB price."""

from __future__ import annotations

from fastapi import APIRouter

from custody.api.deps import (
    ContextDep,
    SessionDep,
)
from custody.api.errors import BODY_ERRORS, errors_for
from custody.auth.policy import require_role
from custody.db.models import Role
from custody.errors import PriceNotSet, RoleNotAllowed
from custody.risk import manual as manual_prices
from custody.risk import repository
from custody.risk.schemas import PriceOut, PriceSet
from pledge.errors import InvalidInput, NotAuthenticated

router = APIRouter(prefix="/v1")


@router.post(
    "/prices",
    status_code=201,
    tags=["risk"],
    responses=errors_for(NotAuthenticated, RoleNotAllowed, InvalidInput, *BODY_ERRORS),
)
def set_price(body: PriceSet, session: SessionDep, ctx: ContextDep) -> PriceOut:
    """Bank staff set the manual BTC/RUB price (audited); the risk engine reads it."""
    row = manual_prices.set_price(session, ctx, body.price_rub_per_btc, body.quoted_at)
    return PriceOut(
        price_rub_per_btc=row.price_rub_per_btc,
        source=row.source,
        quoted_at=row.quoted_at,
        set_by=row.set_by,
    )


@router.get(
    "/prices/latest",
    tags=["risk"],
    responses=errors_for(NotAuthenticated, InvalidInput, RoleNotAllowed, PriceNotSet),
)
def latest_price(session: SessionDep, ctx: ContextDep) -> PriceOut:
    require_role(ctx.principal, Role.bank_operator, Role.bank_approver, Role.auditor, Role.admin)
    row = repository.latest_price(session)
    if row is None:
        raise PriceNotSet("no price has been set")
    return PriceOut(
        price_rub_per_btc=row.price_rub_per_btc,
        source=row.source,
        quoted_at=row.quoted_at,
        set_by=row.set_by,
    )
