"""The console's queries: invitations, passkeys, sessions, challenges, and what its pages
read that no other domain's repository answers (a loan's audit timeline, recent alerts)."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session, col, delete, select

from custody.db.models import (
    AuditEvent,
    ConsoleChallenge,
    ConsoleInvitation,
    ConsolePasskey,
    ConsoleSession,
    Party,
    PriceRecord,
    PriceState,
    Principal,
    SigningRequest,
    WatcherLease,
)


def principal(session: Session, principal_id: int) -> Principal | None:
    return session.get(Principal, principal_id)


def principal_by_name(session: Session, name: str) -> Principal | None:
    return session.exec(select(Principal).where(Principal.name == name)).first()


def invitation_by_token_hash(
    session: Session, token_hash: str, *, lock: bool
) -> ConsoleInvitation | None:
    """The invitation; `lock`: its row locked (PostgreSQL) so two uses of one link queue
    (a read-only transaction, the invitation page's, may not lock)."""
    query = select(ConsoleInvitation).where(ConsoleInvitation.token_hash == token_hash)
    return session.exec(query.with_for_update() if lock else query).first()


def challenge_by_value(session: Session, challenge: str) -> ConsoleChallenge | None:
    query = select(ConsoleChallenge).where(ConsoleChallenge.challenge == challenge)
    return session.exec(query.with_for_update()).first()


def delete_challenge(session: Session, row: ConsoleChallenge) -> None:
    session.delete(row)


def delete_expired_challenges(session: Session, now: datetime) -> None:
    session.exec(delete(ConsoleChallenge).where(col(ConsoleChallenge.expires_at) < now))


def passkey_by_credential_id(session: Session, credential_id: str) -> ConsolePasskey | None:
    query = select(ConsolePasskey).where(ConsolePasskey.credential_id == credential_id)
    return session.exec(query.with_for_update()).first()


def passkeys_of(session: Session, principal_id: int) -> list[ConsolePasskey]:
    query = select(ConsolePasskey).where(ConsolePasskey.principal_id == principal_id)
    return list(session.exec(query.order_by(col(ConsolePasskey.id))).all())


def principals_with_passkeys(session: Session, roles: tuple[str, ...]) -> list[Principal]:
    """Principals of these roles (not revoked) who registered a console passkey."""
    query = (
        select(Principal)
        .where(col(Principal.role).in_(roles), col(Principal.disabled).is_(False))
        .where(col(Principal.id).in_(select(ConsolePasskey.principal_id)))
        .order_by(col(Principal.id))
    )
    return list(session.exec(query).all())


def session_by_token_hash(session: Session, token_hash: str) -> ConsoleSession | None:
    query = select(ConsoleSession).where(ConsoleSession.token_hash == token_hash)
    return session.exec(query).first()


def session_by_id(session: Session, session_id: int) -> ConsoleSession | None:
    return session.get(ConsoleSession, session_id)


def delete_session(session: Session, row: ConsoleSession) -> None:
    session.delete(row)


def loan_events(session: Session, loan_id: int, limit: int = 200) -> list[AuditEvent]:
    """The loan's audit trail, oldest first (what the loan page's timeline shows)."""
    query = (
        select(AuditEvent)
        .where(AuditEvent.loan_id == loan_id)
        .order_by(col(AuditEvent.id).desc())
        .limit(limit)
    )
    return list(reversed(session.exec(query).all()))


def recent_alerts(session: Session, limit: int = 20) -> list[AuditEvent]:
    """The latest `alert.*` events (unexpected spends, stalls), newest first."""
    query = (
        select(AuditEvent)
        .where(col(AuditEvent.action).startswith("alert."))
        .order_by(col(AuditEvent.id).desc())
        .limit(limit)
    )
    return list(session.exec(query).all())


def watcher_lease(session: Session) -> WatcherLease | None:
    return session.get(WatcherLease, 1)


def parties_by_id(session: Session, party_ids: list[int]) -> dict[int, Party]:
    rows = session.exec(select(Party).where(col(Party.id).in_(party_ids))).all()
    return {p.id: p for p in rows if p.id is not None}


def open_requests_of_loans(session: Session, loan_ids: list[int]) -> list[SigningRequest]:
    """Signing requests still collecting signatures on these loans, oldest first."""
    if not loan_ids:
        return []
    query = (
        select(SigningRequest)
        .where(
            col(SigningRequest.loan_id).in_(loan_ids),
            SigningRequest.state == "awaiting_signatures",
        )
        .order_by(col(SigningRequest.id))
    )
    return list(session.exec(query).all())


def confirmed_prices_since(
    session: Session, since: datetime, limit: int = 500
) -> list[PriceRecord]:
    """Confirmed manual prices from `since` on, oldest first (the loan page's chart)."""
    query = (
        select(PriceRecord)
        .where(PriceRecord.state == PriceState.confirmed, col(PriceRecord.confirmed_at) >= since)
        .order_by(col(PriceRecord.confirmed_at).desc())
        .limit(limit)
    )
    return list(reversed(session.exec(query).all()))


def confirmed_price_before(session: Session, before: datetime) -> PriceRecord | None:
    """The confirmed manual price in effect at `before` (the chart's first point)."""
    query = (
        select(PriceRecord)
        .where(PriceRecord.state == PriceState.confirmed, col(PriceRecord.confirmed_at) < before)
        .order_by(col(PriceRecord.confirmed_at).desc())
        .limit(1)
    )
    return session.exec(query).first()


def audit_events(
    session: Session,
    *,
    action: str | None,
    loan_id: int | None,
    actor: str | None,
    decision: str | None,
    before_id: int | None,
    limit: int,
) -> list[AuditEvent]:
    """The audit log newest first, filtered: `action` is a prefix (`deposit.` or a whole
    name), `actor` and `decision` exact; `before_id` pages back."""
    query = select(AuditEvent)
    if action:
        query = query.where(col(AuditEvent.action).startswith(action, autoescape=True))
    if loan_id is not None:
        query = query.where(AuditEvent.loan_id == loan_id)
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if decision:
        query = query.where(AuditEvent.decision == decision)
    if before_id is not None:
        query = query.where(col(AuditEvent.id) < before_id)
    return list(session.exec(query.order_by(col(AuditEvent.id).desc()).limit(limit)).all())
