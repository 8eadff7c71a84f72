"""Console sign-in without a browser, on both databases: invitations, passkeys verified
by py_webauthn (a software authenticator plays the device, and lies where it must), and
sessions. What must be refused is refused and changes nothing."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from support.passkeys import SoftPasskey
from support.world import World, build_world

from custody.config import Settings
from custody.console import service
from custody.db.models import (
    AuditEvent,
    ConsoleInvitation,
    ConsolePasskey,
    ConsoleSession,
    Principal,
)
from custody.db.session import transaction
from custody.errors import InvitationNotValid, NotSignedIn, PasskeyNotVerified

ORIGIN = "https://console.bank.example"


@pytest.fixture
def world(engine: Engine) -> World:
    return build_world(engine, console_origin=ORIGIN)


def _principal(world: World, who: str) -> Principal:
    with Session(world.engine) as session:
        row = session.exec(select(Principal).where(Principal.name == f"user-{who}")).one()
        return row


def _invite(world: World, who: str, hours: int = 1) -> str:
    with transaction(world.engine) as session:
        _, _, token = service.issue_invitation(
            session, actor="admin:test", hours=hours, name=f"user-{who}"
        )
    return token


def _register(world: World, token: str, passkey: SoftPasskey, origin: str = ORIGIN) -> str:
    with transaction(world.engine) as session:
        options = service.registration_options(session, token, ORIGIN)
    credential = json.dumps(passkey.create(options, origin))
    with transaction(world.engine) as session:
        return service.register_passkey(session, token, credential, ORIGIN).session_token


def _sign_in(world: World, passkey: SoftPasskey, **kw: object) -> str:
    with transaction(world.engine) as session:
        options = service.sign_in_options(session, ORIGIN)
    origin = str(kw.pop("origin", ORIGIN))
    credential = json.dumps(passkey.get(options, origin, **kw))  # type: ignore[arg-type]
    with transaction(world.engine) as session:
        return service.sign_in(session, credential, ORIGIN).session_token


def _rows(world: World, model: type) -> list[object]:
    with Session(world.engine) as session:
        return list(session.exec(select(model)).all())


def test_an_invitation_is_stored_as_a_hash_and_works_once(world: World) -> None:
    token = _invite(world, "miner")
    (invitation,) = _rows(world, ConsoleInvitation)
    assert isinstance(invitation, ConsoleInvitation)
    assert invitation.token_hash == service.hash_token(token) and token not in str(invitation)
    events = [e for e in _rows(world, AuditEvent) if isinstance(e, AuditEvent)]
    assert not any(token in e.data for e in events)
    session_token = _register(world, token, SoftPasskey())
    assert len(_rows(world, ConsolePasskey)) == 1
    with pytest.raises(InvitationNotValid, match="has been used"):
        _register(world, token, SoftPasskey())
    assert len(_rows(world, ConsolePasskey)) == 1
    (row,) = _rows(world, ConsoleSession)
    assert isinstance(row, ConsoleSession) and row.token_hash == service.hash_token(session_token)


def test_an_invitation_is_shown_in_a_read_only_transaction(world: World) -> None:
    """The invitation page reads it without locking (PostgreSQL refuses a lock there)."""
    token = _invite(world, "arbiter")
    with transaction(world.engine, write=False) as session:
        _, target = service.open_invitation(session, token, lock=False)
    assert target.name == "user-arbiter"


def test_an_expired_or_unknown_invitation_is_refused(world: World) -> None:
    token = _invite(world, "arbiter")
    with transaction(world.engine) as session:
        (invitation,) = session.exec(select(ConsoleInvitation)).all()
        invitation.expires_at = invitation.expires_at - timedelta(hours=2)
        session.add(invitation)
    with pytest.raises(InvitationNotValid, match="expired"):
        _register(world, token, SoftPasskey())
    with pytest.raises(InvitationNotValid, match="not valid"):
        _register(world, service.new_token(), SoftPasskey())
    assert _rows(world, ConsolePasskey) == []


def test_a_registration_for_another_origin_is_refused_and_the_link_still_works(
    world: World,
) -> None:
    token = _invite(world, "auditor")
    with pytest.raises(PasskeyNotVerified):
        _register(world, token, SoftPasskey(), origin="https://evil.example")
    assert _rows(world, ConsolePasskey) == []
    _register(world, token, SoftPasskey())  # the person's own try still goes through
    assert len(_rows(world, ConsolePasskey)) == 1


def test_a_challenge_answers_once_and_only_for_what_it_was_asked(world: World) -> None:
    passkey = SoftPasskey()
    _register(world, _invite(world, "bank_operator"), passkey)
    with transaction(world.engine) as session:
        options = service.sign_in_options(session, ORIGIN)
    answer = json.dumps(passkey.get(options, ORIGIN))
    with transaction(world.engine) as session:
        service.sign_in(session, answer, ORIGIN)
    with pytest.raises(PasskeyNotVerified, match="did not ask"), transaction(world.engine) as s:
        service.sign_in(s, answer, ORIGIN)  # replayed
    # A registration's challenge does not sign anybody in.
    token = _invite(world, "bank_approver")
    with transaction(world.engine) as session:
        registration = service.registration_options(session, token, ORIGIN)
    forged = json.dumps(
        passkey.get(
            json.dumps({**json.loads(registration), "rpId": "console.bank.example"}), ORIGIN
        )
    )
    with pytest.raises(PasskeyNotVerified, match="did not ask"), transaction(world.engine) as s:
        service.sign_in(s, forged, ORIGIN)
    assert len(_rows(world, ConsoleSession)) == 2  # the registration's and one sign-in


def test_a_cloned_authenticator_is_refused(world: World) -> None:
    passkey = SoftPasskey()
    _register(world, _invite(world, "miner"), passkey)
    _sign_in(world, passkey)
    _sign_in(world, passkey)
    with pytest.raises(PasskeyNotVerified):
        _sign_in(world, passkey, count_up=False)  # the same count again: a copy of the key


def test_an_unknown_or_revoked_passkey_signs_nobody_in(world: World) -> None:
    with pytest.raises(PasskeyNotVerified, match="not registered"):
        _sign_in(world, SoftPasskey())
    passkey = SoftPasskey()
    _register(world, _invite(world, "other_miner"), passkey)
    assert world.call("admin", "GET", "/v1/me").status_code == 200
    other = _principal(world, "other_miner")
    r = world.call("admin", "POST", f"/v1/principals/{other.id}/revoke")
    assert r.status_code == 200, r.text
    with pytest.raises(PasskeyNotVerified, match="revoked"):
        _sign_in(world, passkey)


def test_sessions_end_when_idle_or_signed_out(world: World) -> None:
    idle = Settings().console_idle_seconds
    token = _register(world, _invite(world, "auditor"), SoftPasskey())
    with Session(world.engine) as session:
        check = service.check_session(session, token, idle_seconds=idle)
    assert check.principal is not None and check.error is None and not check.touch_due
    with transaction(world.engine) as session:
        (row,) = session.exec(select(ConsoleSession)).all()
        row.last_seen_at = row.last_seen_at - timedelta(seconds=idle - 5)
        session.add(row)
    with Session(world.engine) as session:
        check = service.check_session(session, token, idle_seconds=idle)
    assert check.principal is not None and check.touch_due
    assert check.session_id is not None
    with transaction(world.engine) as session:
        service.touch_session(session, check.session_id)
    with transaction(world.engine) as session:
        (row,) = session.exec(select(ConsoleSession)).all()
        row.last_seen_at = row.last_seen_at - timedelta(seconds=idle + 1)
        session.add(row)
    with Session(world.engine) as session:
        check = service.check_session(session, token, idle_seconds=idle)
    assert isinstance(check.error, NotSignedIn) and check.ended is not None
    second = _register(world, _invite(world, "auditor"), SoftPasskey())
    with transaction(world.engine) as session:
        service.sign_out(session, second)
    with Session(world.engine) as session:
        check = service.check_session(session, second, idle_seconds=idle)
    assert isinstance(check.error, NotSignedIn) and check.ended is None


@pytest.mark.unit
def test_the_csrf_token_is_the_sessions_own() -> None:
    one, two = service.new_token(), service.new_token()
    assert service.csrf_matches(one, service.csrf_token(one))
    assert not service.csrf_matches(one, service.csrf_token(two))
    assert not service.csrf_matches(one, None) and not service.csrf_matches(one, "")
    assert service.csrf_token(one) != service.hash_token(one)  # not the stored hash


@pytest.mark.unit
def test_cookies_are_secure_off_loopback() -> None:
    assert service.is_loopback("http://localhost:8080")
    assert service.is_loopback("http://127.0.0.1:8080")
    assert not service.is_loopback("https://console.bank.example")
    assert service.rp_id("https://console.bank.example:8443") == "console.bank.example"
