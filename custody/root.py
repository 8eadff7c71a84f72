"""The composition root: settings, database engine, node client, bank signer, fee policy
and price sources are built here, once, for every process (`custody serve | watch | risk |
notify`). Nothing else reads the environment or wires these parts by hand."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from functools import cached_property
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from custody.chain.rpc import NodeRpc
from custody.config import Settings
from custody.db.migrate import upgrade
from custody.db.session import make_engine
from custody.signing.service import FeePolicy

if TYPE_CHECKING:
    from fastapi import FastAPI

    from custody.chain.watcher import Watcher
    from custody.risk.engine import RiskEngine
    from custody.risk.prices import MedianPriceSource
    from hsm.client import BankSigner

__all__ = ["Root", "fee_policy"]


def fee_policy(settings: Settings) -> FeePolicy:
    """The fee bounds for transactions the service builds (the API's dependency too)."""
    return FeePolicy(
        floor_sat_vb=Decimal(str(settings.fee_rate_floor_sat_vb)),
        ceiling_sat_vb=Decimal(str(settings.fee_rate_ceiling_sat_vb)),
        max_fee_sats=settings.max_fee_sats,
    )


@dataclass
class Root:
    """One process's parts, each built on first use and kept."""

    settings: Settings
    _closers: list[object] = field(default_factory=list, repr=False)

    @cached_property
    def engine(self) -> Engine:
        s = self.settings
        engine = make_engine(
            s.database_url,
            pool_size=s.db_pool_size,
            max_overflow=s.db_max_overflow,
            pool_timeout=s.db_pool_timeout_seconds,
        )
        upgrade(engine)  # safe to repeat; every process runs it at start
        return engine

    @cached_property
    def node(self) -> NodeRpc:
        s = self.settings
        node = NodeRpc(
            s.node_rpc_url,
            s.node_rpc_user,
            s.node_rpc_password.get_secret_value(),
            timeout=s.node_rpc_timeout,
        )
        self._closers.append(node)
        return node

    @cached_property
    def signer(self) -> BankSigner | None:
        from custody.signer.factory import signer_from_settings

        signer = signer_from_settings(self.settings)
        if signer is not None:
            self._closers.append(signer)
        return signer

    @cached_property
    def fees(self) -> FeePolicy:
        return fee_policy(self.settings)

    @cached_property
    def prices(self) -> MedianPriceSource:
        from custody.risk.manual import DbManualPriceSource
        from custody.risk.prices import HttpJsonPriceSource, MedianPriceSource, PriceSource

        s = self.settings
        sources: list[PriceSource] = [DbManualPriceSource(self.engine)]
        sources += [
            HttpJsonPriceSource(
                c.name, c.url, c.field_path, timeout=c.timeout, time_path=c.time_path
            )
            for c in s.price_sources
        ]
        return MedianPriceSource(
            sources,
            max_age=timedelta(seconds=s.price_max_age_seconds),
            max_spread_bps=s.price_max_spread_bps,
            min_sources=s.price_min_sources,
        )

    def app(self) -> FastAPI:
        from custody.api.app import create_app

        return create_app(self.settings, self.engine, signer=self.signer, chain=self.node)

    def watcher(self) -> Watcher:
        from custody.chain.watcher import Watcher, WatcherConfig

        s = self.settings
        return Watcher(
            self.engine,
            self.node,
            config=WatcherConfig(
                confirmations_small=s.confirmations_small,
                confirmations_large=s.confirmations_large,
                large_deposit_sats=s.large_deposit_sats,
                start_height=s.watch_start_height,
                lease_seconds=s.watch_lease_seconds,
            ),
        )

    def risk_engine(self) -> RiskEngine:
        from custody.risk.engine import RiskEngine

        return RiskEngine(
            self.engine,
            network=self.settings.network,
            prices=self.prices,
            chain=self.node,
            signer=self.signer,
            fees=self.fees,
        )

    def close(self) -> None:
        for part in reversed(self._closers):
            close = getattr(part, "close", None)
            if close is not None:
                close()
        self._closers.clear()
