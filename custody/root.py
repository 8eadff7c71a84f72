"""The composition root: settings, database engine, node client, bank signer, fee policy
and price sources are built here, once, for every process (`custody serve | watch | risk |
notify`), the demo, the benchmarks and the tests. Nothing else wires these parts by hand: a
caller that made a part itself (the demo's in-process signer over SoftHSM, a test's price
feed) hands it over with `Root.assemble`, and everything else is built from the settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from custody.chain.rpc import NodeRpc
from custody.config import Settings
from custody.db.migrate import upgrade
from custody.db.session import make_engine
from custody.signing.chain import FeePolicy

if TYPE_CHECKING:
    from fastapi import FastAPI

    from custody.risk.engine import Notify, Prices, RiskEngine
    from custody.risk.manual import Feeds
    from custody.risk.prices import MedianPriceSource, PriceSource
    from custody.screening.service import Screener
    from custody.signer.reconcile import Reconciler
    from custody.watcher.service import Watcher
    from hsm.client import BankSigner

__all__ = ["Root"]


@dataclass
class Root:
    """One process's parts, each built on first use and kept."""

    settings: Settings
    _closers: list[object] = field(default_factory=list, repr=False)

    @classmethod
    def assemble(
        cls,
        settings: Settings,
        *,
        engine: Engine | None = None,
        node: NodeRpc | None = None,
        signer: BankSigner | None = None,
        prices: Prices | None = None,
        price_feeds: Feeds | None = None,
        fees: FeePolicy | None = None,
    ) -> Root:
        """A root with some parts already made (by the demo, a benchmark or a test); the
        caller keeps closing what it made. `signer=None` means: built from the settings."""
        root = cls(settings)
        given: dict[str, object] = {
            "engine": engine,
            "node": node,
            "signer": signer,
            "prices": prices,
            "price_feeds": price_feeds,
            "fees": fees,
        }
        for name, part in given.items():
            if part is not None:
                root.__dict__[name] = part  # what the cached_property would have built
        return root

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
            rest={"auto": None, "on": True, "off": False}[s.node_rest],
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
        return FeePolicy.from_settings(self.settings)

    @cached_property
    def _http_price_sources(self) -> list[PriceSource]:
        from custody.risk.prices import HttpJsonPriceSource

        return [
            HttpJsonPriceSource(
                c.name, c.url, c.field_path, timeout=c.timeout, time_path=c.time_path
            )
            for c in self.settings.price_sources
        ]

    def _median(self, sources: list[PriceSource], min_sources: int) -> MedianPriceSource:
        from custody.risk.prices import MedianPriceSource

        s = self.settings
        return MedianPriceSource(
            sources,
            max_age=timedelta(seconds=s.price_max_age_seconds),
            max_spread_bps=s.price_max_spread_bps,
            min_sources=min_sources,
            future_skew=timedelta(seconds=s.price_future_skew_seconds),
        )

    @cached_property
    def prices(self) -> Prices:
        """What the risk engine prices loans by: the median of the confirmed manual price
        and the HTTP sources."""
        from custody.risk.manual import DbManualPriceSource

        sources: list[PriceSource] = [DbManualPriceSource(self.engine), *self._http_price_sources]
        return self._median(sources, self.settings.price_min_sources)

    @cached_property
    def price_feeds(self) -> Feeds | None:
        """The HTTP sources alone (never the manual price), which a manual price is held
        to; None when none is configured."""
        feeds = self._http_price_sources
        if not feeds:
            return None
        return self._median(feeds, min(self.settings.price_min_sources, len(feeds)))

    def app(self) -> FastAPI:
        from custody.api.app import create_app

        return create_app(
            self.settings,
            self.engine,
            signer=self.signer,
            chain=self.node,
            fees=self.fees,
            price_feeds=self.price_feeds,
        )

    def watcher(self, *, holder: str | None = None) -> Watcher:
        from custody.watcher.service import Watcher, WatcherConfig

        s = self.settings
        return Watcher(
            self.engine,
            self.node,
            holder=holder,
            config=WatcherConfig(
                confirmations_small=s.confirmations_small,
                confirmations_large=s.confirmations_large,
                large_deposit_sats=s.large_deposit_sats,
                start_height=s.watch_start_height,
                lease_seconds=s.watch_lease_seconds,
                stuck_seconds=s.watch_stuck_seconds,
                stall_steps=s.watch_stall_polls,
            ),
            screener=self.screener,
        )

    @cached_property
    def screener(self) -> Screener:
        """The AML screening providers the settings choose (the built-in one always)."""
        from custody.screening.service import Screener, ScreeningConfig

        return Screener(ScreeningConfig.from_settings(self.settings), self.node)

    def risk_engine(self, *, notify: Notify | None = None) -> RiskEngine:
        from custody.risk.engine import RiskEngine

        return RiskEngine(
            self.engine,
            network=self.settings.network,
            prices=self.prices,
            chain=self.node,
            signer=self.signer,
            fees=self.fees,
            notify=notify,
            unsigned_grace=timedelta(seconds=self.settings.risk_unsigned_grace_seconds),
            screener=self.screener,
            concurrency=self.settings.risk_pass_concurrency,
        )

    def reconciler(self) -> Reconciler:
        from custody.signer.reconcile import Reconciler

        return Reconciler(
            self.engine,
            network=self.settings.network,
            chain=self.node,
            signer=self.signer,
            grace=timedelta(seconds=self.settings.reconcile_grace_seconds),
        )

    def close(self) -> None:
        for part in reversed(self._closers):
            close = getattr(part, "close", None)
            if close is not None:
                close()
        self._closers.clear()
