"""Delivering the outbox: signed POSTs, retried with capped exponential backoff.

Rows are *claimed* in one short transaction (PostgreSQL: ``FOR UPDATE SKIP LOCKED``;
SQLite: ``BEGIN IMMEDIATE`` makes the claim single-writer) by pushing their
``next_attempt_at`` a lease into the future, then POSTed with no transaction open, then
each outcome is written in its own small transaction. No database lock is ever held
across a network call, so a slow receiver cannot stall the rest of the service, and two
workers never send the same row at the same time. A worker that dies mid-batch only
delays its rows until the lease runs out: delivery is at-least-once, and the stable
event id lets receivers make it exactly-once.

Each POST goes only where `custody.netpolicy` allows (off regtest: https to public
addresses), to the address checked just before, and never follows a redirect.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import structlog
from sqlalchemy.engine import Engine

from custody.db.models import utcnow
from custody.db.session import transaction
from custody.netpolicy import Resolver, UrlPolicy, checked_addresses, parse_url, resolve_host
from custody.notify import metrics, repository
from pledge.errors import InvalidInput

log = structlog.get_logger(__name__)

SIGNATURE_SCHEME = "sha256"
USER_AGENT = "pledge-custody-webhooks/1"
MAX_ERROR_LENGTH = 500


@dataclass(frozen=True)
class RetryPolicy:
    """After the n-th failed attempt wait ``base * 2**n`` seconds, at most ``cap``;
    give up (mark the row dead, keep it) once ``max_attempts`` attempts have failed.

    ``jitter`` removes a random fraction (0..jitter) of each delay so receivers that
    came back from an outage are not hit by every retry in the same second."""

    base_seconds: float = 1.0
    cap_seconds: float = 3600.0
    max_attempts: int = 15
    jitter: float = 0.0
    lease_seconds: float = 300.0  # a claim's lifetime; must exceed the HTTP timeout

    def delay(self, attempts: int, rng: random.Random | None = None) -> timedelta:
        seconds = min(self.cap_seconds, self.base_seconds * 2 ** min(attempts, 62))
        if self.jitter > 0:
            seconds -= seconds * self.jitter * (rng or random).random()
        return timedelta(seconds=seconds)


DEFAULT_POLICY = RetryPolicy()


@dataclass(frozen=True)
class DeliveryReport:
    attempted: int = 0
    delivered: int = 0
    failed: int = 0  # will be retried
    dead: int = 0  # retries exhausted, or the webhook was deactivated


@dataclass(frozen=True)
class _Claim:
    """A snapshot of a claimed row, so the POST needs no open session."""

    outbox_id: int
    event_id: str
    event_type: str
    payload: str
    created_at: datetime
    attempts: int
    webhook_id: int
    url: str
    secret: str
    active: bool


def _timestamp(at: datetime) -> str:
    return str(int(at.timestamp()))


def sign(secret: str, timestamp: str, body: bytes | str) -> str:
    """The ``X-Custody-Signature`` value: HMAC-SHA256 over ``timestamp + "." + body``.

    The timestamp is inside the MAC so a captured delivery cannot be replayed later
    with a fresh timestamp; receivers should reject stale ones (see ``verify_signature``)."""
    raw = body.encode() if isinstance(body, str) else body
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + raw, hashlib.sha256)
    return f"{SIGNATURE_SCHEME}={mac.hexdigest()}"


def verify_signature(
    secret: str,
    timestamp: str,
    body: bytes | str,
    header: str,
    *,
    tolerance_seconds: float | None = None,
    now: datetime | None = None,
) -> bool:
    """For receivers: does ``header`` sign exactly this body at this timestamp?

    Constant-time comparison. With ``tolerance_seconds``, a timestamp further than that
    from ``now`` is rejected too (replay protection)."""
    expected = sign(secret, timestamp, body)
    if not hmac.compare_digest(expected.encode(), header.strip().encode()):
        return False
    if tolerance_seconds is not None:
        try:
            sent = int(timestamp)
        except ValueError:
            return False
        current = (now or datetime.now(UTC)).timestamp()
        if abs(current - sent) > tolerance_seconds:
            return False
    return True


def _as_utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def render_body(event_id: str, event_type: str, created_at: datetime, payload: str) -> bytes:
    """The exact bytes that are signed and sent."""
    document: dict[str, Any] = {
        "id": event_id,
        "type": event_type,
        "created_at": _as_utc(created_at).isoformat(),
        "data": json.loads(payload),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _claim(engine: Engine, now: datetime, batch: int, policy: RetryPolicy) -> list[_Claim]:
    lease_until = now + timedelta(seconds=policy.lease_seconds)
    with transaction(engine) as session:
        rows = repository.claim_due_events(session, now, batch)
        claims: list[_Claim] = []
        for row, hook in rows:
            assert row.id is not None and hook.id is not None
            claims.append(
                _Claim(
                    outbox_id=row.id,
                    event_id=row.event_id,
                    event_type=row.event_type,
                    payload=row.payload,
                    created_at=row.created_at,
                    attempts=row.attempts,
                    webhook_id=hook.id,
                    url=hook.url,
                    secret=hook.secret,
                    active=hook.active,
                )
            )
            row.next_attempt_at = lease_until
            session.add(row)
    return claims


def _send(
    client: httpx.Client, claim: _Claim, at: datetime, urls: UrlPolicy, resolve: Resolver
) -> str | None:
    """POST one event; None on a 2xx, else a short reason (no body, no secret).

    The host is resolved here and every address checked by `urls`, then the request goes
    to the first of them: the address that was checked, not one a second lookup might
    give (DNS rebinding). Host and TLS SNI (so the certificate check) keep the name."""
    try:
        target = parse_url(claim.url, urls)
        address = checked_addresses(target, urls, resolve)[0]
    except InvalidInput as exc:  # UrlNotAllowed among them: refused, nothing sent
        return f"refused: {exc.message}"[:MAX_ERROR_LENGTH]
    body = render_body(claim.event_id, claim.event_type, claim.created_at, claim.payload)
    timestamp = _timestamp(at)
    headers = {
        "Host": target.host_header,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Custody-Event-Id": claim.event_id,
        "X-Custody-Event-Type": claim.event_type,
        "X-Custody-Timestamp": timestamp,
        "X-Custody-Signature": sign(claim.secret, timestamp, body),
    }
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        # Never follow redirects: the URL was checked, wherever it points next was not.
        # A 3xx is a failed delivery like any other non-2xx.
        response = client.post(
            target.pinned(address),
            content=body,
            headers=headers,
            extensions=extensions,
            follow_redirects=False,
        )
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_LENGTH]
    if 200 <= response.status_code < 300:
        return None
    return f"HTTP {response.status_code}"


def _record_outcome(
    engine: Engine,
    claim: _Claim,
    at: datetime,
    error: str | None,
    policy: RetryPolicy,
    rng: random.Random | None,
) -> str:
    """Write one row's outcome; returns "delivered", "failed", "dead" or "stale"."""
    with transaction(engine) as session:
        row = repository.outbox_row_for_update(session, claim.outbox_id)
        if row is None or row.delivered_at is not None or row.dead_at is not None:
            return "stale"
        if error is None:
            row.attempts += 1
            row.delivered_at = at
            outcome = "delivered"
        elif row.attempts != claim.attempts:
            # Our lease ran out and another worker has tried since: its outcome stands.
            return "stale"
        else:
            row.attempts += 1
            row.last_error = error
            if row.attempts >= policy.max_attempts or not claim.active:
                row.dead_at = at
                outcome = "dead"
            else:
                row.next_attempt_at = at + policy.delay(row.attempts, rng)
                outcome = "failed"
        session.add(row)
    return outcome


def _release(
    engine: Engine, claims: list[_Claim], claimed_at: datetime, policy: RetryPolicy, now: datetime
) -> None:
    lease_until = claimed_at + timedelta(seconds=policy.lease_seconds)
    with transaction(engine) as session:
        repository.release_claims(session, [c.outbox_id for c in claims], lease_until, now)


def deliver_due(
    engine: Engine,
    *,
    client: httpx.Client,
    urls: UrlPolicy,
    resolve: Resolver = resolve_host,
    now: datetime | None = None,
    batch: int = 100,
    policy: RetryPolicy = DEFAULT_POLICY,
    rng: random.Random | None = None,
    stop: threading.Event | None = None,
) -> DeliveryReport:
    """Send up to ``batch`` due events once each, each only to an address `urls` allows
    (`UrlPolicy.for_network(settings.network)`), as `resolve` finds it.

    ``now`` pins the clock (tests drive retries with it); by default each outcome is
    stamped with the real time it happened. Once ``stop`` is set no further event is
    sent: the claims not sent are given back, due at once for the next worker."""
    clock: Callable[[], datetime] = (lambda: now) if now is not None else utcnow
    claimed_at = clock()
    claims = _claim(engine, claimed_at, batch, policy)
    counts = {"delivered": 0, "failed": 0, "dead": 0, "stale": 0}
    for done, claim in enumerate(claims):
        if stop is not None and stop.is_set():
            _release(engine, claims[done:], claimed_at, policy, clock())
            claims = claims[:done]
            break
        if claim.active:
            started = time.perf_counter()
            error = _send(client, claim, clock(), urls, resolve)
            metrics.ATTEMPT_SECONDS.observe(time.perf_counter() - started)
        else:
            error = "webhook deactivated"
        outcome = _record_outcome(engine, claim, clock(), error, policy, rng)
        counts[outcome] += 1
        if outcome != "stale":
            metrics.DELIVERIES.labels(result=outcome).inc()
        log.info(
            "notify.attempt",
            outcome=outcome,
            event_id=claim.event_id,
            event_type=claim.event_type,
            webhook_id=claim.webhook_id,
            attempt=claim.attempts + 1,
            error=error,
        )
    return DeliveryReport(
        attempted=len(claims),
        delivered=counts["delivered"],
        failed=counts["failed"],
        dead=counts["dead"],
    )


class DeliveryWorker:
    """Runs ``deliver_due`` until told to stop; safe to run several (threads or
    processes) against one database."""

    def __init__(
        self,
        engine: Engine,
        client: httpx.Client,
        *,
        urls: UrlPolicy,
        resolve: Resolver = resolve_host,
        batch: int = 100,
        policy: RetryPolicy = DEFAULT_POLICY,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        self.client = client
        self.urls = urls
        self.resolve = resolve
        self.batch = batch
        self.policy = policy
        self.rng = rng

    def run_once(self, stop: threading.Event | None = None) -> DeliveryReport:
        return deliver_due(
            self.engine,
            client=self.client,
            urls=self.urls,
            resolve=self.resolve,
            batch=self.batch,
            policy=self.policy,
            rng=self.rng,
            stop=stop,
        )

    def run(
        self,
        stop: threading.Event,
        poll: float = 1.0,
        beat: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        """Loop until ``stop`` is set: a full batch goes round again at once, otherwise
        wait ``poll`` seconds (woken early by ``stop``). A database outage is logged and
        retried, never fatal. ``beat`` hears each pass's outcome (the heartbeat)."""
        while not stop.is_set():
            try:
                report = self.run_once(stop)
            except Exception as exc:
                log.exception("notify.delivery_error")
                if beat is not None:
                    beat(exc)
                stop.wait(poll)
                continue
            if beat is not None:
                beat(None)
            if report.attempted < self.batch:
                stop.wait(poll)
