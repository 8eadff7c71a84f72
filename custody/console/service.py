"""Console sign-in: invitations, passkeys (WebAuthn, verified by py_webauthn), sessions
and their CSRF tokens.

Bearer tokens (the invitation link's, the session cookie's) are 256-bit random strings
shown once; the database keeps their SHA-256 only. The CSRF token is an HMAC of the
session's token, so it is stored nowhere and only the cookie's holder can compute it.
Each function runs in the caller's transaction and writes its audit event there.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlmodel import Session
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import (
    base64url_to_bytes,
    bytes_to_base64url,
    parse_authentication_credential_json,
    parse_client_data_json,
    parse_registration_credential_json,
)
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from custody.audit.service import record
from custody.auth.context import Context
from custody.auth.policy import require_role
from custody.console import repository
from custody.db.models import (
    ConsoleChallenge,
    ConsoleInvitation,
    ConsolePasskey,
    ConsoleSession,
    Principal,
    Role,
    utcnow,
)
from custody.errors import (
    InvitationNotValid,
    NoConsoleForRole,
    NotSignedIn,
    PasskeyNotVerified,
    PasskeyNotWithSigner,
    PrincipalNotFound,
    PrincipalRevoked,
)
from custody.signer import service as signer_statements

CHALLENGE_SECONDS = 300
RP_NAME = "Pledge custody"
REGISTER = "register"
SIGN_IN = "sign_in"
# A session's last-seen time is written at most this often (a write per page is waste).
TOUCH_SECONDS = 30


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_token(session_token: str) -> str:
    """The session's CSRF token: derived from the cookie's token, stored nowhere."""
    return hmac.new(session_token.encode(), b"console-csrf", hashlib.sha256).hexdigest()


def csrf_matches(session_token: str, submitted: str | None) -> bool:
    return submitted is not None and hmac.compare_digest(csrf_token(session_token), submitted)


def rp_id(origin: str) -> str:
    """The relying party: the console origin's host (a domain name, as WebAuthn wants)."""
    host = urlsplit(origin).hostname
    if not host:
        raise ValueError(f"console origin {origin!r} has no host")
    return host


def is_loopback(origin: str) -> bool:
    """Cookies are `Secure` unless the console is served on this machine over plain HTTP."""
    return rp_id(origin) in ("localhost", "127.0.0.1", "::1")


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


# -- invitations -------------------------------------------------------------------------------


def issue_invitation(
    session: Session,
    *,
    actor: str,
    hours: int,
    principal_id: int | None = None,
    name: str | None = None,
) -> tuple[ConsoleInvitation, Principal, str]:
    """Invite a principal (by id: an admin through the API; by name: the CLI, actor `cli`)
    to register a passkey. Returns the token for the link: the only time it exists outside
    the link."""
    if principal_id is not None:
        target = repository.principal(session, principal_id)
        wanted = f"principal {principal_id}"
    else:
        assert name is not None
        target = repository.principal_by_name(session, name)
        wanted = f"principal {name!r}"
    if target is None or target.id is None:
        raise PrincipalNotFound(f"{wanted} not found")
    if target.disabled:
        raise PrincipalRevoked(f"{wanted} is revoked: it cannot sign in")
    if target.role == Role.risk_engine:
        raise NoConsoleForRole("the risk engine is automation: it has no console")
    token = new_token()
    invitation = ConsoleInvitation(
        principal_id=target.id,
        token_hash=hash_token(token),
        created_by=actor,
        expires_at=utcnow() + timedelta(hours=hours),
    )
    session.add(invitation)
    session.flush()
    record(
        session,
        actor=actor,
        action="console.invitation_issued",
        data={
            "invitation_id": invitation.id,
            "principal_id": target.id,
            "expires_at": invitation.expires_at.isoformat(),
        },
    )
    return invitation, target, token


def open_invitation(
    session: Session, token: str, *, lock: bool = True
) -> tuple[ConsoleInvitation, Principal]:
    """The invitation behind a link and its principal, if the link can still be used
    (`lock=False` only to show it, in a read-only transaction)."""
    invitation = repository.invitation_by_token_hash(session, hash_token(token), lock=lock)
    if invitation is None:
        raise InvitationNotValid("this invitation link is not valid")
    if invitation.used_at is not None:
        raise InvitationNotValid("this invitation link has been used: ask an admin for a new one")
    if _aware(invitation.expires_at) <= utcnow():
        raise InvitationNotValid("this invitation link has expired: ask an admin for a new one")
    target = repository.principal(session, invitation.principal_id)
    if target is None or target.disabled:
        raise InvitationNotValid("this invitation's principal is revoked")
    return invitation, target


# -- WebAuthn challenges -------------------------------------------------------------------------


def _new_challenge(session: Session, purpose: str, invitation_id: int | None) -> bytes:
    now = utcnow()
    repository.delete_expired_challenges(session, now)
    challenge = secrets.token_bytes(32)
    session.add(
        ConsoleChallenge(
            purpose=purpose,
            challenge=bytes_to_base64url(challenge),
            invitation_id=invitation_id,
            expires_at=now + timedelta(seconds=CHALLENGE_SECONDS),
        )
    )
    session.flush()
    return challenge


def _take_challenge(
    session: Session, client_data_json: bytes, purpose: str, invitation_id: int | None
) -> bytes:
    """The challenge the browser signed over, consumed: each is good for one answer."""
    try:
        client_data = parse_client_data_json(client_data_json)
    except WebAuthnException as exc:
        raise PasskeyNotVerified(f"the passkey's answer could not be read: {exc}") from exc
    row = repository.challenge_by_value(session, bytes_to_base64url(client_data.challenge))
    if row is None or row.purpose != purpose or row.invitation_id != invitation_id:
        raise PasskeyNotVerified("the passkey answered a challenge this page did not ask")
    repository.delete_challenge(session, row)
    if _aware(row.expires_at) <= utcnow():
        raise PasskeyNotVerified("the passkey answered too late: try again")
    return base64url_to_bytes(row.challenge)


# -- registration ---------------------------------------------------------------------------------


def registration_options(session: Session, token: str, origin: str) -> str:
    """The `navigator.credentials.create` options (JSON) for the invitation's principal."""
    invitation, target = open_invitation(session, token)
    assert target.id is not None
    challenge = _new_challenge(session, REGISTER, invitation.id)
    options = generate_registration_options(
        rp_id=rp_id(origin),
        rp_name=RP_NAME,
        user_id=f"principal:{target.id}".encode(),
        user_name=target.name,
        user_display_name=f"{target.name} ({target.role})",
        challenge=challenge,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.REQUIRED,
            user_verification=UserVerificationRequirement.REQUIRED,
        ),
        exclude_credentials=[
            PublicKeyCredentialDescriptor(id=base64url_to_bytes(p.credential_id))
            for p in repository.passkeys_of(session, target.id)
        ],
    )
    return options_to_json(options)


@dataclass(frozen=True)
class SignedIn:
    principal: Principal
    session_token: str  # for the cookie; the database keeps its hash


def register_passkey(session: Session, token: str, credential: str, origin: str) -> SignedIn:
    """Verify the new credential against the invitation's challenge, keep its public part,
    use the invitation up, and sign the person in."""
    invitation, target = open_invitation(session, token)
    assert target.id is not None
    try:
        parsed = parse_registration_credential_json(credential)
    except WebAuthnException as exc:
        raise PasskeyNotVerified(f"the passkey's answer could not be read: {exc}") from exc
    challenge = _take_challenge(session, parsed.response.client_data_json, REGISTER, invitation.id)
    try:
        verified = verify_registration_response(
            credential=parsed,
            expected_challenge=challenge,
            expected_rp_id=rp_id(origin),
            expected_origin=origin,
            require_user_verification=True,
        )
    except WebAuthnException as exc:
        raise PasskeyNotVerified(f"the passkey did not verify: {exc}") from exc
    credential_id = bytes_to_base64url(verified.credential_id)
    if repository.passkey_by_credential_id(session, credential_id) is not None:
        raise PasskeyNotVerified("this passkey is already registered")
    invitation.used_at = utcnow()
    session.add(invitation)
    passkey = ConsolePasskey(
        principal_id=target.id,
        credential_id=credential_id,
        public_key=bytes_to_base64url(verified.credential_public_key),
        sign_count=verified.sign_count,
    )
    session.add(passkey)
    session.flush()
    actor = f"{target.role}:{target.name}"
    record(
        session,
        actor=actor,
        action="console.passkey_registered",
        data={"invitation_id": invitation.id, "passkey_id": passkey.id, "principal_id": target.id},
    )
    return SignedIn(target, _open_session(session, target))


# -- sign-in and sessions ------------------------------------------------------------------------


def sign_in_options(session: Session, origin: str) -> str:
    """The `navigator.credentials.get` options (JSON): any of this site's passkeys."""
    challenge = _new_challenge(session, SIGN_IN, None)
    options = generate_authentication_options(
        rp_id=rp_id(origin),
        challenge=challenge,
        user_verification=UserVerificationRequirement.REQUIRED,
    )
    return options_to_json(options)


def sign_in(session: Session, credential: str, origin: str) -> SignedIn:
    """Verify a passkey's assertion against a sign-in challenge and the credential on
    record, and open a session. A sign count that does not grow (from a credential that
    counts) means a cloned authenticator: refused."""
    try:
        parsed = parse_authentication_credential_json(credential)
    except WebAuthnException as exc:
        raise PasskeyNotVerified(f"the passkey's answer could not be read: {exc}") from exc
    challenge = _take_challenge(session, parsed.response.client_data_json, SIGN_IN, None)
    passkey = repository.passkey_by_credential_id(session, bytes_to_base64url(parsed.raw_id))
    if passkey is None:
        raise PasskeyNotVerified("this passkey is not registered here")
    target = repository.principal(session, passkey.principal_id)
    if target is None or target.disabled:
        raise PasskeyNotVerified("this passkey's principal is revoked")
    try:
        verified = verify_authentication_response(
            credential=parsed,
            expected_challenge=challenge,
            expected_rp_id=rp_id(origin),
            expected_origin=origin,
            credential_public_key=base64url_to_bytes(passkey.public_key),
            credential_current_sign_count=passkey.sign_count,
            require_user_verification=True,
        )
    except WebAuthnException as exc:
        raise PasskeyNotVerified(f"the passkey did not verify: {exc}") from exc
    passkey.sign_count = verified.new_sign_count
    passkey.last_used_at = utcnow()
    session.add(passkey)
    record(
        session,
        actor=f"{target.role}:{target.name}",
        action="console.signed_in",
        data={"passkey_id": passkey.id, "principal_id": target.id},
    )
    return SignedIn(target, _open_session(session, target))


def _open_session(session: Session, target: Principal) -> str:
    assert target.id is not None
    token = new_token()
    session.add(ConsoleSession(principal_id=target.id, token_hash=hash_token(token)))
    session.flush()
    return token


@dataclass(frozen=True)
class SessionCheck:
    """What a session cookie is worth, read without writing: the principal (or why not),
    a session row to delete (idle too long, or its principal revoked), and whether its
    idle clock is due to be moved."""

    principal: Principal | None
    session_id: int | None
    error: NotSignedIn | None
    ended: int | None = None
    touch_due: bool = False


def check_session(session: Session, token: str | None, *, idle_seconds: int) -> SessionCheck:
    if not token:
        return SessionCheck(None, None, NotSignedIn("sign in to use the console"))
    row = repository.session_by_token_hash(session, hash_token(token))
    if row is None or row.id is None:
        return SessionCheck(None, None, NotSignedIn("this session has ended: sign in again"))
    now = utcnow()
    last_seen = _aware(row.last_seen_at)
    target = repository.principal(session, row.principal_id)
    if now - last_seen > timedelta(seconds=idle_seconds):
        idle = NotSignedIn("this session ended after a while without use: sign in again")
        return SessionCheck(None, None, idle, ended=row.id)
    if target is None or target.disabled:
        return SessionCheck(None, None, NotSignedIn("this principal is revoked"), ended=row.id)
    due = now - last_seen > timedelta(seconds=TOUCH_SECONDS)
    return SessionCheck(target, row.id, None, touch_due=due)


def end_session(session: Session, session_id: int) -> None:
    row = repository.session_by_id(session, session_id)
    if row is not None:
        repository.delete_session(session, row)


def touch_session(session: Session, session_id: int) -> None:
    """Move a session's idle clock to now (the person made a request)."""
    row = repository.session_by_id(session, session_id)
    if row is not None:
        row.last_seen_at = utcnow()
        session.add(row)


def sign_out(session: Session, token: str | None) -> None:
    """End the session: its row goes, so the cookie is worth nothing even if kept."""
    if not token:
        return
    row = repository.session_by_token_hash(session, hash_token(token))
    if row is None:
        return
    target = repository.principal(session, row.principal_id)
    repository.delete_session(session, row)
    if target is not None:
        record(
            session,
            actor=f"{target.role}:{target.name}",
            action="console.signed_out",
            data={"principal_id": target.id},
        )


def credential_json(body: bytes) -> str:
    """The browser's credential (`PublicKeyCredential.toJSON()`), as text for the parser."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PasskeyNotVerified("the passkey's answer is not JSON") from exc
    if not isinstance(value, dict):
        raise PasskeyNotVerified("the passkey's answer is not a credential")
    return json.dumps(value)


# -- approvals with the passkey, and its enrolment with the bank's signer -----------------------
#
# The console's sign-in passkey is reused for the bank's signer: its public data (credential
# id, COSE public key) is what the signer's enrolment names, the relying party is the
# console's host and the origin the console's. Sign-in challenges are random and single-use
# (never a statement's digest), and an approval's challenge is the statement's digest (never
# a sign-in challenge), so an assertion made for one is of no use for the other; the counter
# each side keeps only has to grow.


def _mine(session: Session, ctx: Context) -> set[str]:
    assert ctx.principal.id is not None
    return {p.credential_id for p in repository.passkeys_of(session, ctx.principal.id)}


def approval_options(
    session: Session, ctx: Context, request_id: int, origin: str
) -> dict[str, Any]:
    """What the approval button asks the browser for: `navigator.credentials.get` options
    whose challenge is the signer's statement digest and whose `allowCredentials` are the
    caller's own passkeys enrolled with the signer (the API's approval view, its rules)."""
    view = signer_statements.approval_challenge(session, ctx, request_id)
    mine = _mine(session, ctx)
    allowed = [
        c for c in view["credentials"] if c["credential_id"] in mine and c["rp_id"] == rp_id(origin)
    ]
    if not allowed:
        raise PasskeyNotWithSigner(
            "your passkey is not enrolled with the bank's signer for this approval, "
            "or you have approved it already"
        )
    options = generate_authentication_options(
        rp_id=rp_id(origin),
        challenge=base64url_to_bytes(view["challenge"]),
        allow_credentials=[
            PublicKeyCredentialDescriptor(id=base64url_to_bytes(c["credential_id"]))
            for c in allowed
        ],
        user_verification=UserVerificationRequirement.REQUIRED,
    )
    return {
        "options": json.loads(options_to_json(options)),
        "statement_id": view["statement_id"],
        "digest": view["digest"],
        "person": allowed[0]["person"],
    }


@dataclass(frozen=True)
class Approval:
    statement_id: int
    person: str
    ready: bool  # the quorum is met: take the statement to the bank's signer


def approve_with_passkey(
    session: Session, ctx: Context, request_id: int, credential: str, origin: str
) -> Approval:
    """Keep the caller's passkey assertion as their endorsement of this request's
    statement, once it is checked here too (the signer checks it again itself): signed
    over this request's digest, from the console's origin, by the caller's own passkey
    enrolled with the signer. An assertion made for another request is refused here,
    before anything is kept."""
    view = signer_statements.approval_challenge(session, ctx, request_id)
    try:
        parsed = parse_authentication_credential_json(credential)
        client = parse_client_data_json(parsed.response.client_data_json)
    except WebAuthnException as exc:
        raise PasskeyNotVerified(f"the passkey's answer could not be read: {exc}") from exc
    digest = base64url_to_bytes(view["challenge"])
    if client.challenge != digest:
        raise PasskeyNotVerified(
            f"this approval was signed for another statement, not signing request "
            f"{request_id}'s (digest {view['digest']}): nothing was kept"
        )
    credential_id = bytes_to_base64url(parsed.raw_id)
    assert ctx.principal.id is not None
    own = {p.credential_id: p for p in repository.passkeys_of(session, ctx.principal.id)}
    enrolled = {c["credential_id"]: c for c in view["credentials"]}
    if credential_id not in own or credential_id not in enrolled:
        raise PasskeyNotWithSigner(
            "this passkey is not yours enrolled with the bank's signer for this approval"
        )
    try:
        verify_authentication_response(
            credential=parsed,
            expected_challenge=digest,
            expected_rp_id=rp_id(origin),
            expected_origin=origin,
            credential_public_key=base64url_to_bytes(own[credential_id].public_key),
            credential_current_sign_count=0,  # the signer compares the counter it keeps
            require_user_verification=True,
        )
    except WebAuthnException as exc:
        raise PasskeyNotVerified(f"the passkey did not verify: {exc}") from exc
    response = parsed.response
    assertion = {
        "credential_id": credential_id,
        "authenticator_data": bytes_to_base64url(response.authenticator_data),
        "client_data_json": bytes_to_base64url(response.client_data_json),
        "signature": bytes_to_base64url(response.signature),
    }
    person = enrolled[credential_id]["person"]
    stored = signer_statements.stored_endorsement(None, assertion)
    _, ready = signer_statements.endorse(session, ctx, view["statement_id"], person, stored)
    return Approval(int(view["statement_id"]), person, ready)


SIGNER_NAME = re.compile(r"[^a-z0-9._@-]+")


def signer_name(principal: Principal) -> str:
    """The name the bank's signer knows a principal by (its names are `[a-z0-9._@-]`)."""
    return SIGNER_NAME.sub("-", principal.name.lower()).strip("-")[:64] or f"p{principal.id}"


def enrol_with_signer(session: Session, ctx: Context, principal_id: int, origin: str) -> int:
    """Open the signer's enrolment statement of a staff member's console passkey (admins
    only): the credential they registered for sign-in, for this console's relying party
    and origin. Two signer admins still sign it (`custody approve --statement ID`)."""
    require_role(ctx.principal, Role.admin)
    target = repository.principal(session, principal_id)
    if target is None:
        raise PrincipalNotFound("no such principal")
    if target.disabled:
        raise PrincipalRevoked(f"{target.name} is revoked")
    if target.role not in (Role.bank_operator, Role.bank_approver, Role.admin):
        raise NoConsoleForRole(f"a {target.role} signs nothing for the bank's signer")
    passkeys = repository.passkeys_of(session, principal_id)
    if not passkeys:
        raise PasskeyNotWithSigner(f"{target.name} has registered no passkey in the console yet")
    passkey = max(passkeys, key=lambda p: p.created_at)
    st = signer_statements.request_enrolment(
        session,
        ctx,
        name=signer_name(target),
        role=str(target.role),
        algorithm="webauthn",
        public_key=passkey.public_key,
        passkey={
            "credential_id": passkey.credential_id,
            "rp_id": rp_id(origin),
            "origins": [origin],
        },
    )
    assert st.id is not None
    return st.id
