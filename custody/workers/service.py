"""A worker's heartbeat, and what `/v1/health` shows of the workers.

Why in the database: a worker (`custody risk`, `custody notify`) serves no port, may run
on another host or as several replicas, and what an operator needs to know is the same
for all of them: is each one still going round its loop, when did a pass last get
through, and what failed. Each beat is its own short transaction; a beat that cannot
be written is logged and skipped, never fatal (the database may be what is down, and
the loop retries on its own)."""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.engine import Engine
from sqlmodel import Session

from custody.db.models import WorkerHeartbeat, as_utc
from custody.db.session import transaction
from custody.workers import repository

log = structlog.get_logger("custody.workers")

# A row of a process not heard of for this long is deleted by the next worker to start.
FORGET_AFTER = timedelta(days=1)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


class Heartbeat:
    """This process's row for `kind`: `start` at the loop's start, `beat` after each pass
    (with its error, if the pass failed), `alive` during a long pass (at most every
    `alive_every` seconds), `stop` on a clean exit."""

    def __init__(
        self,
        engine: Engine,
        kind: str,
        *,
        holder: str | None = None,
        alive_every: float = 5.0,
    ) -> None:
        self.engine, self.kind = engine, kind
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.alive_every = alive_every
        self._alive_at = 0.0

    def start(self) -> None:
        now = datetime.now(UTC)

        def write(row: WorkerHeartbeat | None) -> WorkerHeartbeat:
            return WorkerHeartbeat(kind=self.kind, holder=self.holder, started_at=now, beat_at=now)

        self._write(write, forget_before=now - FORGET_AFTER)
        log.info("workers.started", kind=self.kind, holder=self.holder)

    def beat(self, error: BaseException | None = None) -> None:
        """After a pass: its outcome."""
        now = datetime.now(UTC)

        def write(row: WorkerHeartbeat | None) -> WorkerHeartbeat:
            row = row or WorkerHeartbeat(
                kind=self.kind, holder=self.holder, started_at=now, beat_at=now
            )
            row.beat_at, row.passes = now, row.passes + 1
            if error is None:
                row.last_ok_at, row.failed_passes = now, 0
            else:
                message = str(getattr(error, "message", None) or error) or type(error).__name__
                row.last_error = f"{type(error).__name__}: {message}"[:2000]
                row.last_error_at, row.failed_passes = now, row.failed_passes + 1
            return row

        self._write(write)
        self._alive_at = time.monotonic()

    def alive(self) -> None:
        """Within a long pass (a thousand liquidations): still going, at most every
        `alive_every` seconds."""
        if time.monotonic() - self._alive_at < self.alive_every:
            return
        now = datetime.now(UTC)

        def write(row: WorkerHeartbeat | None) -> WorkerHeartbeat:
            row = row or WorkerHeartbeat(
                kind=self.kind, holder=self.holder, started_at=now, beat_at=now
            )
            row.beat_at = now
            return row

        self._write(write)
        self._alive_at = time.monotonic()

    def stop(self) -> None:
        now = datetime.now(UTC)

        def write(row: WorkerHeartbeat | None) -> WorkerHeartbeat:
            row = row or WorkerHeartbeat(
                kind=self.kind, holder=self.holder, started_at=now, beat_at=now
            )
            row.beat_at = row.stopped_at = now
            return row

        self._write(write)
        log.info("workers.stopped", kind=self.kind, holder=self.holder)

    def _write(
        self,
        change: Any,
        *,
        forget_before: datetime | None = None,
    ) -> None:
        try:
            with transaction(self.engine) as session:
                if forget_before is not None:
                    repository.forget_before(session, forget_before)
                session.add(change(repository.heartbeat(session, self.kind, self.holder)))
        except Exception as exc:  # the database may be what is down: the loop goes on
            log.warning(
                "workers.heartbeat_failed",
                kind=self.kind,
                error=str(exc),
                error_kind=type(exc).__name__,
            )


@dataclass(frozen=True)
class WorkerHealth:
    kind: str
    holder: str
    started_at: datetime
    beat_at: datetime
    last_ok_at: datetime | None
    passes: int
    failed_passes: int
    last_error: str | None
    last_error_at: datetime | None

    def as_dict(self, now: datetime, stale_after: timedelta) -> dict[str, Any]:
        quiet = now - self.beat_at
        return {
            "holder": self.holder,
            "alive": quiet <= stale_after,
            "seconds_since_beat": round(quiet.total_seconds(), 3),
            "started_at": _iso(self.started_at),
            "last_ok_at": _iso(self.last_ok_at),
            "passes": self.passes,
            "failed_passes": self.failed_passes,
            "last_error": None
            if self.last_error is None
            else {"message": self.last_error, "at": _iso(self.last_error_at)},
        }


def read_workers(engine: Engine, now: datetime) -> list[WorkerHealth]:
    """The running workers' rows (not stopped, heard of within `FORGET_AFTER`), in one
    short read transaction."""
    with transaction(engine, write=False) as session:
        return workers_in(session, now)


def workers_in(session: Session, now: datetime) -> list[WorkerHealth]:
    """`read_workers` in the caller's transaction (a console page reads it with the rest)."""
    rows = repository.running(session, now - FORGET_AFTER)
    out = []
    for row in rows:
        started, beat = as_utc(row.started_at), as_utc(row.beat_at)
        assert started is not None and beat is not None
        out.append(
            WorkerHealth(
                kind=row.kind,
                holder=row.holder,
                started_at=started,
                beat_at=beat,
                last_ok_at=as_utc(row.last_ok_at),
                passes=row.passes,
                failed_passes=row.failed_passes,
                last_error=row.last_error,
                last_error_at=as_utc(row.last_error_at),
            )
        )
    return out


def workers_health(
    engine: Engine, now: datetime, stale_after: dict[str, timedelta]
) -> dict[str, list[dict[str, Any]]]:
    """`{kind: [process, ...]}` for every kind in `stale_after`, each process `alive` if it
    beat within its kind's limit."""
    found: dict[str, list[dict[str, Any]]] = {kind: [] for kind in stale_after}
    for worker in read_workers(engine, now):
        limit = stale_after.get(worker.kind)
        if limit is not None:
            found[worker.kind].append(worker.as_dict(now, limit))
    return found
