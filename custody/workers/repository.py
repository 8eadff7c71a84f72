"""The heartbeat rows' queries."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete
from sqlmodel import Session, col, select

from custody.db.models import WorkerHeartbeat


def heartbeat(session: Session, kind: str, holder: str) -> WorkerHeartbeat | None:
    return session.get(WorkerHeartbeat, (kind, holder))


def running(session: Session, since: datetime) -> list[WorkerHeartbeat]:
    """Rows of processes that have not said they stopped and beat since `since`."""
    statement = (
        select(WorkerHeartbeat)
        .where(col(WorkerHeartbeat.stopped_at).is_(None), col(WorkerHeartbeat.beat_at) >= since)
        .order_by(col(WorkerHeartbeat.kind), col(WorkerHeartbeat.holder))
    )
    return list(session.exec(statement).all())


def forget_before(session: Session, before: datetime) -> int:
    """Drop the rows of processes last heard of before `before` (killed long ago)."""
    result = session.execute(delete(WorkerHeartbeat).where(col(WorkerHeartbeat.beat_at) < before))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
