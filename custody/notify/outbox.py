"""Subscriptions and the transactional outbox.

``enqueue`` only INSERTs rows in the caller's session: the events become visible to the
delivery worker exactly when the caller's transaction commits, and vanish with it if it
rolls back. Nothing here talks to the network.
"""

from __future__ import annotations

import ipaddress
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session as SASession
from sqlalchemy.orm import SessionTransaction
from sqlmodel import Session

from custody.audit.service import record
from custody.db.models import Outbox, Webhook, utcnow
from custody.errors import PartyNotFound, WebhookNotFound
from custody.notify import repository
from pledge.errors import InvalidInput

EVENT_TYPES: frozenset[str] = frozenset(
    {
        "deposit.seen",
        "deposit.confirmed",
        "loan.active",
        "loan.margin_call",
        "liquidation.started",
        "liquidation.broadcast",
        "liquidation.confirmed",
        "release.ready_to_sign",
        "signature.needed",
        "watcher.stalled",
        "watcher.recovered",
    }
)
ALL_EVENTS = "*"
MIN_SECRET_LENGTH = 32
MAX_URL_LENGTH = 2000


@dataclass(frozen=True)
class WebhookView:
    """What may be shown about a webhook: everything but its secret."""

    id: int
    party_id: int
    url: str
    events: tuple[str, ...]  # ("*",) for everything
    active: bool
    created_at: datetime

    @classmethod
    def of(cls, hook: Webhook) -> WebhookView:
        assert hook.id is not None
        return cls(
            id=hook.id,
            party_id=hook.party_id,
            url=hook.url,
            events=tuple(hook.events.split(",")),
            active=hook.active,
            created_at=hook.created_at,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "party_id": self.party_id,
            "url": self.url,
            "events": list(self.events),
            "active": self.active,
            "created_at": self.created_at.isoformat(),
        }


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_url(url: str) -> str:
    """https anywhere; plain http only to this machine (tests, a local relay), because
    a signed but unencrypted payload still leaks loan details on the wire."""
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise InvalidInput("webhook url is too long", field="url")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018  (raises ValueError on a malformed port)
    except ValueError as exc:
        raise InvalidInput(f"webhook url is malformed: {exc}", field="url") from exc
    if not host:
        raise InvalidInput("webhook url has no host", field="url")
    if parts.username is not None or parts.password is not None:
        # Credentials in a URL end up in logs and listings; the HMAC secret authenticates.
        raise InvalidInput("webhook url must not contain credentials", field="url")
    if parts.fragment:
        raise InvalidInput("webhook url must not contain a fragment", field="url")
    if parts.scheme == "https":
        return url
    if parts.scheme == "http" and _is_loopback(host):
        return url
    raise InvalidInput("webhook url must be https (http only to a loopback address)", field="url")


def _normalise_events(events: Iterable[str] | str) -> str:
    items = [events] if isinstance(events, str) else list(events)
    names = {e.strip() for item in items for e in item.split(",") if e.strip()}
    if not names:
        raise InvalidInput("subscribe to at least one event type (or '*')", field="events")
    if ALL_EVENTS in names:
        if len(names) > 1:
            raise InvalidInput("'*' cannot be combined with event types", field="events")
        return ALL_EVENTS
    unknown = sorted(names - EVENT_TYPES)
    if unknown:
        raise InvalidInput(f"unknown event types: {', '.join(unknown)}", field="events")
    return ",".join(sorted(names))


def register_webhook(
    session: Session,
    party_id: int,
    url: str,
    secret: str,
    events: Iterable[str] | str,
    *,
    actor: str = "system",
) -> WebhookView:
    """Subscribe ``party_id``'s endpoint, in the caller's transaction (audited)."""
    if repository.party_by_id(session, party_id) is None:
        raise PartyNotFound(f"party {party_id} not found", field="party_id")
    url = validate_url(url)
    if len(secret) < MIN_SECRET_LENGTH:
        raise InvalidInput(
            f"webhook secret must be at least {MIN_SECRET_LENGTH} characters", field="secret"
        )
    if len(secret) > 256 or not secret.isprintable():
        raise InvalidInput(
            "webhook secret must be at most 256 printable characters", field="secret"
        )
    hook = Webhook(party_id=party_id, url=url, secret=secret, events=_normalise_events(events))
    session.add(hook)
    session.flush()
    session.info.pop(_HOOKS, None)
    view = WebhookView.of(hook)
    record(
        session,
        actor=actor,
        action="webhook.registered",
        data={"webhook_id": view.id, "party_id": party_id, "url": url, "events": hook.events},
    )
    return view


def deactivate_webhook(session: Session, webhook_id: int, *, actor: str = "system") -> None:
    """Stop future events (already queued ones are given up at delivery time)."""
    hook = repository.webhook_by_id(session, webhook_id)
    if hook is None:
        raise WebhookNotFound(f"webhook {webhook_id} not found", field="webhook_id")
    hook.active = False
    session.add(hook)
    record(session, actor=actor, action="webhook.deactivated", data={"webhook_id": webhook_id})
    session.info.pop(_HOOKS, None)


def list_webhooks(session: Session, party_id: int | None = None) -> list[WebhookView]:
    return [WebhookView.of(h) for h in repository.webhooks(session, party_id)]


def _json_default(value: object) -> object:
    """Types a domain payload legitimately carries; anything else is a bug, not a str()."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"cannot put {type(value).__name__} in a webhook payload")


def _subscribed(hook: Webhook, event_type: str) -> bool:
    return hook.events == ALL_EVENTS or event_type in hook.events.split(",")


_HOOKS = "custody.notify.active_hooks"


def _active_hooks(session: Session) -> list[Webhook]:
    """Active webhooks, read once per transaction (busy writers like the watcher queue
    many events per block; subscriptions do not change under a writing transaction)."""
    cached: list[Webhook] | None = session.info.get(_HOOKS)
    if cached is None:
        cached = repository.active_webhooks(session)
        session.info[_HOOKS] = cached
    return cached


@sa_event.listens_for(SASession, "after_transaction_end")
def _forget_hooks(session: SASession, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_HOOKS, None)


def enqueue(
    session: Session,
    *,
    party_ids: Iterable[int],
    event_type: str,
    payload: dict[str, Any],
) -> list[str]:
    """Queue ``event_type`` for every active webhook of ``party_ids`` that wants it.

    Runs in the caller's transaction and never commits. Returns the new event ids (one
    per webhook; empty if nobody subscribed)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}")
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=_json_default)
    wanted = sorted(set(party_ids))
    if not wanted:
        return []
    hooks = [h for h in _active_hooks(session) if h.party_id in wanted]
    now = utcnow()
    event_ids: list[str] = []
    for hook in hooks:
        if not _subscribed(hook, event_type):
            continue
        assert hook.id is not None
        event_id = str(uuid.uuid4())
        session.add(
            Outbox(
                event_id=event_id,
                webhook_id=hook.id,
                event_type=event_type,
                payload=body,
                created_at=now,
                next_attempt_at=now,
            )
        )
        event_ids.append(event_id)
    return event_ids
