"""Subscriptions and the transactional outbox.

``enqueue`` only queues rows in the caller's session, written by one INSERT as it commits:
the events become visible to the delivery worker exactly when the caller's transaction
commits, and vanish with it if it rolls back. Nothing here talks to the network.

An event's id is derived from the fact it reports (``event_id``: its type and a key such as
loan, outpoint, block and epoch), never drawn at random, and a row is unique per (webhook,
event id) and inserted only if absent: a replayed state change, or a reorg that brings
back exactly what was already announced, queues nothing new.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session as SASession
from sqlalchemy.orm import SessionTransaction
from sqlmodel import Session

from custody.audit.service import record
from custody.db.models import Webhook, utcnow
from custody.errors import PartyNotFound, WebhookNotFound
from custody.netpolicy import UrlPolicy, parse_url
from custody.notify import repository
from pledge.errors import InvalidInput

EVENT_TYPES: frozenset[str] = frozenset(
    {
        "deposit.seen",
        "deposit.confirmed",
        "deposit.unconfirmed",
        "deposit.removed",
        "loan.active",
        "loan.awaiting_deposit",
        "loan.margin_call",
        "liquidation.started",
        "liquidation.broadcast",
        "liquidation.confirmed",
        "release.ready_to_sign",
        "signature.needed",
        "watcher.stalled",
        "watcher.recovered",
        "screening.blocked",  # the bank only: an AML block (custody/screening)
    }
)
ALL_EVENTS = "*"
MIN_SECRET_LENGTH = 32
# Fixed for ever: event ids are uuid5(this, type and key), and receivers store them.
EVENT_ID_NAMESPACE = uuid.UUID("3f9d1f0e-5b8a-4c2e-9a61-7c1d2e0b4a55")


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


def validate_url(url: str, urls: UrlPolicy) -> str:
    """The URL's shape and scheme, and an address literal's address, by `urls`; a host
    name's addresses are checked (a DNS lookup, `custody.netpolicy.check_url`) by the
    caller before its transaction, and again at every delivery."""
    url = url.strip()
    parse_url(url, urls)
    return url


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
    urls: UrlPolicy,
    actor: str = "system",
) -> WebhookView:
    """Subscribe ``party_id``'s endpoint, in the caller's transaction (audited). `urls`
    is the network's URL policy (`UrlPolicy.for_network`)."""
    if repository.party_by_id(session, party_id) is None:
        raise PartyNotFound()
    url = validate_url(url, urls)
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
        raise WebhookNotFound(field="webhook_id")
    hook.active = False
    session.add(hook)
    record(session, actor=actor, action="webhook.deactivated", data={"webhook_id": webhook_id})
    session.info.pop(_HOOKS, None)


def list_webhooks(session: Session, party_id: int | None = None) -> list[WebhookView]:
    """Every webhook, or one party's; a party that does not exist is not found (as when
    registering one), not an empty list."""
    if party_id is not None and repository.party_by_id(session, party_id) is None:
        raise PartyNotFound()
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
_QUEUED = "custody.notify.queued"  # this transaction's outbox rows, by (webhook, event id)


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
        session.info.pop(_QUEUED, None)  # written by the commit, or rolled back with it


def _write_queued(session: SASession) -> None:
    """Write this transaction's events in one INSERT that skips those already there.
    After every other change (two writers of one fact first meet on the rows the fact
    changed, never while holding each other's outbox rows), and before the audit chain
    takes its lock (this listener runs first)."""
    queued: dict[tuple[int, str], dict[str, Any]] | None = session.info.get(_QUEUED)
    if not queued or session.in_nested_transaction():
        return  # a savepoint's release is not the commit: the rows wait for it
    session.flush()
    repository.insert_events_if_absent(session, list(queued.values()))
    queued.clear()


sa_event.listen(SASession, "before_commit", _write_queued, insert=True)


def event_id(event_type: str, key: str) -> str:
    """The id of the event of `event_type` about the fact `key` names: a name-based UUID
    (RFC 4122 version 5), the same wherever and however often that fact is reported."""
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{event_type}\n{key}"))


def enqueue(
    session: Session,
    *,
    party_ids: Iterable[int],
    event_type: str,
    payload: dict[str, Any],
    key: str,
) -> list[str]:
    """Queue the `event_type` event about the fact `key` for every active webhook of
    `party_ids` that wants it.

    Runs in the caller's transaction and never commits; the rows are written as it
    commits, each only if that webhook does not have this event yet (a replay of the
    same fact queues nothing). Returns the event's id once per webhook that wants it
    (empty if nobody subscribed)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}")
    wanted = set(party_ids)
    hooks = [
        h for h in _active_hooks(session) if h.party_id in wanted and _subscribed(h, event_type)
    ]
    if not hooks:
        return []  # nobody to tell: no body, no id (the watcher queues thousands a block)
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=_json_default)
    now = utcnow()
    the_id = event_id(event_type, key)
    queued: dict[tuple[int, str], dict[str, Any]] = session.info.setdefault(_QUEUED, {})
    event_ids: list[str] = []
    for hook in hooks:
        assert hook.id is not None
        queued.setdefault(
            (hook.id, the_id),
            {
                "event_id": the_id,
                "webhook_id": hook.id,
                "event_type": event_type,
                "payload": body,
                "created_at": now,
                "attempts": 0,
                "next_attempt_at": now,
                "delivered_at": None,
                "dead_at": None,
                "last_error": None,
            },
        )
        event_ids.append(the_id)
    return event_ids
