"""Operations endpoints: health (the node's tip now, the watcher's position and stalls),
and the same figures as Prometheus metrics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from custody.api.errors import errors_for
from custody.chain.rpc import NodeRpc
from custody.config import Settings
from custody.watcher.health import read_health
from custody.workers.service import workers_health

router = APIRouter(prefix="/v1")


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


def _health(request: Request) -> dict[str, Any]:
    settings: Settings = request.app.state.settings
    engine = request.app.state.engine
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
    """The health figures in Prometheus' text format (no key, like health: serve it on
    loopback or behind the scraper's network)."""
    registry = CollectorRegistry()
    registry.register(_HealthCollector(_health(request)))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
