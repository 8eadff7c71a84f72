"""Operations endpoints: health (the watcher's lag included)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request

from custody.api.deps import (
    SessionDep,
)
from custody.db.models import ChainCursor

router = APIRouter(prefix="/v1")


@router.get("/health", tags=["ops"])
def health(request: Request, session: SessionDep) -> dict[str, Any]:
    """Liveness plus the watcher's position: its last block and how far it lags the node.
    It needs no key and declares no error of its own (a database fault is a plain 500)."""
    cursor = session.get(ChainCursor, 1)
    watcher: dict[str, Any] | None = None
    if cursor is not None:
        updated = (
            cursor.updated_at if cursor.updated_at.tzinfo else cursor.updated_at.replace(tzinfo=UTC)
        )
        watcher = {
            "height": cursor.height,
            "block_hash": cursor.block_hash,
            "node_tip_height": cursor.node_tip_height,
            "lag_blocks": max(0, cursor.node_tip_height - cursor.height),
            "seconds_since_step": round((datetime.now(UTC) - updated).total_seconds(), 3),
        }
    return {"status": "ok", "network": request.app.state.settings.network, "watcher": watcher}
