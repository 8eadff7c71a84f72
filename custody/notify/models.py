"""Tables for webhook subscriptions and the delivery outbox.

Kept beside the code that uses them; ``custody.db.models`` imports this module at its
end so Alembic and ``SQLModel.metadata`` see these tables with the rest.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, String, Text
from sqlmodel import Field, SQLModel

import custody.db.models  # noqa: F401  (party.id must be registered for the foreign key)
from custody.db.models import utcnow


class Webhook(SQLModel, table=True):
    """One party's endpoint and the event types it wants.

    ``secret`` is the HMAC key the party gave us to sign deliveries with. It has to be
    stored in the clear to compute signatures, and must never leave through a listing,
    a log line or a repr (hence ``repr=False``)."""

    id: int | None = Field(default=None, primary_key=True)
    party_id: int = Field(foreign_key="party.id", index=True)
    url: str = Field(sa_column=Column(String(2000), nullable=False))
    secret: str = Field(sa_column=Column(String(256), nullable=False), repr=False)
    events: str = Field(sa_column=Column(Text, nullable=False))  # "*" or "a.b,c.d"
    active: bool = Field(default=True, nullable=False)
    created_at: datetime = Field(default_factory=utcnow, nullable=False)


class Outbox(SQLModel, table=True):
    """One event for one webhook. Written in the transaction that caused the event;
    ``event_id`` is stable across retries so receivers can de-duplicate by it."""

    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(sa_column=Column(String(36), nullable=False, unique=True))
    webhook_id: int = Field(foreign_key="webhook.id", index=True)
    event_type: str = Field(sa_column=Column(String(64), nullable=False))
    payload: str = Field(sa_column=Column(Text, nullable=False))  # JSON
    created_at: datetime = Field(default_factory=utcnow, nullable=False)
    attempts: int = Field(default=0, nullable=False)
    next_attempt_at: datetime = Field(nullable=False, index=True)
    delivered_at: datetime | None = Field(default=None)
    # Set when retries are exhausted; the row is kept for inspection and manual replay.
    dead_at: datetime | None = Field(default=None)
    last_error: str | None = Field(default=None, sa_column=Column(Text))
