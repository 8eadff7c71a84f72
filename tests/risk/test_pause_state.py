"""The risk engine's pause, as the audit log (and so the API's `custody_risk_paused`)
records it, survives a restart: an engine started while the last record says paused
records the resumption once the price is usable, and does not repeat a pause already on
record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from custody.db.models import AuditEvent
from custody.risk.engine import RiskEngine
from custody.signing.chain import FeePolicy


@dataclass
class _Quote:
    price_rub_per_btc: str = "8000000"
    source: str = "test"


@dataclass
class _Consensus:
    quote: Any
    usable: bool
    reason: str | None


class _Prices:
    def __init__(self, usable: bool) -> None:
        self.usable = usable

    def consensus(self) -> _Consensus:
        if self.usable:
            return _Consensus(_Quote(), True, None)
        return _Consensus(None, False, "no usable price")


def _risk(engine: Engine, prices: _Prices) -> RiskEngine:
    chain: Any = None  # no open loan: the node is never asked
    return RiskEngine(
        engine, network="regtest", prices=prices, chain=chain, signer=None, fees=FeePolicy()
    )


def _pause_events(engine: Engine) -> list[str]:
    with Session(engine) as s:
        return list(
            s.exec(
                select(AuditEvent.action)
                .where(col(AuditEvent.action).in_(("risk.paused", "risk.resumed")))
                .order_by(col(AuditEvent.id))
            ).all()
        )


def test_a_restarted_engine_records_the_resumption(engine: Engine) -> None:
    prices = _Prices(usable=False)
    assert _risk(engine, prices).run_once().paused == "no usable price"
    assert _risk(engine, prices).run_once().paused  # restarted, still paused: not repeated
    assert _pause_events(engine) == ["risk.paused"]
    prices.usable = True
    restarted = _risk(engine, prices)
    assert restarted.run_once().paused is None
    restarted.run_once()
    assert _pause_events(engine) == ["risk.paused", "risk.resumed"]
    assert _risk(engine, prices).run_once().paused is None  # nothing to resume
    assert _pause_events(engine) == ["risk.paused", "risk.resumed"]
