"""Passkey approvals as the signer's people registry checks them (no token, no node):
enrolment of a WebAuthn credential by two admins, and every way an assertion must fail.
The same attacks through the real signer (both transports, SoftHSM2, btcd) are in
tests/hsm/test_passkeys.py."""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.webauthn_authenticator import FLAG_UP, FLAG_UV, PasskeyPerson, SoftwarePasskey

from hsm.approvals import ADMIN, APPROVER, OPERATOR, Assertion, Endorsement, People
from hsm.registry import SCHEMA_VERSION, Registry
from hsm.signer import PolicyViolation
from pledge.statements import iso, statement_digest
from regtest.people import Staff, new_staff

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
ROLES = (OPERATOR, APPROVER)


def expires() -> str:
    return iso(NOW + timedelta(hours=1))


def endorsement(body: dict[str, Any]) -> Endorsement:
    """What `SignerCore._endorsements` makes of an approval body."""
    w = body.get("webauthn")
    return Endorsement(
        body["person"],
        body.get("signature", ""),
        Assertion(
            w["credential_id"], w["authenticator_data"], w["client_data_json"], w["signature"]
        )
        if w
        else None,
    )


class Bank:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.people = People(registry)
        self.admins = [new_staff("admin1", "admin"), new_staff("admin2", "admin")]
        self.people.bootstrap(
            [(a.name, "ed25519", bytes.fromhex(a.public_hex)) for a in self.admins], NOW
        )

    def enrol(self, person: PasskeyPerson, **changes: Any) -> dict[str, Any]:
        statement = {**person.enrolment(expires()), **changes}
        approvals = [endorsement(a.endorse(statement)) for a in self.admins]
        self.people.enroll(statement, approvals, NOW)
        return statement

    def verify(self, statement: dict[str, Any], *bodies: dict[str, Any]) -> tuple[str, ...]:
        return self.people.verify_quorum(
            statement, [endorsement(b) for b in bodies], roles=ROLES, now=NOW
        )


@pytest.fixture
def bank(tmp_path: Path) -> Iterator[Bank]:
    registry = Registry(tmp_path / "hsm-state.db")
    try:
        yield Bank(registry)
    finally:
        registry.close()


@pytest.fixture
def pair(bank: Bank) -> tuple[PasskeyPerson, PasskeyPerson]:
    operator = PasskeyPerson("olga.operator", "bank_operator")
    approver = PasskeyPerson("anton.approver", "bank_approver")
    bank.enrol(operator)
    bank.enrol(approver)
    return operator, approver


def statement() -> dict[str, Any]:
    """A statement of its own (its nonce differs from every other's)."""
    nonce = secrets.token_urlsafe(12)
    return {"kind": "transaction", "fee_sats": 2_000, "nonce": nonce, "expires_at": expires()}


def refused(check: str, call: Any, *args: Any, **kwargs: Any) -> PolicyViolation:
    with pytest.raises(PolicyViolation) as info:
        call(*args, **kwargs)
    assert info.value.check == check, info.value.reason
    return info.value


def test_two_passkeys_approve_and_their_counters_are_kept(
    bank: Bank, pair: tuple[PasskeyPerson, PasskeyPerson]
) -> None:
    operator, approver = pair
    st = statement()
    assert bank.verify(st, operator.endorse(st), approver.endorse(st)) == (
        operator.name,
        approver.name,
    )
    kept = bank.registry.passkey_of(approver.name)
    assert kept is not None and kept.sign_count == 1 == approver.passkey.counter
    assert kept.rp_id == approver.passkey.rp_id and kept.origins == (approver.passkey.origin,)


def test_an_ed25519_passkey_and_a_raw_key_approve_together(bank: Bank) -> None:
    operator = new_staff("olga.operator", "bank_operator")
    enrol = {
        "kind": "enroll",
        "name": operator.name,
        "role": operator.role,
        "algorithm": "ed25519",
        "public_key": operator.public_hex,
        "expires_at": expires(),
    }
    bank.people.enroll(enrol, [endorsement(a.endorse(enrol)) for a in bank.admins], NOW)
    approver = PasskeyPerson("anton.approver", "bank_approver", SoftwarePasskey(algorithm="eddsa"))
    bank.enrol(approver)
    st = statement()
    assert bank.verify(st, operator.endorse(st), approver.endorse(st))[1] == approver.name


def test_an_assertion_signs_its_statement_only(
    bank: Bank, pair: tuple[PasskeyPerson, PasskeyPerson]
) -> None:
    operator, approver = pair
    st = statement()
    other = {**st, "fee_sats": 1}  # the same request, another amount
    body = approver.endorse(st)
    refused("approval_signature", bank.verify, other, operator.endorse(other), body)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"origin": "https://evil.example"}, "origin"),
        ({"origin": "https://custody.bank.test:8443"}, "origin"),
        ({"rp_id": "evil.example"}, "RP ID"),
        ({"flags": FLAG_UP}, "User verification"),
        ({"flags": FLAG_UV}, "not present"),
        ({"kind": "webauthn.create"}, "type"),
    ],
    ids=["wrong-origin", "wrong-port", "wrong-rp-id", "no-uv", "no-up", "registration-type"],
)
def test_an_assertion_from_elsewhere_or_without_the_user_is_refused(
    bank: Bank, pair: tuple[PasskeyPerson, PasskeyPerson], options: dict[str, Any], words: str
) -> None:
    operator, approver = pair
    st = statement()
    refusal = refused(
        "approval_signature",
        bank.verify,
        st,
        operator.endorse(st),
        approver.endorse(st, **options),
    )
    assert words in refusal.reason


def test_a_passkey_not_enrolled_for_that_person_is_refused(
    bank: Bank, pair: tuple[PasskeyPerson, PasskeyPerson]
) -> None:
    operator, approver = pair
    st = statement()
    stranger = PasskeyPerson(approver.name, approver.role)  # a passkey of their own, unknown
    refused("approval_credential", bank.verify, st, operator.endorse(st), stranger.endorse(st))
    # the operator's own passkey sent under the approver's name: still the operator's
    as_approver = {**operator.endorse(st), "person": approver.name}
    refused("approval_credential", bank.verify, st, operator.endorse(st), as_approver)


def test_two_operators_passkeys_are_not_four_eyes(bank: Bank) -> None:
    one = PasskeyPerson("olga.operator", "bank_operator")
    two = PasskeyPerson("oleg.operator", "bank_operator")
    bank.enrol(one)
    bank.enrol(two)
    st = statement()
    refused("approval_roles", bank.verify, st, one.endorse(st), two.endorse(st))


def test_one_passkey_counts_once(bank: Bank, pair: tuple[PasskeyPerson, PasskeyPerson]) -> None:
    _, approver = pair
    st = statement()
    refused("approval_duplicate", bank.verify, st, approver.endorse(st), approver.endorse(st))
    # the same credential cannot be enrolled for a second name, nor the same key
    twin = PasskeyPerson("alla.approver", "bank_approver", approver.passkey)
    refusal = refused("enrolment", bank.enrol, twin)
    assert "already enrolled" in refusal.reason
    fresh_id = PasskeyPerson("alla.approver", "bank_approver", approver.passkey.clone())
    fresh_id.passkey.credential_id = b"another-id-same-key-0123456789ab"
    assert "already enrolled" in refused("enrolment", bank.enrol, fresh_id).reason


def test_a_cloned_authenticator_is_refused(
    bank: Bank, pair: tuple[PasskeyPerson, PasskeyPerson]
) -> None:
    """The clone has the key but not the counter: its next count was already seen."""
    operator, approver = pair
    clone = approver.passkey.clone()
    st = statement()
    bank.verify(st, operator.endorse(st), approver.endorse(st))  # counter 1
    approver.endorse(st)
    bank.verify(st, operator.endorse(st), approver.endorse(st))  # counter 3
    second = statement()
    copied = PasskeyPerson(approver.name, approver.role, clone)
    clone.counter = 2
    refusal = refused(
        "approval_counter", bank.verify, second, operator.endorse(second), copied.endorse(second)
    )
    assert "cloned" in refusal.reason
    # an authenticator that stops counting after it counted is refused the same way
    refused(
        "approval_counter",
        bank.verify,
        second,
        operator.endorse(second),
        approver.endorse(second, counter=0),
    )


def test_a_counter_is_recorded_only_when_the_quorum_holds_and_a_resend_is_no_clone(
    bank: Bank, pair: tuple[PasskeyPerson, PasskeyPerson]
) -> None:
    """The service resends the endorsements it keeps (one bad signature replaced): the very
    assertion counted before is the same use, not a replay of the counter."""
    operator, approver = pair
    st = statement()
    good = approver.endorse(st)
    bad = operator.endorse({**st, "fee_sats": 1})
    refused("approval_signature", bank.verify, st, bad, good)
    kept = bank.registry.passkey_of(approver.name)
    assert kept is not None and kept.sign_count == 0  # nothing counted on a refusal
    assert bank.verify(st, operator.endorse(st), good)
    assert bank.verify(st, operator.endorse(st), good)  # resent as it was: the same use
    # the counter replayed with a new signature is not the same assertion
    replay = approver.endorse(st, counter=1)
    refused("approval_counter", bank.verify, st, operator.endorse(st), replay)


def test_a_counter_that_never_counts_is_allowed(bank: Bank) -> None:
    """Synced passkeys answer 0 every time; WebAuthn allows it (the statement's nonce,
    used once, is what stops a replay)."""
    operator = PasskeyPerson("olga.operator", "bank_operator", SoftwarePasskey(counter=None))
    approver = PasskeyPerson("anton.approver", "bank_approver", SoftwarePasskey(counter=None))
    bank.enrol(operator)
    bank.enrol(approver)
    for _ in range(2):
        st = statement()
        assert bank.verify(st, operator.endorse(st), approver.endorse(st))


def test_a_removed_passkey_person_cannot_approve(
    bank: Bank, pair: tuple[PasskeyPerson, PasskeyPerson]
) -> None:
    operator, approver = pair
    removal = {"kind": "remove", "name": approver.name, "expires_at": expires()}
    bank.people.remove(removal, [endorsement(a.endorse(removal)) for a in bank.admins], NOW)
    st = statement()
    refused("approval_unknown_person", bank.verify, st, operator.endorse(st), approver.endorse(st))


def test_the_wrong_kind_of_endorsement_is_refused(
    bank: Bank, pair: tuple[PasskeyPerson, PasskeyPerson]
) -> None:
    operator, approver = pair
    st = statement()
    raw = {
        "person": approver.name,
        "signature": Staff(approver.name, approver.role).endorse(st)["signature"],
    }
    assert (
        "passkey"
        in refused("approval_signature", bank.verify, st, operator.endorse(st), raw).reason
    )
    # an admin with a raw key sending an assertion
    admin = bank.admins[0]
    fake = {"person": admin.name, "webauthn": approver.endorse(st)["webauthn"]}
    refused(
        "approval_signature",
        bank.people.verify_quorum,
        st,
        [endorsement(fake)],
        roles=(ADMIN,),
        now=NOW,
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"public_key": "AAAA"}, "public_key"),
        ({"public_key": "not base64!"}, "public_key"),
        ({"credential_id": ""}, "credential_id"),
        ({"credential_id": "abc="}, "credential_id"),
        ({"rp_id": "https://custody.bank.test"}, "rp_id"),
        ({"rp_id": "127.0.0.1"}, "rp_id"),
        ({"origins": []}, "origins"),
        ({"origins": ["http://custody.bank.test"]}, "origins"),
        ({"origins": ["https://evil.example"]}, "origins"),
        ({"origins": ["https://custody.bank.test/path"]}, "origins"),
        ({"origins": "https://custody.bank.test"}, "origins"),
    ],
)
def test_a_bad_passkey_enrolment_is_refused(
    bank: Bank, changes: dict[str, Any], field: str
) -> None:
    person = PasskeyPerson("nina.approver", "bank_approver")
    refusal = refused("enrolment", bank.enrol, person, **changes)
    assert refusal.field == field
    assert bank.people.get(person.name) is None


def test_an_extra_or_missing_key_in_a_passkey_enrolment_is_refused(bank: Bank) -> None:
    person = PasskeyPerson("nina.approver", "bank_approver")
    refused("statement_format", bank.enrol, person, user_handle="x")
    statement = person.enrolment(expires())
    del statement["rp_id"]
    approvals = [endorsement(a.endorse(statement)) for a in bank.admins]
    refused("statement_format", bank.people.enroll, statement, approvals, NOW)


def test_localhost_is_the_one_http_origin(bank: Bank) -> None:
    person = PasskeyPerson(
        "nina.approver",
        "bank_approver",
        SoftwarePasskey(rp_id="localhost", origin="http://localhost:8080"),
    )
    bank.enrol(person)
    other = PasskeyPerson("olga.operator", "bank_operator")
    bank.enrol(other)
    st = statement()
    assert bank.verify(st, other.endorse(st), person.endorse(st))


def test_the_registry_is_upgraded_in_place_from_version_3(tmp_path: Path) -> None:
    """A version 3 state file (before passkeys) keeps its people and gets the table."""
    path = tmp_path / "hsm-state.db"
    Registry(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE passkey")
    db.execute(
        "INSERT INTO person VALUES ('admin1', 'admin', 'ed25519', 'aa', "
        "'2026-01-01T00:00:00.000000Z', NULL)"
    )
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()
    registry = Registry(path)
    try:
        version = registry.read_one("PRAGMA user_version", ())
        assert version is not None and version[0] == SCHEMA_VERSION == 4
        assert People(registry).get("admin1") is not None
        assert registry.read_one("SELECT count(*) FROM passkey", ()) is not None
    finally:
        registry.close()


def test_the_challenge_is_the_statement_digest() -> None:
    """What the console asks the authenticator to sign is what the signer expects."""
    st = statement()
    key = SoftwarePasskey()
    body = key.assertion(statement_digest(st))
    import base64
    import json

    client = json.loads(base64.urlsafe_b64decode(body["client_data_json"] + "=="))
    challenge = base64.urlsafe_b64decode(client["challenge"] + "==")
    assert challenge == statement_digest(st)
