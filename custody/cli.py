"""`custody` command line: the API, schema migrations, access bootstrap, audit verification."""

from __future__ import annotations

import json
import threading
from decimal import Decimal
from typing import Annotated

import typer
from sqlmodel import Session

from custody.chain.rpc import NodeRpc
from custody.config import Settings, get_settings
from custody.db.migrate import upgrade
from custody.db.models import Role
from custody.db.session import make_engine, transaction
from custody.hwi_cli import hwi_app
from custody.logging import configure_logging

app = typer.Typer(
    help="Pledge custody: Bitcoin loan collateral in 2-of-3 escrow.", no_args_is_help=True
)
audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(hwi_app, name="hwi")


def _settings() -> Settings:
    configure_logging()
    return get_settings()


def _node(settings: Settings) -> NodeRpc:
    return NodeRpc(
        settings.node_rpc_url,
        settings.node_rpc_user,
        settings.node_rpc_password.get_secret_value(),
        timeout=settings.node_rpc_timeout,
    )


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema to the latest revision."""
    settings = _settings()
    upgrade(make_engine(settings.database_url))
    typer.echo("schema is at the latest revision")


@app.command("create-admin")
def create_admin(name: Annotated[str, typer.Argument(help="the admin's name")]) -> None:
    """Create an admin principal and print its API key (shown once, stored hashed)."""
    from custody.auth.service import create_principal

    settings = _settings()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    with transaction(engine) as session:
        _, api_key = create_principal(
            session, name=name, role=Role.admin, party_id=None, actor="cli"
        )
    typer.echo(api_key)


@app.command()
def serve() -> None:
    """Run the HTTP API (loopback by default: CUSTODY_API_HOST/CUSTODY_API_PORT)."""
    import uvicorn

    from custody.api.app import create_app
    from custody.signer.factory import signer_from_settings

    settings = _settings()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    api = create_app(settings, engine, signer=signer_from_settings(settings), chain=_node(settings))
    uvicorn.run(api, host=settings.api_host, port=settings.api_port, log_level="info")


@app.command()
def watch(
    once: Annotated[bool, typer.Option(help="apply what is there, then exit")] = False,
) -> None:
    """Follow the node and record deposits (one watcher per database)."""
    import signal
    import threading

    from custody.chain.watcher import Watcher, WatcherConfig

    settings = _settings()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    watcher = Watcher(
        engine,
        _node(settings),
        config=WatcherConfig(
            confirmations_small=settings.confirmations_small,
            confirmations_large=settings.confirmations_large,
            large_deposit_sats=settings.large_deposit_sats,
            start_height=settings.watch_start_height,
            lease_seconds=settings.watch_lease_seconds,
        ),
    )
    if once:
        watcher.acquire()
        try:
            result = watcher.step()
        finally:
            watcher.release()
        typer.echo(json.dumps(result.__dict__))
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    watcher.run(stop, poll_seconds=settings.watch_poll_seconds)


@app.command()
def risk(
    once: Annotated[bool, typer.Option(help="one pass, print the report, exit")] = False,
) -> None:
    """The risk engine: LTV of every open loan at the median price; margin calls, cures,
    automatic liquidations (signed by the bank's HSM under its policy)."""
    import dataclasses
    import threading
    from datetime import timedelta

    from custody.risk.engine import RiskEngine
    from custody.risk.manual import DbManualPriceSource
    from custody.risk.prices import HttpJsonPriceSource, MedianPriceSource, PriceSource
    from custody.signer.factory import signer_from_settings
    from custody.signing.service import FeePolicy

    settings = _settings()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    sources: list[PriceSource] = [DbManualPriceSource(engine)]
    sources += [
        HttpJsonPriceSource(c.name, c.url, c.field_path, timeout=c.timeout, time_path=c.time_path)
        for c in settings.price_sources
    ]
    prices = MedianPriceSource(
        sources,
        max_age=timedelta(seconds=settings.price_max_age_seconds),
        max_spread_bps=settings.price_max_spread_bps,
        min_sources=settings.price_min_sources,
    )
    fees = FeePolicy(
        floor_sat_vb=Decimal(str(settings.fee_rate_floor_sat_vb)),
        ceiling_sat_vb=Decimal(str(settings.fee_rate_ceiling_sat_vb)),
        max_fee_sats=settings.max_fee_sats,
    )
    engine_ = RiskEngine(
        engine,
        network=settings.network,
        prices=prices,
        chain=_node(settings),
        signer=signer_from_settings(settings),
        fees=fees,
    )
    if once:
        typer.echo(json.dumps(dataclasses.asdict(engine_.run_once()), default=str))
        return
    stop = threading.Event()
    _stop_on_signals(stop)
    while not stop.is_set():
        report = engine_.run_once()
        if report.margin_calls or report.cured or report.liquidations or report.errors:
            typer.echo(json.dumps(dataclasses.asdict(report), default=str))
        stop.wait(settings.risk_poll_seconds)


@app.command()
def notify() -> None:
    """Deliver queued webhooks (signed, retried with backoff) until stopped."""
    import threading

    import httpx

    from custody.notify.delivery import DeliveryWorker

    settings = _settings()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    stop = threading.Event()
    _stop_on_signals(stop)
    with httpx.Client(timeout=10.0, follow_redirects=False) as client:
        DeliveryWorker(engine, client).run(stop, poll=1.0)


def _stop_on_signals(stop: threading.Event) -> None:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the audit hash chain; exit 1 and name the first broken link if any."""
    from custody.audit.service import verify_chain

    settings = _settings()
    with Session(make_engine(settings.database_url)) as session:
        report = verify_chain(session)
    typer.echo(json.dumps(report.as_dict()))
    if not report.ok:
        raise typer.Exit(code=1)


if __name__ == "__main__":
    app()
