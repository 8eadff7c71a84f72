"""Operations endpoints: health (the node's tip now, the watcher's position and stalls),
and Prometheus metrics: the health figures, the database's figures read at scrape time,
and the API's request latency (`custody.api.metrics`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from sqlmodel import Session

from custody.api.errors import errors_for
from custody.api.metrics import request_registry
from custody.chain.rpc import NodeRpc
from custody.config import Settings
from custody.db.models import DepositState, RequestState
from custody.db.session import transaction
from custody.notify import repository as notify_repository
from custody.risk import repository as risk_repository
from custody.signing import repository as signing_repository
from custody.watcher import repository as watcher_repository
from custody.watcher.health import WatcherHealth, health_in, read_health
from custody.workers.service import workers_health

router = APIRouter(prefix="/v1")


class _Unread:
    """The watcher's rows are not read yet (None means: no watcher ever ran)."""


_UNREAD = _Unread()


def _node(chain: object, timeout: float) -> dict[str, Any]:
    """The node's tip, asked now with a short timeout; if it cannot be asked, why."""
    if not isinstance(chain, NodeRpc):
        return {"reachable": False, "tip_height": None, "error": "no node is configured"}
    try:
        return {"reachable": True, "tip_height": chain.get_block_count(timeout=timeout)}
    except Exception as exc:  # any failure to ask is an answer here, not an error
        message = str(getattr(exc, "message", None) or exc) or type(exc).__name__
        return {"reachable": False, "tip_height": None, "error": message}


@router.get("/health", tags=["ops"], responses=errors_for())
def health(request: Request) -> dict[str, Any]:
    """Liveness, the node's tip read now, and the watcher: its height, its lag, the time
    of its last successful step, its last error and whether it is stalled (no progress
    for `watch_stall_polls` polls, or that many failed steps in a row); and each running
    `custody risk` and `custody notify` process: alive (beat within
    `worker_stale_seconds`), its last good pass and its last error. The database is
    read and its transactions closed before the node is asked. It needs no key and
    declares no error of its own, only what any route may answer (500, 503 `busy`)."""
    return _health(request)


def _health(request: Request, watcher: WatcherHealth | _Unread | None = _UNREAD) -> dict[str, Any]:
    settings: Settings = request.app.state.settings
    engine = request.app.state.engine
    if isinstance(watcher, _Unread):
        watcher = read_health(engine)
    stale = timedelta(seconds=settings.worker_stale_seconds)
    workers = workers_health(engine, datetime.now(UTC), {"risk": stale, "notify": stale})
    node = _node(getattr(request.app.state, "chain", None), settings.health_node_timeout_seconds)
    now = datetime.now(UTC)
    quiet_limit = timedelta(seconds=settings.watch_stall_polls * settings.watch_poll_seconds)
    return {
        "status": "ok",
        "network": settings.network,
        "node": node,
        "watcher": None
        if watcher is None
        else watcher.as_dict(now, quiet_limit, node["tip_height"]),
        "workers": workers,
    }


# name, help, where in the health body (watcher figures; booleans as 0/1)
_WATCHER_GAUGES = (
    ("custody_watcher_height", "Height the watcher has applied up to", "height"),
    ("custody_watcher_lag_blocks", "Blocks between the node's tip and the watcher", "lag_blocks"),
    (
        "custody_watcher_seconds_since_step",
        "Seconds since the watcher last made progress",
        "seconds_since_step",
    ),
    ("custody_watcher_failed_steps", "Watcher steps failed in a row", "failed_steps"),
    ("custody_watcher_stalled", "1 while the watcher is stalled", "stalled"),
)


class _HealthCollector(Collector):
    """The health body as gauges, read once per scrape."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def collect(self) -> Any:
        node = self.body["node"]
        yield GaugeMetricFamily(
            "custody_node_reachable", "1 if the node answered this scrape", int(node["reachable"])
        )
        if node["tip_height"] is not None:
            yield GaugeMetricFamily(
                "custody_node_tip_height", "The node's tip, read now", node["tip_height"]
            )
        watcher = self.body["watcher"]
        for name, text, key in _WATCHER_GAUGES if watcher is not None else ():
            if watcher[key] is not None:
                yield GaugeMetricFamily(name, text, float(watcher[key]))


@router.get(
    "/metrics",
    tags=["ops"],
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **errors_for(),
    },
)
def metrics(request: Request) -> Response:
    """Request latency by route template and status (every worker's), the database's
    figures (deposits and signing requests by state, the webhook outbox, the price's age,
    the risk engine's pause) and the health figures, in Prometheus' text format. The
    database is read in one short read transaction, closed before the node is asked. No
    key, like health: serve it on loopback or behind the scraper's network."""
    with transaction(request.app.state.engine, write=False) as session:
        figures = read_figures(session, datetime.now(UTC))
        watcher = health_in(session)
    registry = CollectorRegistry()
    registry.register(_HealthCollector(_health(request, watcher)))
    registry.register(_FiguresCollector(figures))
    body = generate_latest(registry) + generate_latest(request_registry())
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@dataclass(frozen=True)
class Figures:
    """What a scrape reads of the database, at `now`."""

    deposits: dict[str, int]
    requests: dict[str, int]
    oldest_open_request_age: float | None
    outbox_backlog: int
    outbox_oldest_age: float | None
    outbox_dead: int
    price_age: float | None
    risk_paused: bool | None  # None: the engine never recorded a pause or its end


def _age(now: datetime, moment: datetime | None) -> float | None:
    if moment is None:
        return None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return max(0.0, (now - moment).total_seconds())


def read_figures(session: Session, now: datetime) -> Figures:
    """The database's figures, read in the caller's transaction."""
    backlog, oldest = notify_repository.outbox_backlog(session)
    price = risk_repository.latest_price(session)
    pause = risk_repository.last_pause_change(session)
    return Figures(
        deposits=watcher_repository.deposits_by_state(session),
        requests=signing_repository.requests_by_state(session),
        oldest_open_request_age=_age(now, signing_repository.oldest_open_request_at(session)),
        outbox_backlog=backlog,
        outbox_oldest_age=_age(now, oldest),
        outbox_dead=notify_repository.outbox_dead_count(session),
        price_age=None if price is None else _age(now, price.quoted_at),
        risk_paused=None if pause is None else pause.action == "risk.paused",
    )


class _FiguresCollector(Collector):
    """The database's figures as gauges; every state is named, the empty ones as 0."""

    def __init__(self, figures: Figures) -> None:
        self.figures = figures

    def collect(self) -> Any:
        f = self.figures
        deposits = GaugeMetricFamily("custody_deposits", "Deposits by state", labels=["state"])
        for state in DepositState:
            deposits.add_metric([state.value], f.deposits.get(state.value, 0))
        yield deposits
        requests = GaugeMetricFamily(
            "custody_signing_requests", "Signing requests by state", labels=["state"]
        )
        for request_state in RequestState:
            requests.add_metric([request_state.value], f.requests.get(request_state.value, 0))
        yield requests
        yield GaugeMetricFamily(
            "custody_signing_request_oldest_open_age_seconds",
            "Age of the oldest signing request still open (awaiting signatures, ready or "
            "broadcast); 0 when none is",
            f.oldest_open_request_age or 0.0,
        )
        yield GaugeMetricFamily(
            "custody_outbox_backlog",
            "Webhook events neither delivered nor dead",
            f.outbox_backlog,
        )
        yield GaugeMetricFamily(
            "custody_outbox_oldest_age_seconds",
            "Age of the oldest webhook event neither delivered nor dead; 0 when none is",
            f.outbox_oldest_age or 0.0,
        )
        yield GaugeMetricFamily(
            "custody_outbox_dead", "Webhook events whose retries ran out", f.outbox_dead
        )
        if f.price_age is not None:
            yield GaugeMetricFamily(
                "custody_price_age_seconds",
                "Seconds since the quote time of the manual price in effect (the last confirmed)",
                f.price_age,
            )
        if f.risk_paused is not None:
            yield GaugeMetricFamily(
                "custody_risk_paused",
                "1 while the risk engine's automatic liquidation is paused, by its last "
                "recorded pause or resumption (`custody risk --metrics-port` says it live)",
                int(f.risk_paused),
            )
