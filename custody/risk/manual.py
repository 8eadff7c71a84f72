"""The manual price: set by bank staff through the API, kept in the database with who
and when (every change audited), and read back by the risk engine as a price source."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy.engine import Engine
from sqlmodel import Session

from custody.audit.service import record
from custody.auth.context import Context
from custody.auth.policy import require_role
from custody.db.models import PriceRecord, Role
from custody.db.session import transaction
from custody.risk.prices import ManualPriceSource, PriceQuote, PriceUnavailable
from custody.risk.repository import latest_price


def set_price(
    session: Session, ctx: Context, price: Decimal, quoted_at: datetime | None = None
) -> PriceRecord:
    require_role(ctx.principal, Role.bank_operator, Role.bank_approver)
    at = quoted_at or datetime.now(UTC)
    quote = ManualPriceSource().set(price, at, ctx.actor)  # the source's own validation
    row = PriceRecord(
        price_rub_per_btc=str(quote.price_rub_per_btc),
        source="manual",
        quoted_at=quote.quoted_at,
        set_by=ctx.actor,
    )
    session.add(row)
    session.flush()
    record(
        session,
        actor=ctx.actor,
        action="price.set",
        data={"price_rub_per_btc": row.price_rub_per_btc, "quoted_at": quote.quoted_at.isoformat()},
    )
    return row


class DbManualPriceSource:
    """The latest staff-set price, as a PriceSource for the median."""

    def __init__(self, engine: Engine, name: str = "manual") -> None:
        self.engine, self.name = engine, name

    def quote(self) -> PriceQuote:
        with transaction(self.engine, write=False) as session:
            row = latest_price(session)
        if row is None:
            raise PriceUnavailable(f"{self.name}: no price has been set")
        at = row.quoted_at if row.quoted_at.tzinfo else row.quoted_at.replace(tzinfo=UTC)
        return PriceQuote(Decimal(row.price_rub_per_btc), f"{self.name}:{row.set_by}", at)
