"""Passkey approvals through the service, as the console's approval page will use them: the
page reads the statement and its WebAuthn challenge (`GET /v1/signing-requests/{id}/approval`),
the approver's passkey signs it, the assertion is posted as the endorsement, and the bank's
signer (real SoftHSM2 token, real btcd) checks it against the passkey two admins enrolled."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from support.lending import funded_loan, request, sign, the_psbt, upload
from support.signer_world import SignerWorld
from support.webauthn_authenticator import PasskeyPerson, b64url
from support.world import World, audit_actions

from custody.watcher.service import Watcher
from pledge.statements import statement_digest
from regtest.node import RegtestNode

pytestmark = [pytest.mark.node, pytest.mark.hsm]


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def enrol(world: World, person: PasskeyPerson) -> None:
    """An API admin opens the enrolment of the passkey; two signer admins sign it."""
    key = person.passkey
    r = world.call(
        "admin",
        "POST",
        "/v1/signer-people",
        json={
            "name": person.name,
            "role": person.role,
            "algorithm": "webauthn",
            "public_key": b64url(key.cose_key()),
            "credential_id": key.credential_id_b64,
            "rp_id": key.rp_id,
            "origins": [key.origin],
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["statement"]["credential_id"] == key.credential_id_b64
    done = world.sign_statement(r.json()["id"], "admin1", "admin2", submitter="admin").json()
    assert done["state"] == "done", done


def awaiting_release(world: World, node: RegtestNode, watcher: Watcher) -> tuple[int, int]:
    """A funded loan's release, signed by the miner: (loan id, request id)."""
    f = funded_loan(world, node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    psbt = the_psbt(world, "miner", req["id"])
    assert upload(world, "miner", req["id"], sign(psbt, f.roots["miner"])).status_code == 200
    return int(f.loan["id"]), int(req["id"])


def page(world: World, who: str, rid: int) -> dict[str, Any]:
    r = world.call(who, "GET", f"/v1/signing-requests/{rid}/approval")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def approve(world: World, who: str, person: PasskeyPerson, view: dict[str, Any]) -> Any:
    """The page asks the passkey to sign the challenge it shows and posts the assertion."""
    assertion = person.passkey.assertion(unb64url(view["challenge"]))
    r = world.call(
        who, "POST", view["endorse_at"], json={"person": person.name, "webauthn": assertion}
    )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def passkeys(world: World) -> tuple[PasskeyPerson, PasskeyPerson]:
    operator = PasskeyPerson("paula.operator", "bank_operator")
    approver = PasskeyPerson("pavel.approver", "bank_approver")
    enrol(world, operator)
    enrol(world, approver)
    return operator, approver


def test_a_release_approved_with_two_passkeys_is_signed_and_mined(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    bank_signer: SignerWorld,
    passkeys: tuple[PasskeyPerson, PasskeyPerson],
) -> None:
    operator, approver = passkeys
    loan_id, rid = awaiting_release(world, regtest_node, watcher)
    view = page(world, "bank_operator", rid)
    # the challenge is the digest of the very statement the signer issued
    assert unb64url(view["challenge"]) == statement_digest(view["statement"])
    assert view["digest"] == statement_digest(view["statement"]).hex()
    assert view["statement"]["kind"] == "transaction" and view["state"] == "open"
    credentials = {c["person"]: c for c in view["credentials"]}
    assert credentials[operator.name]["credential_id"] == operator.passkey.credential_id_b64
    assert credentials[approver.name]["rp_id"] == approver.passkey.rp_id
    first = approve(world, "bank_operator", operator, view)
    assert first["signed_by"] == [operator.name] and first["state"] == "open"
    # who has signed is no longer offered
    later = page(world, "bank_approver", rid)
    assert operator.name not in {c["person"] for c in later["credentials"]}
    before = bank_signer.bank_signatures()
    done = approve(world, "bank_approver", approver, later)
    assert done["state"] == "done", done
    assert done["outcome"] == f"requested by {operator.name}, approved by {approver.name}"
    assert bank_signer.bank_signatures() == before + 1
    assert world.call("miner", "GET", f"/v1/signing-requests/{rid}").json()["state"] == "broadcast"
    regtest_node.mine(1)
    watcher.step()
    assert world.call("miner", "GET", f"/v1/loans/{loan_id}").json()["state"] == "released"
    # nothing is left to approve
    gone = world.call("bank_approver", "GET", f"/v1/signing-requests/{rid}/approval")
    assert gone.status_code == 409 and gone.json()["error"] == "signing_request_not_in_state"


def test_an_approval_made_for_one_request_does_not_approve_another(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    bank_signer: SignerWorld,
    passkeys: tuple[PasskeyPerson, PasskeyPerson],
) -> None:
    operator, approver = passkeys
    _, first = awaiting_release(world, regtest_node, watcher)
    _, second = awaiting_release(world, regtest_node, watcher)
    one, other = page(world, "bank_approver", first), page(world, "bank_approver", second)
    assert one["challenge"] != other["challenge"]
    approve(world, "bank_operator", operator, other)
    # the approver's passkey signed the first request's challenge; it is posted to the second
    misplaced = approver.passkey.assertion(unb64url(one["challenge"]))
    before = bank_signer.bank_signatures()
    r = world.call(
        "bank_approver",
        "POST",
        other["endorse_at"],
        json={"person": approver.name, "webauthn": misplaced},
    )
    assert r.status_code == 200, r.text
    refused = r.json()
    assert refused["state"] == "open" and "approval_signature" in refused["outcome"]
    assert bank_signer.bank_signatures() == before
    assert world.call("miner", "GET", f"/v1/signing-requests/{second}").json()["state"] != (
        "broadcast"
    )
    assert "signer.refused" in audit_actions(world.engine, request_id=second)
    # the approver's own approval of the second request replaces the misplaced one
    assert approve(world, "bank_approver", approver, other)["state"] == "done"
    assert bank_signer.bank_signatures() == before + 1


def test_the_approval_page_is_for_the_banks_staff(
    world: World, regtest_node: RegtestNode, watcher: Watcher
) -> None:
    _, rid = awaiting_release(world, regtest_node, watcher)
    miner = world.call("miner", "GET", f"/v1/signing-requests/{rid}/approval")
    assert miner.status_code == 403 and miner.json()["error"] == "role_not_allowed"
    assert world.call("auditor", "GET", f"/v1/signing-requests/{rid}/approval").status_code == 200
    missing = world.call("bank_approver", "GET", "/v1/signing-requests/999999/approval")
    assert missing.status_code == 404 and missing.json()["error"] == "signing_request_not_found"


def test_an_endorsement_is_a_signature_or_an_assertion(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    passkeys: tuple[PasskeyPerson, PasskeyPerson],
) -> None:
    _, approver = passkeys
    _, rid = awaiting_release(world, regtest_node, watcher)
    view = page(world, "bank_approver", rid)
    assertion = approver.passkey.assertion(unb64url(view["challenge"]))
    for body in (
        {"person": approver.name},
        {"person": approver.name, "signature": "AAAA", "webauthn": assertion},
        {"person": approver.name, "webauthn": {**assertion, "signature": "not base64url!"}},
        {"person": approver.name, "webauthn": {**assertion, "user_handle": "AAAA"}},
    ):
        r = world.call("bank_approver", "POST", view["endorse_at"], json=body)
        assert r.status_code == 422, r.text
    assert page(world, "bank_approver", rid)["signed_by"] == []
    # a passkey enrolment names where the passkey may be used
    half = world.call(
        "admin",
        "POST",
        "/v1/signer-people",
        json={
            "name": "nina.approver",
            "role": "bank_approver",
            "algorithm": "webauthn",
            "public_key": b64url(approver.passkey.cose_key()),
        },
    )
    assert half.status_code == 422, half.text


def test_an_endorsement_is_relayed_as_it_was_sent() -> None:
    """Kept in the one column and relayed to the signer unchanged; a rewritten row is
    relayed as a signature (which the signer refuses), never a crash."""
    from custody.signer.service import relayed_endorsement, stored_endorsement

    assertion = PasskeyPerson("p", "bank_approver").passkey.assertion(b"\x01" * 32)
    kept = stored_endorsement(None, assertion)
    assert relayed_endorsement("p", kept) == {"person": "p", "webauthn": assertion}
    assert relayed_endorsement("p", stored_endorsement("c2ln", None)) == {
        "person": "p",
        "signature": "c2ln",
    }
    for rewritten in ("{not json", '{"webauthn": 1}', "[]"):
        assert relayed_endorsement("p", rewritten) == {"person": "p", "signature": rewritten}
