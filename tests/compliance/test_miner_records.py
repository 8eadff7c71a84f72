"""A miner's compliance record through the API, and the gate out of `draft`: the third key
(or the bank signer's key) is refused until the miner's current record is approved, twice
by different officers when it is high-risk; a change after approval voids it. Bad values
answer 422 naming the field and change nothing; a miner sees only its own record and
documents. On SQLite and PostgreSQL, like the authorization matrix."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from typing import Any

import pytest
from sqlalchemy import update
from sqlmodel import Session, col, select
from support.kyc import CLEAN_RECORD
from support.offline import offline_world
from support.world import World, audit_actions, hd_key

from custody.db.migrate import upgrade
from custody.db.models import AuditEvent, EvidenceDocument
from custody.db.session import make_engine

_names = itertools.count(1)
PERSON = {"legal_form": "individual", "inn": "500100732259", "region": "50"}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('kyc') / 'db.sqlite'}"
    else:
        server = request.getfixturevalue("postgres_server")
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        url = server.create_database(f"kyc_{worker}")
    engine = make_engine(url)
    upgrade(engine)
    w = offline_world(engine)
    for who in ("officer_a", "officer_b"):  # two compliance officers besides the world's
        r = w.call(
            "admin",
            "POST",
            "/v1/principals",
            json={"name": who, "role": "compliance_officer", "party_id": w.party_ids["bank"]},
        )
        assert r.status_code == 201, r.text
        w.api_keys[who] = r.json()["api_key"]
    return w


def fresh_miner(world: World) -> tuple[str, int]:
    """A new miner party with its own principal (named as the world knows it), no record."""
    name = f"kyc-miner-{next(_names)}"
    party = world.call("admin", "POST", "/v1/parties", json={"name": name, "kind": "miner"})
    assert party.status_code == 201, party.text
    r = world.call(
        "admin",
        "POST",
        "/v1/principals",
        json={"name": name, "role": "miner", "party_id": party.json()["id"]},
    )
    assert r.status_code == 201, r.text
    world.api_keys[name] = r.json()["api_key"]
    return name, party.json()["id"]


def put_record(world: World, party: int, who: str = "bank_operator", **body: Any) -> Any:
    return world.call(who, "PUT", f"/v1/parties/{party}/miner-record", json=body)


def review(world: World, party: int, who: str, decision: str = "approve") -> Any:
    digest = world.call("admin", "GET", f"/v1/parties/{party}/miner-record").json()["digest"]
    return world.call(
        who,
        "POST",
        f"/v1/parties/{party}/miner-record/reviews",
        json={"decision": decision, "reason": f"{decision}d by {who}", "digest": digest},
    )


def two_keyed_draft(world: World, miner: str, party: int) -> int:
    """A draft loan of this miner with the miner's and the arbiter's keys."""
    body = world.loan_body()
    body["miner_party_id"] = party
    r = world.call("bank_operator", "POST", "/v1/loans", json=body)
    assert r.status_code == 201, r.text
    loan: int = r.json()["id"]
    for who, seat in ((miner, "miner"), ("arbiter", "arbiter")):
        r = world.call(
            who, "PUT", f"/v1/loans/{loan}/keys/{seat}", json={"kind": "hd", "key": hd_key()}
        )
        assert r.status_code == 200, r.text
    return loan


def last_key(world: World, loan: int) -> Any:
    return world.call(
        "bank_operator", "PUT", f"/v1/loans/{loan}/keys/bank", json={"kind": "hd", "key": hd_key()}
    )


def loan_state(world: World, loan: int) -> str:
    state: str = world.call("bank_operator", "GET", f"/v1/loans/{loan}").json()["state"]
    return state


def assert_held(world: World, loan: int, state: str, flags: list[str] | None = None) -> None:
    r = last_key(world, loan)
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["error"] == "compliance_pending" and body["state"] == state, body
    assert [f["code"] for f in body["flags"]] == (flags or [])
    assert loan_state(world, loan) == "draft"
    keys = world.call("bank_operator", "GET", f"/v1/loans/{loan}").json()["keys"]
    assert sorted(k["role"] for k in keys) == ["arbiter", "miner"]  # the bank key not stored


def test_a_draft_stays_draft_until_the_miners_record_is_approved(world: World) -> None:
    miner, party = fresh_miner(world)
    loan = two_keyed_draft(world, miner, party)
    assert_held(world, loan, "missing")
    # The bank's signer is not even asked for a key for such a loan.
    r = world.call("bank_operator", "POST", f"/v1/loans/{loan}/keys/bank/hsm")
    assert r.status_code == 409 and r.json()["error"] == "compliance_pending", r.text
    assert put_record(world, party, **CLEAN_RECORD).status_code == 200
    assert_held(world, loan, "pending")
    approved = review(world, party, "officer_a")
    assert approved.status_code == 201 and approved.json()["state"] == "approved", approved.text
    r = last_key(world, loan)
    assert r.status_code == 200, r.text
    assert loan_state(world, loan) == "awaiting_deposit"
    actions = audit_actions(world.engine)
    assert "compliance.record.changed" in actions and "compliance.review.approved" in actions


def test_a_high_risk_record_needs_two_different_officers(world: World) -> None:
    miner, party = fresh_miner(world)
    r = put_record(world, party, **PERSON, monthly_energy_kwh=10_000)  # above 6,000, unregistered
    assert r.status_code == 200, r.text
    assert [f["code"] for f in r.json()["flags"]] == ["unregistered_above_energy_limit"]
    assert r.json()["approvals_needed"] == 2
    loan = two_keyed_draft(world, miner, party)
    first = review(world, party, "officer_a")
    assert first.status_code == 201 and first.json()["state"] == "pending", first.text
    assert_held(world, loan, "pending", ["unregistered_above_energy_limit"])
    again = review(world, party, "officer_a")
    assert again.status_code == 409 and again.json()["error"] == "review_repeated", again.text
    assert_held(world, loan, "pending", ["unregistered_above_energy_limit"])
    second = review(world, party, "officer_b")
    assert second.status_code == 201 and second.json()["state"] == "approved", second.text
    assert last_key(world, loan).status_code == 200
    assert loan_state(world, loan) == "awaiting_deposit"


def test_a_mining_ban_in_the_region_within_the_loans_period_makes_it_high_risk(
    world: World,
) -> None:
    miner, party = fresh_miner(world)
    # Dagestan (05): the seeded ban runs to 15 March 2031, the loan matures in 180 days.
    dagestan: dict[str, Any] = {**PERSON, "region": "05", "monthly_energy_kwh": 1_000}
    assert put_record(world, party, **dagestan).status_code == 200
    loan = two_keyed_draft(world, miner, party)
    assert review(world, party, "officer_a").status_code == 201
    assert_held(world, loan, "pending", ["region_mining_ban"])
    assert review(world, party, "compliance_officer").json()["state"] == "approved"
    assert last_key(world, loan).status_code == 200


def test_an_edit_or_a_new_document_after_approval_voids_it(world: World) -> None:
    miner, party = fresh_miner(world)
    assert put_record(world, party, **CLEAN_RECORD).status_code == 200
    assert review(world, party, "officer_a").json()["state"] == "approved"
    loan = two_keyed_draft(world, miner, party)
    # The same values again: nothing changes, the approval stands.
    same = put_record(world, party, **CLEAN_RECORD)
    assert same.json()["state"] == "approved" and same.json()["version"] == 1
    edited = put_record(world, party, **{**CLEAN_RECORD, "monthly_energy_kwh": 60_000})
    assert edited.json()["state"] == "pending" and edited.json()["version"] == 2
    assert_held(world, loan, "pending")
    assert review(world, party, "officer_a").json()["state"] == "approved"
    doc = world.client.post(
        f"/v1/parties/{party}/documents?kind=energy_contract",
        content=b"contract",
        headers={**world.h(miner), "Content-Type": "text/plain"},
    )
    assert doc.status_code == 201, doc.text
    shown = world.call("admin", "GET", f"/v1/parties/{party}/miner-record").json()
    assert shown["state"] == "pending" and shown["reviews"] == []
    assert_held(world, loan, "pending")
    [changed] = [
        data
        for data in _event_data(world, "compliance.record.changed")
        if data["party_id"] == party and data["version"] == 2
    ]
    assert changed["changed"] == {"monthly_energy_kwh": {"before": 50_000, "after": 60_000}}


def test_a_review_of_a_stale_content_by_its_editor_or_a_rejection_does_not_pass(
    world: World,
) -> None:
    miner, party = fresh_miner(world)
    first = put_record(world, party, **CLEAN_RECORD).json()
    assert put_record(world, party, **{**CLEAN_RECORD, "region": "78"}).status_code == 200
    stale = world.call(
        "officer_a",
        "POST",
        f"/v1/parties/{party}/miner-record/reviews",
        json={"decision": "approve", "reason": "ok", "digest": first["digest"]},
    )
    assert stale.status_code == 409 and stale.json()["error"] == "record_changed", stale.text
    assert stale.json()["field"] == "digest"
    # An officer who edits the record may not approve their own edit.
    assert put_record(world, party, "officer_b", **CLEAN_RECORD).status_code == 200
    own = review(world, party, "officer_b")
    assert own.status_code == 409 and own.json()["error"] == "self_review", own.text
    evidence = world.client.post(
        f"/v1/parties/{party}/documents?kind=other",
        content=b"a note",
        headers={**world.h("compliance_officer"), "Content-Type": "text/plain"},
    )
    assert evidence.status_code == 201, evidence.text
    uploader = review(world, party, "compliance_officer")
    assert uploader.status_code == 409 and uploader.json()["error"] == "self_review"
    rejected = review(world, party, "officer_a", "reject")
    assert rejected.status_code == 201 and rejected.json()["state"] == "rejected"
    assert review(world, party, "bank_operator").status_code == 403
    loan = two_keyed_draft(world, miner, party)
    assert_held(world, loan, "rejected")
    # Only compliance officers review: the bank operator and the miner are refused.
    for who in ("bank_operator", miner):
        assert review(world, party, who).status_code == 403


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"inn": "7707083894"}, "inn"),  # wrong check digit
        ({"inn": "500100732259"}, "inn"),  # a person's INN for a company
        ({"ogrn": "1027700132196"}, "ogrn"),
        ({"ogrn": "304500116000157"}, "ogrn"),  # an OGRNIP for a company
        (
            {"register_number": None, "register_date": None, "register_status": None},
            "register_number",
        ),
        ({"register_status": "dormant"}, "register_status"),
        ({"region": "99"}, "region"),
        ({"legal_form": "cooperative"}, "legal_form"),
        ({"monthly_energy_kwh": -5}, "monthly_energy_kwh"),
        ({"monthly_energy_kwh": 1.5}, "monthly_energy_kwh"),
        ({"data_centre_name": "DC", "data_centre_inn": "1234567890"}, "data_centre_inn"),
        ({"nickname": "x"}, "nickname"),
    ],
)
def test_a_bad_value_is_refused_naming_its_field_and_changes_nothing(
    world: World, change: dict[str, Any], field: str
) -> None:
    party = world.party_ids["miner"]
    before = world.call("admin", "GET", f"/v1/parties/{party}/miner-record").json()
    events = len(audit_actions(world.engine))
    r = put_record(world, party, **{**CLEAN_RECORD, **change})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field, r.json()
    assert world.call("admin", "GET", f"/v1/parties/{party}/miner-record").json() == before
    assert len(audit_actions(world.engine)) == events


def test_a_miner_sees_and_documents_only_its_own_record(world: World) -> None:
    miner, party = fresh_miner(world)
    assert put_record(world, party, **PERSON, monthly_energy_kwh=100).status_code == 200
    assert put_record(world, party, miner, **PERSON, monthly_energy_kwh=1).status_code == 403
    content = b"%PDF-1.4 register extract of " + miner.encode()
    up = world.client.post(
        f"/v1/parties/{party}/documents?kind=register_extract&filename=extract.pdf",
        content=content,
        headers={**world.h(miner), "Content-Type": "application/pdf"},
    )
    assert up.status_code == 201, up.text
    doc = up.json()
    assert doc["sha256"] == hashlib.sha256(content).hexdigest() and doc["size"] == len(content)
    assert doc["uploaded_by"] == f"miner:{miner}"
    got = world.call(miner, "GET", f"/v1/parties/{party}/documents/{doc['id']}")
    assert got.status_code == 200 and got.content == content
    assert got.headers["content-type"] == "application/pdf"
    for outsider in ("other_miner", "arbiter"):
        for path in (
            f"/v1/parties/{party}/miner-record",
            f"/v1/parties/{party}/documents",
            f"/v1/parties/{party}/documents/{doc['id']}",
        ):
            r = world.call(outsider, "GET", path)
            assert r.status_code == 404 and str(party) not in r.text, (outsider, path, r.text)
    # The other miner's own party does not reach this party's document either.
    own = world.party_ids["other_miner"]
    r = world.call("other_miner", "GET", f"/v1/parties/{own}/documents/{doc['id']}")
    assert r.status_code == 404 and r.json()["error"] == "document_not_found"
    [event] = [e for e in _events(world, "compliance.document.uploaded") if doc["sha256"] in e.data]
    assert "register extract" not in event.data  # digests, never the bytes


def test_a_document_of_another_type_empty_or_altered_in_storage_is_refused(world: World) -> None:
    party = world.party_ids["other_miner"]

    def upload(content: bytes, media: str) -> Any:
        return world.client.post(
            f"/v1/parties/{party}/documents",
            content=content,
            headers={**world.h("bank_operator"), "Content-Type": media},
        )

    r = upload(b"MZ\x90\x00", "application/x-msdownload")
    assert r.status_code == 415 and r.json()["error"] == "unsupported_content_type", r.text
    r = upload(b"", "application/pdf")
    assert r.status_code == 422 and r.json()["field"] == "body", r.text
    too_big = world.client.post(
        f"/v1/parties/{party}/documents",
        content=b"x" * (4 * 1024 * 1024 + 1),
        headers={**world.h("bank_operator"), "Content-Type": "text/plain"},
    )
    assert too_big.status_code == 413, too_big.text
    doc = upload(b"original bytes", "text/plain").json()
    with Session(world.engine) as s:
        s.execute(
            update(EvidenceDocument)
            .where(col(EvidenceDocument.id) == doc["id"])
            .values(content=b"altered bytes!")
        )
        s.commit()
    r = world.call("auditor", "GET", f"/v1/parties/{party}/documents/{doc['id']}")
    assert r.status_code == 503 and r.json()["error"] == "document_corrupted", r.text


def test_compliance_edits_the_ban_table_and_the_flags_follow(world: World) -> None:
    _, party = fresh_miner(world)
    assert (
        put_record(world, party, **{**PERSON, "region": "01"}, monthly_energy_kwh=10).status_code
        == 200
    )
    r = world.call(
        "compliance_officer",
        "POST",
        "/v1/compliance/mining-bans",
        json={"region": "01", "starts_on": "2026-01-01", "months": [12, 1], "note": "winter"},
    )
    assert r.status_code == 201, r.text
    ban = r.json()
    shown = world.call("admin", "GET", f"/v1/parties/{party}/miner-record").json()
    assert [f["code"] for f in shown["flags"]] == ["region_mining_ban"]
    bad = world.call(
        "admin",
        "POST",
        "/v1/compliance/mining-bans",
        json={"region": "01", "starts_on": "2027-01-01", "ends_on": "2026-01-01"},
    )
    assert bad.status_code == 422 and bad.json()["field"] == "ends_on"
    assert (
        world.call("bank_operator", "DELETE", f"/v1/compliance/mining-bans/{ban['id']}").status_code
        == 403
    )
    assert (
        world.call("admin", "DELETE", f"/v1/compliance/mining-bans/{ban['id']}").status_code == 204
    )
    shown = world.call("admin", "GET", f"/v1/parties/{party}/miner-record").json()
    assert shown["flags"] == []
    seeded = world.call("auditor", "GET", "/v1/compliance/mining-bans").json()
    assert {"05", "20", "03"} <= {b["region"] for b in seeded}
    assert "compliance.ban.deleted" in audit_actions(world.engine)


def _events(world: World, action: str) -> list[AuditEvent]:
    with Session(world.engine) as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.action == action)).all())


def _event_data(world: World, action: str) -> list[dict[str, Any]]:
    return [json.loads(e.data) for e in _events(world, action)]
