"""Operations endpoints: health (the node's tip now, the watcher's position and stalls)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request

from custody.chain.rpc import NodeRpc
from custody.config import Settings
from custody.watcher.health import read_health

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


@router.get("/health", tags=["ops"])
def health(request: Request) -> dict[str, Any]:
    """Liveness, the node's tip read now, and the watcher: its height, its lag, the time
    of its last successful step, its last error and whether it is stalled (no progress
    for `watch_stall_polls` polls, or that many failed steps in a row). The database is
    read and its transaction closed before the node is asked. It needs no key and
    declares no error of its own (a database fault is a plain 500)."""
    settings: Settings = request.app.state.settings
    watcher = read_health(request.app.state.engine)
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
    }
