"""What `/v1/health` shows of the deposit watcher: where it is, when it last got through
a step, its last error, and whether it is stalled. Read in one short read transaction,
closed before the caller asks the node anything."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session

from custody.db.models import as_utc
from custody.db.session import transaction
from custody.watcher import repository


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


@dataclass(frozen=True)
class WatcherHealth:
    """The cursor and lease rows as the watcher last wrote them."""

    height: int | None
    block_hash: str | None
    seen_tip_height: int | None  # the node's tip when the watcher last wrote its cursor
    last_block_at: datetime | None  # the cursor's last move
    holder: str | None
    lease_expires_at: datetime | None
    last_step_at: datetime | None
    last_error: str | None
    last_error_kind: str | None
    last_error_at: datetime | None
    failed_steps: int
    stalled_since: datetime | None

    @property
    def last_progress(self) -> datetime | None:
        """A successful step or an applied block (a long catch-up is one step)."""
        moments = [m for m in (self.last_step_at, self.last_block_at) if m is not None]
        return max(moments) if moments else None

    def stalled(self, now: datetime, quiet_limit: timedelta) -> bool:
        """The watcher said so (its steps failed too often in a row), or it has shown no
        progress for `quiet_limit` (dead, hung, or unable to record its own failures)."""
        if self.stalled_since is not None:
            return True
        progress = self.last_progress
        return progress is not None and now - progress > quiet_limit

    def as_dict(
        self, now: datetime, quiet_limit: timedelta, node_tip: int | None
    ) -> dict[str, Any]:
        progress = self.last_progress
        tip = node_tip if node_tip is not None else self.seen_tip_height
        return {
            "height": self.height,
            "block_hash": self.block_hash,
            "node_tip_height": self.seen_tip_height,
            "lag_blocks": None if tip is None or self.height is None else max(0, tip - self.height),
            "seconds_since_step": None
            if progress is None
            else round((now - progress).total_seconds(), 3),
            "last_step_at": _iso(self.last_step_at),
            "last_block_at": _iso(self.last_block_at),
            "last_error": None
            if self.last_error is None
            else {
                "message": self.last_error,
                "kind": self.last_error_kind,
                "at": _iso(self.last_error_at),
            },
            "failed_steps": self.failed_steps,
            "stalled": self.stalled(now, quiet_limit),
            "stalled_since": _iso(self.stalled_since),
            "holder": self.holder,
            "lease_expires_at": _iso(self.lease_expires_at),
        }


def read_health(engine: Engine) -> WatcherHealth | None:
    """The watcher's rows, or None before any watcher ran on this database."""
    with transaction(engine, write=False) as session:
        return health_in(session)


def health_in(session: Session) -> WatcherHealth | None:
    """`read_health` in the caller's transaction (a metrics scrape reads it with the rest)."""
    cursor = repository.cursor(session)
    lease = repository.lease(session)
    if cursor is None and lease is None:
        return None
    return WatcherHealth(
        height=None if cursor is None else cursor.height,
        block_hash=None if cursor is None else cursor.block_hash,
        seen_tip_height=None if cursor is None else cursor.node_tip_height,
        last_block_at=None if cursor is None else as_utc(cursor.updated_at),
        holder=None if lease is None else lease.holder,
        lease_expires_at=None if lease is None else as_utc(lease.expires_at),
        last_step_at=None if lease is None else as_utc(lease.last_step_at),
        last_error=None if lease is None else lease.last_error,
        last_error_kind=None if lease is None else lease.last_error_kind,
        last_error_at=None if lease is None else as_utc(lease.last_error_at),
        failed_steps=0 if lease is None else lease.failed_steps,
        stalled_since=None if lease is None else as_utc(lease.stalled_since),
    )
