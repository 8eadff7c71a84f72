"""Approvals the signer can verify: canonical statements signed by enrolled people.

Why signatures and not rows: the service's database and API process are assumed to be in
an attacker's hands, so "approved by alice" written by the API proves nothing. Every bank
action the signer performs on a person's word (registering a loan, a repayment, a desk
price, a release or a manual liquidation, enrolling or removing a person) needs a
statement signed by enrolled people with the right roles. Roles come from enrolment,
never from the request.

The statement and its canonical bytes are defined in `pledge.statements` (the approver's
machine builds the same bytes); this module checks who signed them.

A person signs with a raw key (Ed25519, ECDSA P-256: `Endorsement.signature`) or with a
passkey (`webauthn`: `Endorsement.webauthn`, a WebAuthn assertion whose challenge is the
statement's digest, checked in `hsm.passkeys`). Which one is fixed at enrolment; quorum,
roles, expiry and 4-eyes are the same for both.

Enrolment: the first two (or more) admins are written by a ceremony on the signer's own
machine (`hsm enroll-bootstrap`); after that every enrolment or removal is a statement
signed by two different enrolled admins.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, get_args

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from hsm.passkeys import (
    ENROL_KEYS,
    Assertion,
    assertion_hash,
    enrolment_of,
    verify_assertion,
)
from hsm.registry import PasskeyRecord, Registry, parse_ts, ts
from hsm.signer import PolicyViolation
from pledge.errors import InvalidInput
from pledge.statements import canonical_statement

__all__ = [
    "ADMIN",
    "APPROVER",
    "OPERATOR",
    "Assertion",
    "Endorsement",
    "KeyAlgorithm",
    "People",
    "Person",
    "parse_time",
    "public_key_from_text",
]

KeyAlgorithm = Literal["ed25519", "p256"]
ALGORITHMS: Final = get_args(KeyAlgorithm)  # raw keys; a passkey is `WEBAUTHN`
WEBAUTHN: Final = "webauthn"
Role = Literal["admin", "bank_operator", "bank_approver"]
ROLES: Final = get_args(Role)
ADMIN: Final = frozenset({"admin"})
OPERATOR: Final = frozenset({"bank_operator"})
APPROVER: Final = frozenset({"bank_approver"})
MAX_LIFETIME: Final = timedelta(days=7)  # an approval valid for longer is a standing order
MAX_SIGNATURE_BYTES: Final = 200
_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-@")


def parse_time(value: Any, field: str) -> datetime:
    """An ISO-8601 timestamp with a zone, as statements carry them."""
    if not isinstance(value, str) or len(value) > 40:
        raise PolicyViolation(
            "statement_format", f"{field} must be an ISO-8601 time string", field=field
        )
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise PolicyViolation(
            "statement_format", f"{field} is not an ISO-8601 time", field=field
        ) from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise PolicyViolation("statement_format", f"{field} must carry a time zone", field=field)
    return when.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Endorsement:
    """One person's signature over a statement: base64 of the raw signature bytes (64
    bytes for Ed25519, DER for ECDSA P-256 over SHA-256), or, for a person enrolled with a
    passkey, the WebAuthn assertion over the statement's digest (and no `signature`)."""

    person: str
    signature: str = ""
    webauthn: Assertion | None = None


@dataclass(frozen=True, slots=True)
class Person:
    name: str
    role: str
    algorithm: str
    public_key: bytes  # Ed25519: 32 raw bytes; P-256: 65-byte SEC1 point; webauthn: COSE
    enrolled_at: datetime
    removed_at: datetime | None
    passkey: PasskeyRecord | None = None  # webauthn: the credential, rp_id, origins, counter

    @property
    def active(self) -> bool:
        return self.removed_at is None


def public_key_from_text(algorithm: str, text: str) -> bytes:
    """A public key as enrolment takes it: hex or base64 of the raw/SEC1 bytes, or PEM."""
    if algorithm not in ALGORITHMS:
        raise PolicyViolation(
            "enrolment", f"unknown key algorithm {algorithm!r}", field="algorithm"
        )
    text = text.strip()
    raw: bytes | None = None
    if text.startswith("-----BEGIN PUBLIC KEY-----"):
        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            PublicFormat,
            load_pem_public_key,
        )

        try:
            key = load_pem_public_key(text.encode())
        except ValueError:
            raise PolicyViolation("enrolment", "the PEM public key cannot be read") from None
        if isinstance(key, ed25519.Ed25519PublicKey) and algorithm == "ed25519":
            raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm == "p256":
            raw = key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        else:
            raise PolicyViolation("enrolment", f"the PEM key is not an {algorithm} key")
    else:
        for decode in (bytes.fromhex, lambda t: base64.b64decode(t, validate=True)):
            try:
                raw = decode(text)
                break
            except (ValueError, binascii.Error):
                continue
    if raw is None:
        raise PolicyViolation("enrolment", "the public key is neither hex, base64 nor PEM")
    _load_key(algorithm, raw)  # refuses a malformed point
    return raw


def _load_key(algorithm: str, raw: bytes) -> ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey:
    try:
        if algorithm == "ed25519":
            return ed25519.Ed25519PublicKey.from_public_bytes(raw)
        if algorithm == "p256":
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError:
        pass
    raise PolicyViolation("enrolment", f"not a valid {algorithm} public key")


def _verify(person: Person, message: bytes, signature: bytes) -> bool:
    key = _load_key(person.algorithm, person.public_key)
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not set(name) <= _NAME_CHARS:
        raise PolicyViolation(
            "enrolment",
            "a person's name is 1-64 characters of a-z, 0-9, '.', '_', '-', '@'",
            field="name",
        )
    return name


class People:
    """The people enrolled in this signer, in its own registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    # -- reading ------------------------------------------------------------------------

    def get(self, name: str) -> Person | None:
        row = self.registry.read_one("SELECT * FROM person WHERE name = ?", (name,))
        if row is None:
            return None
        return Person(
            name=row["name"],
            role=row["role"],
            algorithm=row["algorithm"],
            public_key=bytes.fromhex(row["public_key"]),
            enrolled_at=parse_ts(row["enrolled_at"]),
            removed_at=parse_ts(row["removed_at"]) if row["removed_at"] else None,
            passkey=self.registry.passkey_of(name) if row["algorithm"] == WEBAUTHN else None,
        )

    def active(self) -> list[Person]:
        rows = self.registry.read_all(
            "SELECT name FROM person WHERE removed_at IS NULL ORDER BY name", ()
        )
        people = [self.get(r["name"]) for r in rows]
        return [p for p in people if p is not None]

    # -- checking a quorum ---------------------------------------------------------------

    def verify_quorum(
        self,
        statement: Mapping[str, Any],
        endorsements: Sequence[Endorsement],
        *,
        roles: Sequence[frozenset[str]],
        now: datetime,
    ) -> tuple[str, ...]:
        """Names of distinct enrolled people, one per role slot in `roles`, whose
        signatures over `statement` verify; or a PolicyViolation saying what is missing.

        The statement must not be expired nor valid for longer than MAX_LIFETIME."""
        expires = parse_time(statement.get("expires_at"), "expires_at")
        if expires <= now:
            raise PolicyViolation(
                "approval_expired",
                f"the statement expired at {expires.isoformat()}",
                field="approvals",
            )
        if expires - now > MAX_LIFETIME:
            raise PolicyViolation(
                "approval_expiry",
                f"the statement is valid until {expires.isoformat()}, more than "
                f"{MAX_LIFETIME.days} days ahead",
                field="approvals",
            )
        try:
            message = canonical_statement(statement)
        except InvalidInput as exc:
            raise PolicyViolation("statement_format", exc.message, field="approvals") from None
        if len(endorsements) > 8:
            raise PolicyViolation("approval_format", "too many signatures", field="approvals")
        challenge = hashlib.sha256(message).digest()  # = pledge.statements.statement_digest
        valid: list[Person] = []
        uses: list[tuple[str, int, int, str]] = []  # passkey counters, recorded at the end
        for n, e in enumerate(endorsements):
            if not isinstance(e, Endorsement) or not isinstance(e.person, str):
                raise PolicyViolation(
                    "approval_format", f"signature {n} is malformed", field="approvals"
                )
            person = self.get(e.person)
            if person is None or not person.active:
                raise PolicyViolation(
                    "approval_unknown_person",
                    f"{e.person!r} is not enrolled in this signer",
                    field="approvals",
                )
            if any(p.name == person.name for p in valid):
                raise PolicyViolation(
                    "approval_duplicate",
                    f"{person.name} signed twice: two different people must approve",
                    field="approvals",
                )
            if person.algorithm == WEBAUTHN:
                uses.append(self._passkey_use(person, e, challenge))
            else:
                self._raw_signature(person, e, message)
            valid.append(person)
        chosen = _assign(valid, roles)
        if chosen is None:
            wanted = " and a different ".join("/".join(sorted(r)) for r in roles)
            have = ", ".join(f"{p.name} ({p.role})" for p in valid) or "nobody"
            raise PolicyViolation(
                "approval_roles",
                f"this needs a {wanted}; it is signed by {have}",
                field="approvals",
            )
        if uses:
            moved = self.registry.count_passkey_uses(uses, now)
            if moved is not None:
                raise PolicyViolation(
                    "approval_counter",
                    f"passkey {moved[:16]}... was used by another approval meanwhile",
                    field="approvals",
                )
        return tuple(p.name for p in chosen)

    @staticmethod
    def _raw_signature(person: Person, e: Endorsement, message: bytes) -> None:
        if e.webauthn is not None:
            raise PolicyViolation(
                "approval_signature",
                f"{person.name} is enrolled with a {person.algorithm} key, not a passkey",
                field="approvals",
            )
        try:
            sig = base64.b64decode(e.signature, validate=True)
        except (binascii.Error, ValueError, TypeError):
            sig = b""
        if not sig or len(sig) > MAX_SIGNATURE_BYTES or not _verify(person, message, sig):
            raise PolicyViolation(
                "approval_signature",
                f"{person.name}'s signature does not verify over this statement",
                field="approvals",
            )

    @staticmethod
    def _passkey_use(person: Person, e: Endorsement, challenge: bytes) -> tuple[str, int, int, str]:
        """Check a passkey endorsement; (credential, counter before, after, assertion)."""
        passkey = person.passkey
        if e.webauthn is None or e.signature or passkey is None:
            raise PolicyViolation(
                "approval_signature",
                f"{person.name} approves with a passkey: send its WebAuthn assertion",
                field="approvals",
            )
        count = verify_assertion(
            e.webauthn,
            person=person.name,
            challenge=challenge,
            credential_id=passkey.credential_id,
            public_key=person.public_key,
            rp_id=passkey.rp_id,
            origins=passkey.origins,
        )
        digest = assertion_hash(e.webauthn)
        stored = passkey.sign_count
        resend = count == stored and digest == passkey.last_assertion
        if (count or stored) and count <= stored and not resend:
            # WebAuthn's clone signal: an authenticator that counts never repeats a count.
            raise PolicyViolation(
                "approval_counter",
                f"{person.name}'s passkey counter is {count}, the signer has seen {stored}: "
                "a replayed or cloned authenticator",
                field="approvals",
            )
        return passkey.credential_id, stored, count, digest

    # -- enrolment ---------------------------------------------------------------------

    def bootstrap(self, admins: Sequence[tuple[str, str, bytes]], now: datetime) -> None:
        """The first-time ceremony: enrol at least two admins into an empty signer."""
        if len(admins) < 2 or len({a[0] for a in admins}) != len(admins):
            raise PolicyViolation("enrolment", "the ceremony needs at least two different admins")
        with self.registry.tx() as db:
            (count,) = db.execute("SELECT count(*) FROM person").fetchone()
            if count:
                raise PolicyViolation(
                    "enrolment",
                    "this signer already has enrolled people: enrol through two admins instead",
                )
            for name, algorithm, key in admins:
                _load_key(algorithm, key)
                self._insert(db, _check_name(name), "admin", algorithm, key, now, ("ceremony",))

    def enroll(
        self, statement: Mapping[str, Any], endorsements: Sequence[Endorsement], now: datetime
    ) -> Person:
        """`{"kind": "enroll", "name", "role", "algorithm", "public_key" (hex),
        "expires_at"}` signed by two different enrolled admins. A passkey (`"algorithm":
        "webauthn"`) also names its `credential_id`, the `rp_id` and the `origins` it may
        be used from, and its `public_key` is the COSE key (base64url)."""
        passkey = isinstance(statement, Mapping) and statement.get("algorithm") == WEBAUTHN
        exact_keys(
            statement,
            set(ENROL_KEYS)
            if passkey
            else {"kind", "name", "role", "algorithm", "public_key", "expires_at"},
        )
        if statement["kind"] != "enroll":
            raise PolicyViolation("statement_kind", "not an enrolment statement")
        name = _check_name(statement["name"])
        role = statement["role"]
        if role not in ROLES:
            raise PolicyViolation("enrolment", f"unknown role {role!r}", field="role")
        algorithm = str(statement["algorithm"])
        credential = enrolment_of(statement) if passkey else None
        key = (
            credential.public_key
            if credential is not None
            else public_key_from_text(algorithm, str(statement["public_key"]))
        )
        by = self.verify_quorum(statement, endorsements, roles=(ADMIN, ADMIN), now=now)
        with self.registry.tx() as db:
            if db.execute("SELECT 1 FROM person WHERE name = ?", (name,)).fetchone():
                raise PolicyViolation("enrolment", f"{name} is already enrolled", field="name")
            if db.execute("SELECT 1 FROM person WHERE public_key = ?", (key.hex(),)).fetchone():
                raise PolicyViolation(
                    "enrolment", "this public key is already enrolled for someone", field="name"
                )
            if (
                credential is not None
                and db.execute(
                    "SELECT 1 FROM passkey WHERE credential_id = ?", (credential.credential_id,)
                ).fetchone()
            ):
                raise PolicyViolation(
                    "enrolment",
                    "this passkey is already enrolled for someone",
                    field="credential_id",
                )
            self._insert(db, name, role, algorithm, key, now, by)
            if credential is not None:
                db.execute(
                    "INSERT INTO passkey (credential_id, name, rp_id, origins) VALUES (?, ?, ?, ?)",
                    (
                        credential.credential_id,
                        name,
                        credential.rp_id,
                        json.dumps(list(credential.origins)),
                    ),
                )
        person = self.get(name)
        assert person is not None
        return person

    def remove(
        self, statement: Mapping[str, Any], endorsements: Sequence[Endorsement], now: datetime
    ) -> Person:
        """`{"kind": "remove", "name", "expires_at"}` signed by two different enrolled
        admins (not the person removed: a quorum of others decides)."""
        exact_keys(statement, {"kind", "name", "expires_at"})
        if statement["kind"] != "remove":
            raise PolicyViolation("statement_kind", "not a removal statement")
        name = _check_name(statement["name"])
        by = self.verify_quorum(statement, endorsements, roles=(ADMIN, ADMIN), now=now)
        if name in by:
            raise PolicyViolation("enrolment", "an admin cannot sign their own removal")
        with self.registry.tx() as db:
            row = db.execute("SELECT removed_at FROM person WHERE name = ?", (name,)).fetchone()
            if row is None or row["removed_at"] is not None:
                raise PolicyViolation("enrolment", f"{name} is not enrolled", field="name")
            db.execute("UPDATE person SET removed_at = ? WHERE name = ?", (ts(now), name))
            db.execute(
                "INSERT INTO person_event (at, name, event, by) VALUES (?, ?, 'removed', ?)",
                (ts(now), name, ",".join(by)),
            )
        person = self.get(name)
        assert person is not None
        return person

    @staticmethod
    def _insert(
        db: Any, name: str, role: str, algorithm: str, key: bytes, now: datetime, by: Sequence[str]
    ) -> None:
        db.execute(
            "INSERT INTO person (name, role, algorithm, public_key, enrolled_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (name, role, algorithm, key.hex(), ts(now)),
        )
        db.execute(
            "INSERT INTO person_event (at, name, event, by) VALUES (?, ?, 'enrolled', ?)",
            (ts(now), name, ",".join(by)),
        )


def exact_keys(statement: Mapping[str, Any], keys: set[str]) -> None:
    """Refuse a statement with missing or extra keys (an extra key is an unsigned claim)."""
    if not isinstance(statement, Mapping) or set(statement) != keys:
        raise PolicyViolation(
            "statement_format",
            f"the statement must have exactly the keys {', '.join(sorted(keys))}",
        )


def _assign(people: Sequence[Person], roles: Sequence[frozenset[str]]) -> list[Person] | None:
    """Distinct people, one per role slot (small: try every order)."""

    def go(slot: int, used: list[Person]) -> list[Person] | None:
        if slot == len(roles):
            return used
        for p in people:
            if p not in used and p.role in roles[slot]:
                found = go(slot + 1, [*used, p])
                if found is not None:
                    return found
        return None

    return go(0, [])
