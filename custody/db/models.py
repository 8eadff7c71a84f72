"""Database tables. No private key material is ever stored here: only xpubs,
public keys, descriptors, addresses and history.

Amounts are integers (sats, kopecks, basis points); a price is kept as a decimal
string with its source, so nothing is rounded by a float on the way in or out.
"""

from __future__ import annotations

from datetime import UTC, datetime
from datetime import date as Date
from enum import StrEnum
from typing import overload

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlmodel import Field, SQLModel

# Every id, and every column holding one, is 64-bit (what custody.schemas.ID_MAX bounds):
# BIGINT on PostgreSQL. On SQLite INTEGER is already 64-bit, and only an INTEGER PRIMARY KEY
# is the rowid alias that numbers new rows, so it stays INTEGER there.
ID = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def as_utc(moment: datetime) -> datetime: ...
@overload
def as_utc(moment: None) -> None: ...
def as_utc(moment: datetime | None) -> datetime | None:
    """The aware UTC value of a column: SQLite hands back naive datetimes for the UTC
    values it was given (PostgreSQL's are aware already)."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


class Role(StrEnum):
    """What an API principal may do; see custody.auth.policy for the rules."""

    miner = "miner"
    bank_operator = "bank_operator"
    bank_approver = "bank_approver"
    arbiter = "arbiter"
    auditor = "auditor"
    admin = "admin"
    compliance_officer = "compliance_officer"  # bank staff: KYC of miners, AML screening
    risk_engine = "risk_engine"  # the automation; has no API key


class PartyKind(StrEnum):
    miner = "miner"
    bank = "bank"
    arbiter = "arbiter"


class KeyRole(StrEnum):
    """The three seats of a loan's 2-of-3; descriptor key order follows this."""

    miner = "miner"
    bank = "bank"
    arbiter = "arbiter"


class KeyKind(StrEnum):
    hd = "hd"
    hsm = "hsm"


class LoanState(StrEnum):
    draft = "draft"
    awaiting_deposit = "awaiting_deposit"
    active = "active"
    margin_call = "margin_call"
    liquidating = "liquidating"
    liquidated = "liquidated"
    releasing = "releasing"
    released = "released"


class Party(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    name: str = Field(sa_column=Column(String(120), nullable=False, unique=True))
    kind: PartyKind = Field(sa_column=Column(String(16), nullable=False))
    created_at: datetime = Field(default_factory=utcnow, nullable=False)


class Principal(SQLModel, table=True):
    """Someone (or something) holding an API key. Only the key's SHA-256 is stored:
    keys are 256-bit random tokens, so a fast hash is enough and lookups stay O(1)."""

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    name: str = Field(sa_column=Column(String(120), nullable=False, unique=True))
    role: Role = Field(sa_column=Column(String(32), nullable=False))
    party_id: int | None = Field(default=None, sa_type=ID, foreign_key="party.id", index=True)
    key_hash: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    key_prefix: str = Field(sa_column=Column(String(16), nullable=False))
    disabled: bool = Field(default=False, nullable=False)
    created_at: datetime = Field(default_factory=utcnow, nullable=False)


class Loan(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    state: LoanState = Field(sa_column=Column(String(32), nullable=False, index=True))
    miner_party_id: int = Field(sa_type=ID, foreign_key="party.id", index=True)
    bank_party_id: int = Field(sa_type=ID, foreign_key="party.id")
    arbiter_party_id: int = Field(sa_type=ID, foreign_key="party.id", index=True)

    principal_kopecks: int = Field(sa_column=Column(BigInteger, nullable=False))
    interest_rate_bps: int = Field(nullable=False)
    maturity_at: datetime = Field(nullable=False)
    required_collateral_sats: int = Field(sa_column=Column(BigInteger, nullable=False))
    target_ltv_bps: int | None = Field(default=None)
    price_rub_per_btc: str | None = Field(default=None, sa_column=Column(String(40)))
    price_source: str | None = Field(default=None, sa_column=Column(String(120)))
    margin_call_ltv_bps: int = Field(nullable=False)
    liquidation_ltv_bps: int = Field(nullable=False)
    cure_window_hours: int = Field(nullable=False)
    required_confirmations: int | None = Field(default=None)
    miner_return_address: str = Field(sa_column=Column(String(100), nullable=False))
    bank_liquidation_address: str = Field(sa_column=Column(String(100), nullable=False))

    descriptor: str | None = Field(default=None, sa_column=Column(Text))
    # Sorted key identities: a unique column enforces "no two loans share a key set".
    key_set: str | None = Field(default=None, sa_column=Column(Text, unique=True))
    next_address_index: int = Field(default=0, nullable=False)
    # Debt already paid off by selling collateral (partial liquidations), in kopecks.
    credited_kopecks: int = Field(
        default=0, sa_column=Column(BigInteger, nullable=False, server_default="0")
    )
    repaid_at: datetime | None = Field(default=None)
    margin_call_at: datetime | None = Field(default=None)  # start of the cure window
    # How many state changes this loan has had (`loans.service.change_state` counts them):
    # the n-th change is one fact, so its webhook has one id however often it is replayed.
    state_version: int = Field(default=0, sa_column_kwargs={"server_default": "0"})

    created_by: int = Field(sa_type=ID, foreign_key="principal.id")
    created_at: datetime = Field(default_factory=utcnow, nullable=False)
    updated_at: datetime = Field(default_factory=utcnow, nullable=False)


class LoanKey(SQLModel, table=True):
    """One seat's public key for one loan."""

    __table_args__ = (UniqueConstraint("loan_id", "role", name="uq_loankey_loan_role"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    loan_id: int = Field(sa_type=ID, foreign_key="loan.id", index=True)
    role: KeyRole = Field(sa_column=Column(String(16), nullable=False))
    party_id: int = Field(sa_type=ID, foreign_key="party.id", index=True)
    kind: KeyKind = Field(sa_column=Column(String(8), nullable=False))
    # Canonical identity of the key material (same xpub in another encoding = same identity).
    identity: str = Field(sa_column=Column(String(200), nullable=False, index=True))
    descriptor_key: str = Field(sa_column=Column(Text, nullable=False))
    fingerprint: str | None = Field(default=None, sa_column=Column(String(8)))
    origin_path: str | None = Field(default=None, sa_column=Column(String(64)))
    xpub: str | None = Field(default=None, sa_column=Column(String(120)))
    public_key_hex: str | None = Field(default=None, sa_column=Column(String(66)))
    # HSM keys: where the key lives and the token's own evidence that it never left.
    hsm_key_label: str | None = Field(default=None, sa_column=Column(String(64)))
    hsm_local: bool | None = Field(default=None)
    hsm_never_extractable: bool | None = Field(default=None)
    created_by: int = Field(sa_type=ID, foreign_key="principal.id")
    created_at: datetime = Field(default_factory=utcnow, nullable=False)


class CollateralAddress(SQLModel, table=True):
    """An address handed out for a loan. Unique across all loans: never reused."""

    __table_args__ = (
        UniqueConstraint("loan_id", "change", "index", name="uq_address_loan_change_index"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    loan_id: int = Field(sa_type=ID, foreign_key="loan.id", index=True)
    change: bool = Field(default=False, nullable=False)
    index: int = Field(nullable=False)
    address: str = Field(sa_column=Column(String(100), nullable=False, unique=True))
    script_pubkey_hex: str = Field(sa_column=Column(String(140), nullable=False, unique=True))
    created_at: datetime = Field(default_factory=utcnow, nullable=False)


class AuditEvent(SQLModel, table=True):
    """Append-only, hash-chained: each row commits to the previous row's hash,
    so an edited, inserted or deleted row breaks the chain visibly."""

    id: int = Field(primary_key=True, sa_type=ID)  # assigned by the audit service, gap-free
    at: datetime = Field(nullable=False)
    actor: str = Field(sa_column=Column(String(120), nullable=False))
    action: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    loan_id: int | None = Field(default=None, index=True, sa_type=ID)
    request_id: int | None = Field(default=None, sa_type=ID)
    decision: str | None = Field(default=None, sa_column=Column(String(32)))
    reason: str | None = Field(default=None, sa_column=Column(Text))
    data: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    prev_hash: str = Field(sa_column=Column(String(64), nullable=False))
    hash: str = Field(sa_column=Column(String(64), nullable=False, unique=True))


class DepositState(StrEnum):
    pending = "pending"  # in the mempool or in a block, not yet enough confirmations
    confirmed = "confirmed"  # counts as collateral
    spent = "spent"  # its outpoint was spent in a block we applied
    removed = "removed"  # reorged away or double-spent: it never happened


class Deposit(SQLModel, table=True):
    """An output paying a loan's collateral address. (txid, vout) is unique: a deposit
    is recorded once, whatever the mempool, reorgs or restarts do."""

    __table_args__ = (UniqueConstraint("txid", "vout", name="uq_deposit_outpoint"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    loan_id: int = Field(sa_type=ID, foreign_key="loan.id", index=True)
    address_id: int = Field(sa_type=ID, foreign_key="collateraladdress.id")
    txid: str = Field(sa_column=Column(String(64), nullable=False))
    vout: int = Field(nullable=False)
    amount_sats: int = Field(sa_column=Column(BigInteger, nullable=False))
    state: DepositState = Field(sa_column=Column(String(16), nullable=False, index=True))
    block_height: int | None = Field(default=None, index=True)
    block_hash: str | None = Field(default=None, sa_column=Column(String(64)))
    required_confirmations: int = Field(nullable=False)
    # The part of this deposit above what the loan required when it confirmed.
    excess_sats: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    spent_txid: str | None = Field(default=None, sa_column=Column(String(64)))
    spent_height: int | None = Field(default=None, index=True)
    # How many times a reorg or the mempool took this deposit back (unconfirmed, removed):
    # part of its events' ids, so a confirmation after a retraction is news, a replay not.
    retractions: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    first_seen_at: datetime = Field(default_factory=utcnow, nullable=False)
    updated_at: datetime = Field(default_factory=utcnow, nullable=False)


class ChainBlock(SQLModel, table=True):
    """Blocks the watcher applied, so a reorg can be traced back to the fork point."""

    height: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    hash: str = Field(sa_column=Column(String(64), nullable=False))
    prev_hash: str = Field(sa_column=Column(String(64), nullable=False))


class ChainCursor(SQLModel, table=True):
    """Where the watcher is (one row). Written in the same transaction as the block it
    applied, so a crash can never leave a block half-counted."""

    id: int = Field(default=1, primary_key=True, sa_type=ID)
    height: int = Field(nullable=False)
    block_hash: str = Field(sa_column=Column(String(64), nullable=False))
    node_tip_height: int = Field(nullable=False)
    updated_at: datetime = Field(default_factory=utcnow, nullable=False)


class WatcherLease(SQLModel, table=True):
    """Only one watcher per database, and what it last did (one row).

    `generation` is the fence: a takeover increments it, and every write the watcher
    makes first checks, in its own transaction, that the row still names it at its
    generation (PostgreSQL also holds an advisory lock, which only speeds refusals).
    The step fields are what `/v1/health` shows of a watcher that cannot move."""

    id: int = Field(default=1, primary_key=True, sa_type=ID)
    holder: str = Field(sa_column=Column(String(120), nullable=False))
    expires_at: datetime = Field(nullable=False)
    generation: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    last_step_at: datetime | None = Field(default=None)
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    last_error_kind: str | None = Field(default=None, sa_column=Column(String(120)))
    last_error_at: datetime | None = Field(default=None)
    # Steps failed in a row; `stalled_since` is set when that reached the alert's
    # threshold (the `watcher.stalled` event, once) and cleared by `watcher.recovered`.
    failed_steps: int = Field(default=0, nullable=False)
    stalled_since: datetime | None = Field(default=None)


class WorkerHeartbeat(SQLModel, table=True):
    """A worker process's sign of life (`custody risk`, `custody notify`), one row per
    process: what `/v1/health` shows of the loops the watcher's lease does not cover.
    Written after every pass in a short transaction of its own; a clean stop sets
    `stopped_at`, a killed process simply stops beating."""

    kind: str = Field(sa_column=Column(String(16), primary_key=True))
    holder: str = Field(sa_column=Column(String(120), primary_key=True))
    started_at: datetime = Field(nullable=False)
    beat_at: datetime = Field(nullable=False)
    last_ok_at: datetime | None = Field(default=None)
    passes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    failed_passes: int = Field(default=0, nullable=False)  # in a row
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    last_error_at: datetime | None = Field(default=None)
    stopped_at: datetime | None = Field(default=None)


class SigningAction(StrEnum):
    release = "release"  # repaid: everything back to the miner (miner + bank)
    dispute_release = "dispute_release"  # repaid, the bank does not sign: miner + arbiter
    liquidation = "liquidation"  # the debt to the bank, the surplus to the miner (bank + arbiter)
    partial_liquidation = "partial_liquidation"  # sell down to the target LTV (bank + arbiter)


class RequestState(StrEnum):
    awaiting_signatures = "awaiting_signatures"
    ready = "ready"  # quorum met, not yet accepted by the node
    broadcast = "broadcast"
    confirmed = "confirmed"
    cancelled = "cancelled"
    replaced = "replaced"  # an RBF sibling confirmed instead


class SigningRequest(SQLModel, table=True):
    """One PSBT that moves a loan's collateral, who must sign it and who has.

    `open_key` is set while the request is open and unique: one open request per loan
    (a fee bump is the one exception, keyed to the request it replaces)."""

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    loan_id: int = Field(sa_type=ID, foreign_key="loan.id", index=True)
    action: SigningAction = Field(sa_column=Column(String(32), nullable=False))
    state: RequestState = Field(sa_column=Column(String(32), nullable=False, index=True))
    slot: str = Field(sa_column=Column(String(64), nullable=False))  # "loan:7" or "rbf:12"
    open_key: str | None = Field(default=None, sa_column=Column(String(64), unique=True))
    psbt: str = Field(sa_column=Column(Text, nullable=False))  # base64, all signatures so far
    # Not unique: a request re-made after a cancel can be the very same transaction.
    unsigned_txid: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    required_seats: str = Field(sa_column=Column(String(32), nullable=False))  # "miner,bank"
    signed_seats: str = Field(default="", sa_column=Column(String(32), nullable=False))
    inputs_json: str = Field(sa_column=Column(Text, nullable=False))
    outputs_json: str = Field(sa_column=Column(Text, nullable=False))
    evidence_json: str = Field(sa_column=Column(Text, nullable=False))  # price, debt, fee, notes
    fee_sats: int = Field(sa_column=Column(BigInteger, nullable=False))
    loan_state_before: str = Field(sa_column=Column(String(32), nullable=False))
    replaces_id: int | None = Field(default=None, sa_type=ID, foreign_key="signingrequest.id")
    mined_height: int | None = Field(default=None)
    reject_reason: str | None = Field(default=None, sa_column=Column(Text))
    created_by: str = Field(sa_column=Column(String(120), nullable=False))
    created_at: datetime = Field(default_factory=utcnow, nullable=False)
    updated_at: datetime = Field(default_factory=utcnow, nullable=False)


class Approval(SQLModel, table=True):
    """A bank approver's sign-off on one exact transaction (its unsigned txid)."""

    __table_args__ = (
        UniqueConstraint("request_id", "principal_id", "unsigned_txid", name="uq_approval_once"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    request_id: int = Field(sa_type=ID, foreign_key="signingrequest.id", index=True)
    unsigned_txid: str = Field(sa_column=Column(String(64), nullable=False))
    principal_id: int = Field(sa_type=ID, foreign_key="principal.id")
    principal: str = Field(sa_column=Column(String(160), nullable=False))  # "role:name"
    role: str = Field(sa_column=Column(String(32), nullable=False))
    created_at: datetime = Field(default_factory=utcnow, nullable=False)


class StatementState(StrEnum):
    open = "open"  # collecting signatures
    done = "done"  # the signer acted on it
    refused = "refused"  # the signer refused it for good
    cancelled = "cancelled"


class SignerStatement(SQLModel, table=True):
    """A statement for the bank's signer (registration, repayment, transaction...)
    waiting for or carrying the signatures of enrolled people. The signer verifies them;
    this row only carries them there, so nothing here is trusted by the signer."""

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    kind: str = Field(sa_column=Column(String(32), nullable=False))
    loan_id: int | None = Field(default=None, sa_type=ID, foreign_key="loan.id", index=True)
    request_id: int | None = Field(
        default=None, sa_type=ID, foreign_key="signingrequest.id", index=True
    )
    nonce: str | None = Field(default=None, sa_column=Column(String(64), unique=True))
    body: str = Field(sa_column=Column(Text, nullable=False))  # the statement, JSON
    state: StatementState = Field(sa_column=Column(String(16), nullable=False, index=True))
    outcome: str | None = Field(default=None, sa_column=Column(Text))
    # What the signer answered (a signed PSBT, a key), kept before it is applied: if
    # applying fails, a retry applies this again instead of asking the signer twice.
    result: str | None = Field(default=None, sa_column=Column(Text))
    created_by: str = Field(sa_column=Column(String(120), nullable=False))
    created_at: datetime = Field(default_factory=utcnow, nullable=False)
    updated_at: datetime = Field(default_factory=utcnow, nullable=False)


class SignerEndorsement(SQLModel, table=True):
    """One enrolled person's signature over a statement, as they sent it."""

    __table_args__ = (UniqueConstraint("statement_id", "person", name="uq_endorsement_once"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    statement_id: int = Field(sa_type=ID, foreign_key="signerstatement.id", index=True)
    person: str = Field(sa_column=Column(String(64), nullable=False))
    signature: str = Field(sa_column=Column(Text, nullable=False))
    submitted_by: str = Field(sa_column=Column(String(120), nullable=False))
    created_at: datetime = Field(default_factory=utcnow, nullable=False)


class PriceState(StrEnum):
    """A manual price's life: proposed by one person, then confirmed by a second (only
    then may the risk engine use it) or rejected. `legacy`: set by one person before
    prices needed two; kept as history, never used. A proposal past its `expires_at`
    stays `proposed` here and is shown as expired."""

    proposed = "proposed"
    confirmed = "confirmed"
    rejected = "rejected"
    legacy = "legacy"


class PriceRecord(SQLModel, table=True):
    """A BTC/RUB price proposed by bank staff (the manual source), with who proposed it and
    who confirmed or rejected it, and when. Actors are `role:name`; the ids say which
    principal, so 4-eyes compares principals, not names."""

    __table_args__ = (Index("ix_pricerecord_state_confirmed_at", "state", "confirmed_at"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    price_rub_per_btc: str = Field(sa_column=Column(String(40), nullable=False))
    source: str = Field(sa_column=Column(String(120), nullable=False))
    quoted_at: datetime = Field(nullable=False)
    state: PriceState = Field(sa_column=Column(String(16), nullable=False))
    proposed_by: str = Field(sa_column=Column(String(160), nullable=False))
    proposed_by_id: int | None = Field(default=None, foreign_key="principal.id", sa_type=ID)
    created_at: datetime = Field(default_factory=utcnow, nullable=False)  # proposed at
    expires_at: datetime | None = None
    confirmed_by: str | None = Field(default=None, sa_column=Column(String(160), nullable=True))
    confirmed_by_id: int | None = Field(default=None, foreign_key="principal.id", sa_type=ID)
    confirmed_at: datetime | None = None
    rejected_by: str | None = Field(default=None, sa_column=Column(String(160), nullable=True))
    rejected_at: datetime | None = None


# Webhook subscriptions and the delivery outbox (custody/notify/ uses them).


class Webhook(SQLModel, table=True):
    """One party's endpoint and the event types it wants.

    ``secret`` is the HMAC key the party gave us to sign deliveries with. It has to be
    stored in the clear to compute signatures, and must never leave through a listing,
    a log line or a repr (hence ``repr=False``)."""

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    party_id: int = Field(sa_type=ID, foreign_key="party.id", index=True)
    url: str = Field(sa_column=Column(String(2000), nullable=False))
    secret: str = Field(sa_column=Column(String(256), nullable=False), repr=False)
    events: str = Field(sa_column=Column(Text, nullable=False))  # "*" or "a.b,c.d"
    active: bool = Field(default=True, nullable=False)
    created_at: datetime = Field(default_factory=utcnow, nullable=False)


class Outbox(SQLModel, table=True):
    """One event for one webhook. Written in the transaction that caused the event.
    ``event_id`` is derived from the fact the event reports (`notify.outbox.event_id`):
    the same for every webhook and every replay of that fact, so a row per (webhook,
    event) is inserted once and receivers can de-duplicate by it."""

    __table_args__ = (UniqueConstraint("webhook_id", "event_id", name="uq_outbox_webhook_event"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    event_id: str = Field(sa_column=Column(String(36), nullable=False))
    webhook_id: int = Field(sa_type=ID, foreign_key="webhook.id", index=True)
    event_type: str = Field(sa_column=Column(String(64), nullable=False))
    payload: str = Field(sa_column=Column(Text, nullable=False))  # JSON
    created_at: datetime = Field(default_factory=utcnow, nullable=False)
    attempts: int = Field(default=0, nullable=False)
    next_attempt_at: datetime = Field(nullable=False, index=True)
    delivered_at: datetime | None = Field(default=None)
    # Set when retries are exhausted; the row is kept for inspection and manual replay.
    dead_at: datetime | None = Field(default=None)
    last_error: str | None = Field(default=None, sa_column=Column(Text))


# The web console (custody/console/): invitations, passkeys, sessions, WebAuthn challenges.
# Only hashes of the bearer tokens (invitation link, session cookie) and public WebAuthn
# data are stored: a copy of the database signs nobody in.


class ConsoleInvitation(SQLModel, table=True):
    """A one-time link for a principal to register a passkey. The link's token is shown
    once, to the admin who issued it; this row keeps its SHA-256, its expiry and its use."""

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    principal_id: int = Field(sa_type=ID, foreign_key="principal.id", index=True)
    token_hash: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    created_by: str = Field(sa_column=Column(String(160), nullable=False))
    created_at: datetime = Field(default_factory=utcnow, nullable=False)
    expires_at: datetime = Field(nullable=False)
    used_at: datetime | None = Field(default=None)


class ConsolePasskey(SQLModel, table=True):
    """A principal's WebAuthn credential for the console: public data only (the private
    key never leaves the person's authenticator)."""

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    principal_id: int = Field(sa_type=ID, foreign_key="principal.id", index=True)
    credential_id: str = Field(sa_column=Column(String(1400), nullable=False, unique=True))
    public_key: str = Field(sa_column=Column(Text, nullable=False))  # COSE key, base64url
    sign_count: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, nullable=False)
    last_used_at: datetime | None = Field(default=None)


class ConsoleSession(SQLModel, table=True):
    """A signed-in browser. The cookie's token is never stored, only its SHA-256; the
    CSRF token is derived from the cookie's token, so it is not stored either."""

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    principal_id: int = Field(sa_type=ID, foreign_key="principal.id", index=True)
    token_hash: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    created_at: datetime = Field(default_factory=utcnow, nullable=False)
    last_seen_at: datetime = Field(default_factory=utcnow, nullable=False)


class ConsoleChallenge(SQLModel, table=True):
    """A WebAuthn challenge handed to a browser, used at most once before it expires.
    `invitation_id` ties a registration's challenge to its invitation."""

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    purpose: str = Field(sa_column=Column(String(16), nullable=False))  # register | sign_in
    challenge: str = Field(sa_column=Column(String(128), nullable=False, unique=True))
    invitation_id: int | None = Field(
        default=None, sa_type=ID, foreign_key="consoleinvitation.id", index=True
    )
    expires_at: datetime = Field(nullable=False)


# Compliance (custody/compliance/): who a miner is (221-FZ register of miners, INN, OGRN),
# the evidence behind it, the compliance officers' reviews and the bank's table of regional
# mining bans. The validators and the flags' rules are the kernel's (pledge/kyc.py).


class MinerRecord(SQLModel, table=True):
    """A miner party's registry data, one row per party. A table of its own rather than
    columns on Party: banks and arbiters have none of it, and the record has a life of its
    own (versions, reviews bound to its content) that Party's readers need not see."""

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    party_id: int = Field(sa_type=ID, foreign_key="party.id", unique=True)
    legal_form: str = Field(sa_column=Column(String(32), nullable=False))
    inn: str = Field(sa_column=Column(String(12), nullable=False))
    ogrn: str | None = Field(default=None, sa_column=Column(String(15)))
    register_number: str | None = Field(default=None, sa_column=Column(String(64)))
    register_date: Date | None = Field(default=None)
    register_status: str | None = Field(default=None, sa_column=Column(String(16)))
    region: str = Field(sa_column=Column(String(2), nullable=False))
    monthly_energy_kwh: int = Field(sa_column=Column(BigInteger, nullable=False))
    data_centre_name: str | None = Field(default=None, sa_column=Column(String(120)))
    data_centre_inn: str | None = Field(default=None, sa_column=Column(String(12)))
    # SHA-256 of the facts and the documents' digests (pledge.kyc.record_digest): what
    # a review approves; recomputed on every change, so an approval of an older one is void.
    digest: str = Field(sa_column=Column(String(64), nullable=False))
    version: int = Field(default=1, nullable=False)
    updated_by: str = Field(sa_column=Column(String(160), nullable=False))
    updated_by_id: int | None = Field(default=None, foreign_key="principal.id", sa_type=ID)
    created_at: datetime = Field(default_factory=utcnow, nullable=False)
    updated_at: datetime = Field(default_factory=utcnow, nullable=False)


class EvidenceDocument(SQLModel, table=True):
    """A document behind a miner's record (a register extract, an energy contract...). The
    bytes are kept in the database, so they are backed up, replicated and deleted with the
    rest and a row never points at a missing file; `sha256` is checked on every read."""

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    party_id: int = Field(sa_type=ID, foreign_key="party.id", index=True)
    kind: str = Field(sa_column=Column(String(32), nullable=False))
    content_type: str = Field(sa_column=Column(String(64), nullable=False))
    filename: str | None = Field(default=None, sa_column=Column(String(200)))
    size: int = Field(nullable=False)
    sha256: str = Field(sa_column=Column(String(64), nullable=False))
    content: bytes = Field(sa_column=Column(LargeBinary, nullable=False), repr=False)
    uploaded_by: str = Field(sa_column=Column(String(160), nullable=False))
    uploaded_by_id: int | None = Field(default=None, foreign_key="principal.id", sa_type=ID)
    uploaded_at: datetime = Field(default_factory=utcnow, nullable=False)


class ComplianceReview(SQLModel, table=True):
    """A compliance officer's approval or rejection of one exact content of a miner's
    record (its digest). One decision per officer per content."""

    __table_args__ = (UniqueConstraint("party_id", "digest", "reviewer_id", name="uq_review_once"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    party_id: int = Field(sa_type=ID, foreign_key="party.id", index=True)
    digest: str = Field(sa_column=Column(String(64), nullable=False))
    decision: str = Field(sa_column=Column(String(16), nullable=False))  # approved | rejected
    reason: str = Field(sa_column=Column(Text, nullable=False))
    flags: str = Field(default="", sa_column=Column(Text, nullable=False))  # codes it saw
    reviewer: str = Field(sa_column=Column(String(160), nullable=False))  # "role:name"
    reviewer_id: int = Field(sa_type=ID, foreign_key="principal.id")
    created_at: datetime = Field(default_factory=utcnow, nullable=False)


class MiningBan(SQLModel, table=True):
    """The bank's table of regional mining bans (pledge.kyc.MiningBan): seeded by the
    migration with the government's list, edited by admins and compliance officers."""

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    region: str = Field(sa_column=Column(String(2), nullable=False, index=True))
    starts_on: Date = Field(nullable=False)
    ends_on: Date | None = Field(default=None)
    months: str = Field(default="", sa_column=Column(String(40), nullable=False))  # "11,12,1"
    note: str = Field(default="", sa_column=Column(Text, nullable=False))
    created_by: str = Field(sa_column=Column(String(160), nullable=False))
    created_at: datetime = Field(default_factory=utcnow, nullable=False)


# AML screening of collateral (custody/screening/): what each deposit's funding transaction
# and each payout address was judged, and the lists the bank maintains.


class ScreeningStatus(StrEnum):
    """Where a screening stands. A deposit counts as collateral only at `clear` (a
    provider said so) or `cleared` (a compliance officer did); `pending` is waiting for its
    providers (a crash between asking and recording leaves it so: retried)."""

    pending = "pending"
    clear = "clear"
    review = "review"
    block = "block"
    cleared = "cleared"  # review/block, then cleared by a compliance officer
    blocked = "blocked"  # review/block, then the block confirmed by a compliance officer


class ScreeningDecision(SQLModel, table=True):
    """One screening of one subject: a deposit (its funding transaction: its inputs'
    outpoints and the addresses they spent from) or a payout address (the miner's return,
    the bank's liquidation address). A deposit has one (`deposit_key`, unique); a payout
    address one per screening."""

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    subject: str = Field(sa_column=Column(String(16), nullable=False))  # deposit | payout
    loan_id: int = Field(sa_type=ID, foreign_key="loan.id", index=True)
    deposit_key: str | None = Field(default=None, sa_column=Column(String(80), unique=True))
    txid: str | None = Field(default=None, sa_column=Column(String(64)))
    vout: int | None = Field(default=None)
    amount_sats: int | None = Field(default=None, sa_column=Column(BigInteger))
    address: str | None = Field(default=None, sa_column=Column(String(100), index=True))
    purpose: str = Field(sa_column=Column(String(32), nullable=False))  # deposit, miner_return..
    status: ScreeningStatus = Field(sa_column=Column(String(16), nullable=False, index=True))
    result: str | None = Field(default=None, sa_column=Column(String(16)))  # providers' verdict
    score: int | None = Field(default=None)
    reasons: str = Field(default="[]", sa_column=Column(Text, nullable=False))  # JSON list
    providers: str = Field(default="", sa_column=Column(String(200), nullable=False))
    reference: str | None = Field(default=None, sa_column=Column(String(200)))
    inputs: str = Field(default="[]", sa_column=Column(Text, nullable=False))  # JSON, screened
    attempts: int = Field(default=0, nullable=False)
    # Set when the decision let a deposit count: the watcher settles its loan, then clears it.
    settle_pending: bool = Field(default=False, nullable=False)
    created_at: datetime = Field(default_factory=utcnow, nullable=False)
    decided_at: datetime | None = Field(default=None)
    resolution_reason: str | None = Field(default=None, sa_column=Column(Text))
    resolved_by: str | None = Field(default=None, sa_column=Column(String(160)))
    resolved_by_id: int | None = Field(default=None, sa_type=ID, foreign_key="principal.id")
    resolved_at: datetime | None = Field(default=None)


class ScreeningListEntry(SQLModel, table=True):
    """An entry of the bank's own lists for the built-in provider: an address, a txid or an
    outpoint ("txid:vout") to block or send to review."""

    __table_args__ = (UniqueConstraint("kind", "value", name="uq_screening_list_entry"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    kind: str = Field(sa_column=Column(String(16), nullable=False))  # address|txid|outpoint
    value: str = Field(sa_column=Column(String(100), nullable=False))
    action: str = Field(sa_column=Column(String(16), nullable=False))  # block | review
    note: str = Field(sa_column=Column(Text, nullable=False))
    created_by: str = Field(sa_column=Column(String(160), nullable=False))
    created_at: datetime = Field(default_factory=utcnow, nullable=False)
