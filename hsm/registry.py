"""The signer's own records: loan terms, what it signed (velocity) and every decision.

Why the signer keeps its own store instead of asking the custody database: the
point of `hsm serve` is that a compromised API cannot talk the bank's key into a
signature. If the payout addresses or the descriptor came from the API at signing
time, the API could simply re-point a loan. So terms are written here ONCE, when
the loan's key is generated, and the descriptor ONCE, when the keys are complete;
a second, different value is refused (`RegistryConflict`), never overwritten.

Plain `sqlite3` (no dependency on `custody.db`): the signer process must not need
the service's database, drivers or migrations. One connection, guarded by a lock
(FastAPI runs sync endpoints in a thread pool). The decisions table is append-only
by construction: this module has no UPDATE or DELETE on it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from pledge.errors import Conflict

__all__ = [
    "DEFAULT_STATE_DB",
    "STATE_DB_ENV",
    "Decision",
    "LoanRecord",
    "Registry",
    "RegistryConflict",
    "state_db_path",
]

STATE_DB_ENV: Final = "HSM_STATE_DB"
DEFAULT_STATE_DB: Final = "./hsm-state.db"

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS loan (
    loan_ref TEXT PRIMARY KEY,
    network TEXT NOT NULL,
    key_ref TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL UNIQUE,
    miner_return_address TEXT NOT NULL,
    bank_liquidation_address TEXT NOT NULL,
    descriptor TEXT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    loan_ref TEXT NOT NULL REFERENCES loan(loan_ref),
    request_txid TEXT NOT NULL,
    sats INTEGER NOT NULL CHECK (sats >= 0),
    at TEXT NOT NULL,
    PRIMARY KEY (loan_ref, request_txid)
);
CREATE INDEX IF NOT EXISTS usage_at ON usage(at);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    loan_ref TEXT NOT NULL,
    txid TEXT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('signed', 'refused')),
    "check" TEXT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE TRIGGER IF NOT EXISTS decisions_no_update BEFORE UPDATE ON decisions
BEGIN SELECT RAISE(ABORT, 'the decisions log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS decisions_no_delete BEFORE DELETE ON decisions
BEGIN SELECT RAISE(ABORT, 'the decisions log is append-only'); END;
"""


class RegistryConflict(Conflict):
    """A second, different value for something recorded once (terms, descriptor)."""


@dataclass(frozen=True, slots=True)
class LoanRecord:
    """A loan as the signer recorded it: the only source of addresses at signing time."""

    loan_ref: str
    network: str
    key_ref: str
    public_key: bytes
    miner_return_address: str
    bank_liquidation_address: str
    descriptor: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Decision:
    """One line of the decisions log."""

    at: datetime
    loan_ref: str
    txid: str | None
    decision: str
    check: str | None
    reason: str
    detail: dict[str, Any]


def state_db_path() -> Path:
    """`$HSM_STATE_DB`, else `./hsm-state.db`."""
    return Path(os.environ.get(STATE_DB_ENV) or DEFAULT_STATE_DB)


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(when: datetime) -> str:
    """ISO-8601 in UTC with a fixed width, so text comparison is time order."""
    if when.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


class Registry:
    """The signer's SQLite store. Thread-safe; `close()` when done."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.executescript(_SCHEMA)

    @classmethod
    def from_env(cls) -> Registry:
        return cls(state_db_path())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: read-check-write without a race between processes."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- loans ------------------------------------------------------------------------

    @staticmethod
    def _loan(row: sqlite3.Row) -> LoanRecord:
        return LoanRecord(
            loan_ref=row["loan_ref"],
            network=row["network"],
            key_ref=row["key_ref"],
            public_key=bytes.fromhex(row["public_key"]),
            miner_return_address=row["miner_return_address"],
            bank_liquidation_address=row["bank_liquidation_address"],
            descriptor=row["descriptor"],
            created_at=_parse_ts(row["created_at"]),
        )

    def loan(self, loan_ref: str) -> LoanRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM loan WHERE loan_ref = ?", (loan_ref,)).fetchone()
        return None if row is None else self._loan(row)

    def loan_count(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT count(*) FROM loan").fetchone()
        return int(count)

    def record_loan(
        self,
        *,
        loan_ref: str,
        network: str,
        key_ref: str,
        public_key: bytes,
        miner_return_address: str,
        bank_liquidation_address: str,
    ) -> LoanRecord:
        """Record a loan's terms once. The same terms again is a no-op (a retry);
        different terms for a recorded loan raise RegistryConflict."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM loan WHERE loan_ref = ?", (loan_ref,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO loan (loan_ref, network, key_ref, public_key, "
                    "miner_return_address, bank_liquidation_address, descriptor, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
                    (
                        loan_ref,
                        network,
                        key_ref,
                        public_key.hex(),
                        miner_return_address,
                        bank_liquidation_address,
                        _ts(_now()),
                    ),
                )
                row = db.execute("SELECT * FROM loan WHERE loan_ref = ?", (loan_ref,)).fetchone()
        record = self._loan(row)
        wanted = (network, key_ref, public_key, miner_return_address, bank_liquidation_address)
        have = (
            record.network,
            record.key_ref,
            record.public_key,
            record.miner_return_address,
            record.bank_liquidation_address,
        )
        if wanted != have:
            raise RegistryConflict(
                f"loan {loan_ref!r} already has recorded terms; the signer does not change them",
                field="loan_ref",
            )
        return record

    def record_descriptor(self, loan_ref: str, descriptor: str) -> LoanRecord:
        """Record the loan's descriptor once; the same text again is a no-op."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM loan WHERE loan_ref = ?", (loan_ref,)).fetchone()
            if row is None:
                raise RegistryConflict(f"loan {loan_ref!r} has no key in this signer")
            current = row["descriptor"]
            if current is None:
                db.execute(
                    "UPDATE loan SET descriptor = ? WHERE loan_ref = ? AND descriptor IS NULL",
                    (descriptor, loan_ref),
                )
            elif current != descriptor:
                raise RegistryConflict(
                    f"loan {loan_ref!r} already has a different descriptor; the signer does "
                    "not re-point a loan",
                    field="descriptor",
                )
            row = db.execute("SELECT * FROM loan WHERE loan_ref = ?", (loan_ref,)).fetchone()
        return self._loan(row)

    # -- velocity ---------------------------------------------------------------------

    def signed_since(self, since: datetime, *, excluding_txid: str | None = None) -> int:
        """Sats of collateral signed for since `since` (a txid signed twice counts once)."""
        with self._lock:
            (total,) = self._db.execute(
                "SELECT coalesce(sum(sats), 0) FROM usage WHERE at >= ? AND request_txid IS NOT ?",
                (_ts(since), excluding_txid),
            ).fetchone()
        return int(total)

    def already_signed(self, loan_ref: str, txid: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM usage WHERE loan_ref = ? AND request_txid = ?", (loan_ref, txid)
            ).fetchone()
        return row is not None

    def record_usage(self, loan_ref: str, txid: str, sats: int, at: datetime | None = None) -> None:
        """Count a signed transaction against the daily limit (once per txid)."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO usage (loan_ref, request_txid, sats, at) VALUES (?,?,?,?)",
                (loan_ref, txid, sats, _ts(at or _now())),
            )

    def usage_window(self, now: datetime | None = None) -> tuple[datetime, int]:
        """(start of the 24 h window, sats used in it), for health/reporting."""
        since = (now or _now()) - timedelta(hours=24)
        return since, self.signed_since(since)

    # -- decisions --------------------------------------------------------------------

    def log_decision(
        self,
        *,
        loan_ref: str,
        txid: str | None,
        decision: str,
        check: str | None,
        reason: str,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append one decision. `detail` must hold no secrets (callers pass approvals,
        action and fee, never the PIN or the bearer token)."""
        with self._tx() as db:
            db.execute(
                'INSERT INTO decisions (at, loan_ref, txid, decision, "check", reason, detail) '
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    _ts(_now()),
                    loan_ref,
                    txid,
                    decision,
                    check,
                    reason,
                    json.dumps(detail or {}, sort_keys=True, default=str),
                ),
            )

    def decisions(self, loan_ref: str | None = None) -> Sequence[Decision]:
        with self._lock:
            if loan_ref is None:
                rows = self._db.execute("SELECT * FROM decisions ORDER BY id").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM decisions WHERE loan_ref = ? ORDER BY id", (loan_ref,)
                ).fetchall()
        return [
            Decision(
                at=_parse_ts(r["at"]),
                loan_ref=r["loan_ref"],
                txid=r["txid"],
                decision=r["decision"],
                check=r["check"],
                reason=r["reason"],
                detail=json.loads(r["detail"]),
            )
            for r in rows
        ]
