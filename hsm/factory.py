"""Builds the signer from its own settings: the one place the PIN is read and the
token, the registry, the node and the price sources are put together."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta

from hsm.core import HsmBackend, NodeView, SignerCore, now_utc
from hsm.node import NodeReader
from hsm.prices import HttpPriceSource, parse_sources
from hsm.registry import Registry
from hsm.settings import SignerSettings

__all__ = ["build_core"]


def build_core(
    settings: SignerSettings,
    *,
    hsm: HsmBackend | None = None,
    registry: Registry | None = None,
    node: NodeView | None = None,
    clock: Callable[[], datetime] = now_utc,
) -> SignerCore:
    """A SignerCore from settings. `hsm`, `registry` and `node` may be passed in (tests
    share a SoftHSM token); whatever is built here is the caller's to close
    (`core.close()`)."""
    if hsm is None:
        from hsm.pkcs11_backend import Pkcs11Signer

        hsm = Pkcs11Signer(settings.module, settings.token_label, settings.pin)
    if registry is None:
        registry = Registry(settings.state_db)
    if node is None:
        node = NodeReader(
            settings.node_rpc_url,
            settings.node_rpc_user,
            settings.node_rpc_password.get_secret_value(),
            timeout=settings.node_rpc_timeout,
        )
    sources = [
        HttpPriceSource(config, clock=clock)
        for config in parse_sources(json.dumps(settings.price_sources))
    ]
    return SignerCore(
        network=settings.network,
        hsm=hsm,
        registry=registry,
        node=node,
        price_sources=sources,
        price_max_age=timedelta(seconds=settings.price_max_age_seconds),
        price_max_spread_bps=settings.price_max_spread_bps,
        price_min_sources=settings.price_min_sources,
        desk_max_age=timedelta(seconds=settings.desk_quote_max_age_seconds),
        daily_limit_sats=settings.daily_limit_sats,
        max_fee_sats=settings.max_fee_sats,
        max_fee_rate_sat_vb=settings.max_fee_rate_sat_vb,
        approval_ttl=timedelta(seconds=settings.approval_ttl_seconds),
        valuation_max_age=timedelta(seconds=settings.valuation_max_age_seconds),
        address_gap=settings.address_gap,
        cure_watch_gap=timedelta(seconds=settings.cure_watch_gap_seconds),
        clock=clock,
    )
