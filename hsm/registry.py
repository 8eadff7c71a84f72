"""The signer's own records: loans with their terms, people, repayments, valuations,
issued statements, what it signed (velocity) and every decision.

Why the signer keeps its own store instead of asking the custody database: the service
and its database are assumed to be in an attacker's hands. If the payout addresses, the
descriptor, the debt or the approvals came from the service at signing time, the service
could simply re-point a loan. So a loan is written here once, when its bank key is made,
from a statement two enrolled people signed; any later change needs the same approvals
(`amend_loan`), and nothing is ever registered on first use.

Plain `sqlite3` (no dependency on the service's database code): the signer must not need
the service's drivers or migrations. One connection, guarded by a lock (the HTTP server
runs sync endpoints in a thread pool). The decisions table is append-only by construction.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from hsm.signer import PolicyViolation

__all__ = [
    "DEFAULT_STATE_DB",
    "STATE_DB_ENV",
    "BankAccountTaken",
    "Decision",
    "LoanRecord",
    "LoanTerms",
    "PasskeyRecord",
    "Registry",
    "SeedRecord",
    "StatementRecord",
    "parse_ts",
    "state_db_path",
    "ts",
]

STATE_DB_ENV: Final = "HSM_STATE_DB"
DEFAULT_STATE_DB: Final = "./hsm-state.db"
SCHEMA_VERSION: Final = 4
# What each older schema needs to become the next one (applied in order, each in one
# transaction, up to the current one): a state file is upgraded in place, never rebuilt.
_UPGRADES: Final[dict[int, str]] = {
    2: """
ALTER TABLE loan ADD COLUMN bank_key_kind TEXT NOT NULL DEFAULT 'fixed'
    CHECK (bank_key_kind IN ('fixed', 'hd'));
ALTER TABLE loan ADD COLUMN bank_account INTEGER NULL CHECK (bank_account >= 0);
CREATE UNIQUE INDEX IF NOT EXISTS loan_bank_account ON loan(bank_account);
""",
    3: """
-- A person who approves with a passkey (WebAuthn): the credential enrolment named, where
-- it may be used (rp_id, origins) and its signature counter, so an assertion from a cloned
-- authenticator (a counter that does not rise) is refused. The COSE key is person.public_key.
CREATE TABLE IF NOT EXISTS passkey (
    credential_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE REFERENCES person(name),
    rp_id TEXT NOT NULL,
    origins TEXT NOT NULL,
    sign_count INTEGER NOT NULL DEFAULT 0 CHECK (sign_count >= 0),
    last_assertion TEXT NULL,
    last_used_at TEXT NULL
);
""",
}

_SCHEMA: Final = """
-- The output scripts this signer derived from a loan's descriptor (both libraries agreeing)
-- to scan for its coins, so that a restarted signer derives none of them again: a cache of
-- what the descriptor says, keyed by a hash of its text (nothing else is trusted for it).
CREATE TABLE IF NOT EXISTS scan_script (
    descriptor_hash TEXT NOT NULL,
    change INTEGER NOT NULL CHECK (change IN (0, 1)),
    idx INTEGER NOT NULL CHECK (idx >= 0),
    script BLOB NOT NULL,
    PRIMARY KEY (descriptor_hash, change, idx)
);
CREATE TABLE IF NOT EXISTS loan (
    loan_ref TEXT PRIMARY KEY,
    network TEXT NOT NULL,
    key_ref TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL UNIQUE,
    descriptor TEXT NOT NULL UNIQUE,
    terms TEXT NOT NULL,
    miner_return_address TEXT NOT NULL,
    bank_liquidation_address TEXT NOT NULL,
    registered_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    highest_index INTEGER NOT NULL DEFAULT 0 CHECK (highest_index >= 0),
    call_seen_at TEXT NULL,
    last_valued_at TEXT NULL,
    bank_key_kind TEXT NOT NULL DEFAULT 'fixed' CHECK (bank_key_kind IN ('fixed', 'hd')),
    bank_account INTEGER NULL CHECK (bank_account >= 0)
);
CREATE UNIQUE INDEX IF NOT EXISTS loan_bank_account ON loan(bank_account);
-- The bank's BIP-32 seed, only as the token sealed it (AES-256-GCM under a key that never
-- leaves the token): one row. The fingerprint is public (it is in every HD loan's key).
CREATE TABLE IF NOT EXISTS bank_seed (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    fingerprint TEXT NOT NULL,
    key_label TEXT NOT NULL,
    iv TEXT NOT NULL,
    ciphertext TEXT NOT NULL,
    created_at TEXT NOT NULL,
    sealed_at TEXT NOT NULL
);
-- Each SLIP-39 share set made of the seed: who holds a share, how many restore it. The
-- shares themselves are never stored.
CREATE TABLE IF NOT EXISTS seed_backup (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fingerprint TEXT NOT NULL,
    threshold INTEGER NOT NULL CHECK (threshold >= 1),
    officers TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS amendment (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    loan_ref TEXT NOT NULL REFERENCES loan(loan_ref),
    at TEXT NOT NULL,
    statement TEXT NOT NULL,
    by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS person (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    public_key TEXT NOT NULL UNIQUE,
    enrolled_at TEXT NOT NULL,
    removed_at TEXT NULL
);
-- A person who approves with a passkey (WebAuthn): the credential enrolment named, where
-- it may be used (rp_id, origins) and its signature counter, so an assertion from a cloned
-- authenticator (a counter that does not rise) is refused. The COSE key is person.public_key.
CREATE TABLE IF NOT EXISTS passkey (
    credential_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE REFERENCES person(name),
    rp_id TEXT NOT NULL,
    origins TEXT NOT NULL,
    sign_count INTEGER NOT NULL DEFAULT 0 CHECK (sign_count >= 0),
    last_assertion TEXT NULL,
    last_used_at TEXT NULL
);
CREATE TABLE IF NOT EXISTS person_event (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    name TEXT NOT NULL,
    event TEXT NOT NULL,
    by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS repayment (
    loan_ref TEXT NOT NULL REFERENCES loan(loan_ref),
    repayment_id TEXT NOT NULL,
    kopecks INTEGER NOT NULL CHECK (kopecks > 0),
    paid_at TEXT NOT NULL,
    by TEXT NOT NULL,
    PRIMARY KEY (loan_ref, repayment_id)
);
CREATE TABLE IF NOT EXISTS credit (
    loan_ref TEXT NOT NULL REFERENCES loan(loan_ref),
    txid TEXT NOT NULL,
    kopecks INTEGER NOT NULL CHECK (kopecks >= 0),
    at TEXT NOT NULL,
    PRIMARY KEY (loan_ref, txid)
);
CREATE TABLE IF NOT EXISTS valuation (
    id TEXT PRIMARY KEY,
    loan_ref TEXT NOT NULL REFERENCES loan(loan_ref),
    at TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS valuation_loan ON valuation(loan_ref, at);
CREATE TABLE IF NOT EXISTS statement (
    nonce TEXT PRIMARY KEY,
    loan_ref TEXT NOT NULL REFERENCES loan(loan_ref),
    unsigned_txid TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'used', 'cancelled')),
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    loan_ref TEXT NOT NULL,
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
    decision TEXT NOT NULL CHECK (decision IN ('signed', 'refused', 'recorded')),
    "check" TEXT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE TRIGGER IF NOT EXISTS decisions_no_update BEFORE UPDATE ON decisions
BEGIN SELECT RAISE(ABORT, 'the decisions log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS decisions_no_delete BEFORE DELETE ON decisions
BEGIN SELECT RAISE(ABORT, 'the decisions log is append-only'); END;
"""


def _now() -> datetime:
    return datetime.now(UTC)


def ts(when: datetime) -> str:
    """ISO-8601 in UTC with a fixed width, so text comparison is time order."""
    if when.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class LoanTerms:
    """The loan's terms as two bank people signed them: the signer's only source of
    debt, thresholds and confirmations."""

    principal_kopecks: int
    interest_rate_bps: int
    start_at: datetime
    maturity_at: datetime
    margin_call_ltv_bps: int
    liquidation_ltv_bps: int
    cure_window_hours: int
    required_confirmations: int
    target_ltv_bps: int

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["start_at"] = ts(self.start_at)
        body["maturity_at"] = ts(self.maturity_at)
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> LoanTerms:
        return cls(
            **{
                **body,
                "start_at": parse_ts(body["start_at"]),
                "maturity_at": parse_ts(body["maturity_at"]),
            }
        )


@dataclass(frozen=True, slots=True)
class LoanRecord:
    """A loan as the signer recorded it."""

    loan_ref: str
    network: str
    key_ref: str
    public_key: bytes
    descriptor: str
    terms: LoanTerms
    miner_return_address: str
    bank_liquidation_address: str
    registered_by: tuple[str, ...]
    created_at: datetime
    highest_index: int
    call_seen_at: datetime | None
    last_valued_at: datetime | None = None
    bank_key_kind: str = "fixed"  # "hd": the BIP-48 account `bank_account` of the bank seed
    bank_account: int | None = None


class _CounterMoved(Exception):
    """A passkey's counter changed between reading and recording it (rolls back all)."""


class BankAccountTaken(Exception):
    """Another registration took this BIP-48 account of the bank seed first: derive the
    next one and try again (the check runs in the write transaction, so it is exact)."""


@dataclass(frozen=True, slots=True)
class SeedRecord:
    """The sealed bank seed as the registry holds it (ciphertext only)."""

    fingerprint: str
    key_label: str
    iv: bytes
    ciphertext: bytes
    created_at: datetime
    sealed_at: datetime


@dataclass(frozen=True, slots=True)
class PasskeyRecord:
    """A person's passkey as enrolment named it, with what its last use showed."""

    credential_id: str  # base64url, as WebAuthn names it
    name: str
    rp_id: str
    origins: tuple[str, ...]
    sign_count: int
    last_assertion: str | None  # SHA-256 (hex) of the last assertion counted


@dataclass(frozen=True, slots=True)
class StatementRecord:
    nonce: str
    loan_ref: str
    unsigned_txid: str
    body: dict[str, Any]
    state: str
    expires_at: datetime


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


def _descriptor_hash(descriptor: str) -> str:
    return hashlib.sha256(descriptor.encode()).hexdigest()


def state_db_path() -> Path:
    """`$HSM_STATE_DB`, else `./hsm-state.db`."""
    return Path(os.environ.get(STATE_DB_ENV) or DEFAULT_STATE_DB)


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
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            has_tables = self._db.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
            ).fetchone()[0]
            while has_tables and version in _UPGRADES:
                self._db.executescript(
                    "BEGIN IMMEDIATE;"
                    + _UPGRADES[version]
                    + f"PRAGMA user_version = {version + 1};COMMIT;"
                )
                version += 1
            if has_tables and version != SCHEMA_VERSION:
                self._db.close()
                raise RuntimeError(
                    f"the signer's state database {path} has schema version {version}, "
                    f"this signer needs {SCHEMA_VERSION}: restore from a matching backup"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @classmethod
    def from_env(cls) -> Registry:
        return cls(state_db_path())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: read-check-write without a race between processes."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def read_one(self, sql: str, params: Sequence[Any]) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._db.execute(sql, tuple(params)).fetchone()
        return row

    def read_all(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, tuple(params)).fetchall())

    # -- loans ------------------------------------------------------------------------

    @staticmethod
    def _loan(row: sqlite3.Row) -> LoanRecord:
        return LoanRecord(
            loan_ref=row["loan_ref"],
            network=row["network"],
            key_ref=row["key_ref"],
            public_key=bytes.fromhex(row["public_key"]),
            descriptor=row["descriptor"],
            terms=LoanTerms.from_json(json.loads(row["terms"])),
            miner_return_address=row["miner_return_address"],
            bank_liquidation_address=row["bank_liquidation_address"],
            registered_by=tuple(json.loads(row["registered_by"])),
            created_at=parse_ts(row["created_at"]),
            highest_index=int(row["highest_index"]),
            call_seen_at=parse_ts(row["call_seen_at"]) if row["call_seen_at"] else None,
            last_valued_at=parse_ts(row["last_valued_at"]) if row["last_valued_at"] else None,
            bank_key_kind=row["bank_key_kind"],
            bank_account=row["bank_account"],
        )

    def loan(self, loan_ref: str) -> LoanRecord | None:
        row = self.read_one("SELECT * FROM loan WHERE loan_ref = ?", (loan_ref,))
        return None if row is None else self._loan(row)

    def loan_count(self) -> int:
        row = self.read_one("SELECT count(*) AS n FROM loan", ())
        assert row is not None
        return int(row["n"])

    def record_loan(self, record: LoanRecord) -> LoanRecord:
        """Write a new loan. A loan is recorded once; a second registration is refused
        (`amend_loan` changes one, with approvals)."""
        with self.tx() as db:
            if db.execute("SELECT 1 FROM loan WHERE loan_ref = ?", (record.loan_ref,)).fetchone():
                raise PolicyViolation(
                    "loan_registered",
                    f"loan {record.loan_ref!r} is already registered with the signer; "
                    "a change needs an amendment signed by two people",
                    field="loan_ref",
                )
            if db.execute(
                "SELECT 1 FROM loan WHERE descriptor = ?", (record.descriptor,)
            ).fetchone():
                raise PolicyViolation(
                    "loan_registered", "another loan already has this descriptor", field="keys"
                )
            if (
                record.bank_account is not None
                and db.execute(
                    "SELECT 1 FROM loan WHERE bank_account = ?", (record.bank_account,)
                ).fetchone()
            ):
                raise BankAccountTaken(record.bank_account)
            db.execute(
                "INSERT INTO loan (loan_ref, network, key_ref, public_key, descriptor, terms, "
                "miner_return_address, bank_liquidation_address, registered_by, created_at, "
                "bank_key_kind, bank_account) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.loan_ref,
                    record.network,
                    record.key_ref,
                    record.public_key.hex(),
                    record.descriptor,
                    json.dumps(record.terms.to_json(), sort_keys=True),
                    record.miner_return_address,
                    record.bank_liquidation_address,
                    json.dumps(list(record.registered_by)),
                    ts(record.created_at),
                    record.bank_key_kind,
                    record.bank_account,
                ),
            )
        loan = self.loan(record.loan_ref)
        assert loan is not None
        return loan

    def amend_loan(
        self,
        loan_ref: str,
        *,
        terms: LoanTerms,
        miner_return_address: str,
        bank_liquidation_address: str,
        statement: dict[str, Any],
        by: Sequence[str],
        at: datetime,
    ) -> LoanRecord:
        """Apply an amendment once: a statement already applied is refused, or an older
        amendment sent again would revert the payout addresses a newer one set."""
        text = json.dumps(statement, sort_keys=True)
        with self.tx() as db:
            if db.execute(
                "SELECT 1 FROM amendment WHERE loan_ref = ? AND statement = ?", (loan_ref, text)
            ).fetchone():
                raise PolicyViolation(
                    "approval_replayed",
                    "this amendment was already applied: its approvals cannot be used again",
                    field="approvals",
                )
            db.execute(
                "UPDATE loan SET terms = ?, miner_return_address = ?, "
                "bank_liquidation_address = ? WHERE loan_ref = ?",
                (
                    json.dumps(terms.to_json(), sort_keys=True),
                    miner_return_address,
                    bank_liquidation_address,
                    loan_ref,
                ),
            )
            db.execute(
                "INSERT INTO amendment (loan_ref, at, statement, by) VALUES (?, ?, ?, ?)",
                (loan_ref, ts(at), text, ",".join(by)),
            )
        loan = self.loan(loan_ref)
        assert loan is not None
        return loan

    def next_bank_account(self) -> int:
        """The BIP-48 account the next HD loan gets: one past the highest in use."""
        row = self.read_one("SELECT coalesce(max(bank_account), -1) + 1 AS n FROM loan", ())
        assert row is not None
        return int(row["n"])

    # -- the bank seed (sealed) -------------------------------------------------------

    def seed(self) -> SeedRecord | None:
        row = self.read_one("SELECT * FROM bank_seed WHERE id = 1", ())
        if row is None:
            return None
        return SeedRecord(
            fingerprint=row["fingerprint"],
            key_label=row["key_label"],
            iv=bytes.fromhex(row["iv"]),
            ciphertext=bytes.fromhex(row["ciphertext"]),
            created_at=parse_ts(row["created_at"]),
            sealed_at=parse_ts(row["sealed_at"]),
        )

    def store_seed(self, record: SeedRecord, *, replace: bool = False) -> None:
        """Write the sealed seed. A second seed is refused: every HD loan's bank key comes
        from the one seed. `replace` re-seals the same seed (a restore into a new token),
        and only when its fingerprint is the one on record."""
        with self.tx() as db:
            row = db.execute("SELECT fingerprint FROM bank_seed WHERE id = 1").fetchone()
            if row is not None and not replace:
                raise PolicyViolation(
                    "seed_exists",
                    f"the signer already has a bank seed (fingerprint {row['fingerprint']})",
                    field="seed",
                )
            if row is not None and row["fingerprint"] != record.fingerprint:
                raise PolicyViolation(
                    "seed_mismatch",
                    f"the restored seed has fingerprint {record.fingerprint}, the signer's "
                    f"loans use {row['fingerprint']}: these are not this bank's shares",
                    field="seed",
                )
            if row is None:
                used = db.execute(
                    "SELECT key_ref FROM loan WHERE bank_key_kind = 'hd' LIMIT 1"
                ).fetchone()
                if used is not None and not used["key_ref"].startswith(
                    f"bip32:{record.fingerprint}/"
                ):
                    raise PolicyViolation(
                        "seed_mismatch",
                        "the signer's HD loans were made from another seed "
                        f"({used['key_ref'].split('/')[0][6:]})",
                        field="seed",
                    )
            db.execute(
                "INSERT INTO bank_seed (id, fingerprint, key_label, iv, ciphertext, created_at, "
                "sealed_at) VALUES (1, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "key_label = excluded.key_label, iv = excluded.iv, "
                "ciphertext = excluded.ciphertext, sealed_at = excluded.sealed_at",
                (
                    record.fingerprint,
                    record.key_label,
                    record.iv.hex(),
                    record.ciphertext.hex(),
                    ts(record.created_at),
                    ts(record.sealed_at),
                ),
            )

    def record_backup(
        self, fingerprint: str, threshold: int, officers: Sequence[str], at: datetime
    ) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO seed_backup (fingerprint, threshold, officers, at) "
                "VALUES (?, ?, ?, ?)",
                (fingerprint, threshold, json.dumps(list(officers)), ts(at)),
            )

    def backups(self) -> list[tuple[str, int, tuple[str, ...], datetime]]:
        """(fingerprint, threshold, officers, at) of every share set made, oldest first."""
        return [
            (
                r["fingerprint"],
                int(r["threshold"]),
                tuple(json.loads(r["officers"])),
                parse_ts(r["at"]),
            )
            for r in self.read_all("SELECT * FROM seed_backup ORDER BY id", ())
        ]

    def scan_scripts(self, descriptor: str, first: int, last: int) -> dict[tuple[int, bool], bytes]:
        """The kept scripts of `descriptor` at indices `first`..`last`, by (index, change)."""
        rows = self.read_all(
            "SELECT idx, change, script FROM scan_script"
            " WHERE descriptor_hash = ? AND idx BETWEEN ? AND ?",
            (_descriptor_hash(descriptor), first, last),
        )
        return {(int(r["idx"]), bool(r["change"])): bytes(r["script"]) for r in rows}

    def keep_scan_scripts(self, descriptor: str, scripts: Mapping[tuple[int, bool], bytes]) -> None:
        """Keep scripts derived from `descriptor` (one already kept stays as it was)."""
        key = _descriptor_hash(descriptor)
        with self.tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO scan_script (descriptor_hash, change, idx, script)"
                " VALUES (?, ?, ?, ?)",
                [(key, int(change), idx, script) for (idx, change), script in scripts.items()],
            )

    def note_index(self, loan_ref: str, index: int) -> None:
        """Remember the highest address index seen in use (the scan range grows from it)."""
        with self.tx() as db:
            db.execute(
                "UPDATE loan SET highest_index = max(highest_index, ?) WHERE loan_ref = ?",
                (index, loan_ref),
            )

    def set_call_seen(
        self, loan_ref: str, at: datetime | None, *, valued_at: datetime | None = None
    ) -> None:
        """When the signer itself first saw the loan at or over its margin-call LTV
        (None: cured), and when it last looked. Only the signer's valuations write this."""
        with self.tx() as db:
            db.execute(
                "UPDATE loan SET call_seen_at = ?, "
                "last_valued_at = coalesce(?, last_valued_at) WHERE loan_ref = ?",
                (ts(at) if at else None, ts(valued_at) if valued_at else None, loan_ref),
            )

    # -- repayments and credits ---------------------------------------------------------

    def add_repayment(
        self, loan_ref: str, repayment_id: str, kopecks: int, paid_at: datetime, by: Sequence[str]
    ) -> bool:
        """Record a repayment once per id. False when this very repayment is already
        recorded (a replay); a different amount under the same id is refused."""
        with self.tx() as db:
            row = db.execute(
                "SELECT kopecks, paid_at FROM repayment WHERE loan_ref = ? AND repayment_id = ?",
                (loan_ref, repayment_id),
            ).fetchone()
            if row is not None:
                if int(row["kopecks"]) != kopecks or row["paid_at"] != ts(paid_at):
                    raise PolicyViolation(
                        "repayment_conflict",
                        f"repayment {repayment_id!r} is already recorded with other figures",
                        field="repayment_id",
                    )
                return False
            db.execute(
                "INSERT INTO repayment (loan_ref, repayment_id, kopecks, paid_at, by) "
                "VALUES (?, ?, ?, ?, ?)",
                (loan_ref, repayment_id, kopecks, ts(paid_at), ",".join(by)),
            )
        return True

    def repaid_kopecks(self, loan_ref: str, until: datetime) -> int:
        row = self.read_one(
            "SELECT coalesce(sum(kopecks), 0) AS n FROM repayment "
            "WHERE loan_ref = ? AND paid_at <= ?",
            (loan_ref, ts(until)),
        )
        assert row is not None
        return int(row["n"])

    def add_credit(self, loan_ref: str, txid: str, kopecks: int, at: datetime) -> None:
        """A partial liquidation the signer signed: it pays `kopecks` of the debt once
        its transaction is confirmed (the signer checks that on its node)."""
        with self.tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO credit (loan_ref, txid, kopecks, at) VALUES (?, ?, ?, ?)",
                (loan_ref, txid, kopecks, ts(at)),
            )

    def credits(self, loan_ref: str) -> list[tuple[str, int]]:
        rows = self.read_all(
            "SELECT txid, kopecks FROM credit WHERE loan_ref = ? ORDER BY at", (loan_ref,)
        )
        return [(r["txid"], int(r["kopecks"])) for r in rows]

    # -- valuations -----------------------------------------------------------------------

    def save_valuation(self, valuation_id: str, loan_ref: str, at: datetime, body: Any) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO valuation (id, loan_ref, at, body) VALUES (?, ?, ?, ?)",
                (valuation_id, loan_ref, ts(at), json.dumps(body, sort_keys=True, default=str)),
            )

    def valuation(self, valuation_id: str) -> tuple[str, datetime, dict[str, Any]] | None:
        row = self.read_one("SELECT * FROM valuation WHERE id = ?", (valuation_id,))
        if row is None:
            return None
        return row["loan_ref"], parse_ts(row["at"]), json.loads(row["body"])

    # -- passkeys -------------------------------------------------------------------------

    def passkey_of(self, name: str) -> PasskeyRecord | None:
        row = self.read_one("SELECT * FROM passkey WHERE name = ?", (name,))
        if row is None:
            return None
        return PasskeyRecord(
            credential_id=row["credential_id"],
            name=row["name"],
            rp_id=row["rp_id"],
            origins=tuple(json.loads(row["origins"])),
            sign_count=int(row["sign_count"]),
            last_assertion=row["last_assertion"],
        )

    def count_passkey_uses(
        self, uses: Sequence[tuple[str, int, int, str]], at: datetime
    ) -> str | None:
        """Record each (credential_id, counter seen before, new counter, assertion hash),
        all or none, if no counter moved since it was read; else the credential that did
        (another approval raced this one, or a clone did)."""
        try:
            with self.tx() as db:
                for credential_id, before, new, assertion in uses:
                    cur = db.execute(
                        "UPDATE passkey SET sign_count = ?, last_assertion = ?, "
                        "last_used_at = ? WHERE credential_id = ? AND sign_count = ?",
                        (new, assertion, ts(at), credential_id, before),
                    )
                    if cur.rowcount != 1:
                        raise _CounterMoved(credential_id)
        except _CounterMoved as moved:
            return str(moved.args[0])
        return None

    # -- statements -----------------------------------------------------------------------

    def open_statement(
        self, nonce: str, loan_ref: str, txid: str, body: dict[str, Any], expires_at: datetime
    ) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO statement (nonce, loan_ref, unsigned_txid, body, state, "
                "created_at, expires_at) VALUES (?, ?, ?, ?, 'open', ?, ?)",
                (
                    nonce,
                    loan_ref,
                    txid,
                    json.dumps(body, sort_keys=True),
                    ts(_now()),
                    ts(expires_at),
                ),
            )

    def statement(self, nonce: str) -> StatementRecord | None:
        row = self.read_one("SELECT * FROM statement WHERE nonce = ?", (nonce,))
        if row is None:
            return None
        return StatementRecord(
            nonce=row["nonce"],
            loan_ref=row["loan_ref"],
            unsigned_txid=row["unsigned_txid"],
            body=json.loads(row["body"]),
            state=row["state"],
            expires_at=parse_ts(row["expires_at"]),
        )

    def close_statement(self, nonce: str, state: str) -> bool:
        """open -> used | cancelled, once. False if it was not open any more."""
        with self.tx() as db:
            cur = db.execute(
                "UPDATE statement SET state = ? WHERE nonce = ? AND state = 'open'",
                (state, nonce),
            )
            return cur.rowcount == 1

    # -- velocity ---------------------------------------------------------------------

    def signed_since(self, since: datetime, *, excluding_txid: str | None = None) -> int:
        """Sats of collateral signed for since `since` (a txid signed twice counts once)."""
        row = self.read_one(
            "SELECT coalesce(sum(sats), 0) AS n FROM usage WHERE at >= ? AND request_txid IS NOT ?",
            (ts(since), excluding_txid),
        )
        assert row is not None
        return int(row["n"])

    def record_usage(self, loan_ref: str, txid: str, sats: int, at: datetime | None = None) -> None:
        """Count a signed transaction against the daily limit (once per txid)."""
        with self.tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO usage (loan_ref, request_txid, sats, at) VALUES (?,?,?,?)",
                (loan_ref, txid, sats, ts(at or _now())),
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
        with self.tx() as db:
            db.execute(
                'INSERT INTO decisions (at, loan_ref, txid, decision, "check", reason, detail) '
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    ts(_now()),
                    loan_ref[:200],
                    txid,
                    decision,
                    check,
                    reason,
                    json.dumps(detail or {}, sort_keys=True, default=str),
                ),
            )

    def decisions(self, loan_ref: str | None = None) -> Sequence[Decision]:
        if loan_ref is None:
            rows = self.read_all("SELECT * FROM decisions ORDER BY id", ())
        else:
            rows = self.read_all(
                "SELECT * FROM decisions WHERE loan_ref = ? ORDER BY id", (loan_ref,)
            )
        return [
            Decision(
                at=parse_ts(r["at"]),
                loan_ref=r["loan_ref"],
                txid=r["txid"],
                decision=r["decision"],
                check=r["check"],
                reason=r["reason"],
                detail=json.loads(r["detail"]),
            )
            for r in rows
        ]
