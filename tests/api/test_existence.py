"""No existence oracle: an outsider asking for another party's object gets the very answer
(status and body, byte for byte) that an id nobody has gets, on every route that looks an
object up by its id: loans and their keys, addresses, deposits, exports and requests;
signing requests and everything done to them; signer statements; parties and their
webhooks. On SQLite and PostgreSQL, as the authorization matrix."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from support.kyc import CLEAN_RECORD
from support.offline import funded_loan, keyed_draft, offline_world
from support.world import World, hd_key

from custody.db.migrate import upgrade
from custody.db.models import ScreeningDecision, ScreeningStatus
from custody.db.session import make_engine, transaction

MISSING = 999_999  # an id no row has (inside every column's range)


@dataclass(frozen=True)
class Lookup:
    method: str
    route: str  # the route template, to check that every one is here
    target: str  # which of the world's objects its id names
    body: Callable[[dict[str, Any]], Any] | None = None
    outsiders: tuple[str, ...] = ("other_miner", "other_arbiter")
    status: int = 404  # what an outsider gets, for both (403 where the role alone refuses)

    def path(self, object_id: int) -> str:
        name = self.route[self.route.index("{") + 1 : self.route.index("}")]
        path = self.route.replace("{" + name + "}", str(object_id))
        path = path.replace("{document_id}", str(object_id))
        return path.replace("{seat}", "miner").replace("{fmt}", "descriptor")


def _repayment(_objects: dict[str, Any]) -> dict[str, Any]:
    return {"amount_kopecks": 100_00, "paid_at": datetime.now(UTC).isoformat()}


# Who may not see a statement: every party, the loan's own miner and arbiter included.
_NOT_STAFF = ("miner", "arbiter", "other_miner", "other_arbiter")
# A party's webhooks are its own people's (and an admin's): every other principal is out.
_NOT_OWN = ("bank_operator", "bank_approver", "auditor", "arbiter", "other_miner", "other_arbiter")
# Principals are the admin's to manage: everyone else is refused by role, whatever the id.
# A miner's compliance record: the other parties (arbiters see no miner's record).
_NOT_MINER = ("other_miner", "arbiter", "other_arbiter")
_NOT_ADMIN = ("bank_operator", "bank_approver", "auditor", "miner", "arbiter", "other_miner")
# Reports are the auditors' and compliance officers': everyone else is refused by role.
_NOT_REPORT_READERS = ("admin", "bank_operator", "bank_approver", "miner", "arbiter")
# Screening decisions and lists: neither the bank's lending staff nor any party.
_NOT_COMPLIANCE = ("bank_operator", "bank_approver", "miner", "arbiter", "other_miner")

LOOKUPS = (
    Lookup("GET", "/v1/loans/{loan_id}", "loan"),
    Lookup(
        "PUT",
        "/v1/loans/{loan_id}/keys/{seat}",
        "draft",
        lambda o: {"kind": "hd", "key": hd_key()},
    ),
    Lookup("POST", "/v1/loans/{loan_id}/keys/bank/hsm", "keyed"),
    Lookup("POST", "/v1/loans/{loan_id}/repayments", "loan", _repayment),
    Lookup("POST", "/v1/loans/{loan_id}/addresses", "loan"),
    Lookup("GET", "/v1/loans/{loan_id}/addresses", "loan"),
    Lookup("GET", "/v1/loans/{loan_id}/deposits", "loan"),
    Lookup("GET", "/v1/loans/{loan_id}/export/{fmt}", "loan"),
    Lookup("POST", "/v1/loans/{loan_id}/signing-requests", "loan", lambda o: {"action": "release"}),
    Lookup("GET", "/v1/loans/{loan_id}/signing-requests", "loan"),
    Lookup("GET", "/v1/signing-requests/{request_id}", "request"),
    Lookup("GET", "/v1/signing-requests/{request_id}/psbt", "request"),
    Lookup("GET", "/v1/signing-requests/{request_id}/psbt.bin", "request"),
    Lookup("GET", "/v1/signing-requests/{request_id}/approval", "request"),
    Lookup(
        "POST",
        "/v1/signing-requests/{request_id}/signatures",
        "request",
        lambda o: {"psbt": o["psbt"]},
    ),
    Lookup("POST", "/v1/signing-requests/{request_id}/broadcast", "request"),
    Lookup("POST", "/v1/signing-requests/{request_id}/cancel", "request"),
    Lookup(
        "POST",
        "/v1/signing-requests/{request_id}/bump",
        "request",
        lambda o: {"fee_rate_sat_vb": "5"},
    ),
    Lookup("POST", "/v1/signing-requests/{request_id}/approve", "request"),
    Lookup("GET", "/v1/signer-statements/{statement_id}", "statement", outsiders=_NOT_STAFF),
    Lookup("POST", "/v1/signer-statements/{statement_id}/retry", "statement", outsiders=_NOT_STAFF),
    Lookup(
        "POST",
        "/v1/signer-statements/{statement_id}/endorsements",
        "statement",
        lambda o: o["endorsement"],
        outsiders=_NOT_STAFF,
    ),
    Lookup("GET", "/v1/parties/{party_id}", "party", outsiders=("other_miner", "arbiter")),
    Lookup("GET", "/v1/parties/{party_id}/webhooks", "party", outsiders=_NOT_OWN),
    Lookup(
        "POST",
        "/v1/parties/{party_id}/webhooks",
        "party",
        lambda o: {"url": "https://hooks.example/x", "secret": "s" * 40},
        outsiders=_NOT_OWN,
    ),
    Lookup("GET", "/v1/prices/{price_id}", "price", outsiders=_NOT_STAFF, status=403),
    Lookup("POST", "/v1/prices/{price_id}/confirm", "price", outsiders=_NOT_STAFF, status=403),
    Lookup("POST", "/v1/prices/{price_id}/reject", "price", outsiders=_NOT_STAFF, status=403),
    Lookup(
        "POST",
        "/v1/principals/{principal_id}/revoke",
        "principal",
        outsiders=_NOT_ADMIN,
        status=403,
    ),
    Lookup(
        "POST",
        "/v1/principals/{principal_id}/rotate",
        "principal",
        outsiders=_NOT_ADMIN,
        status=403,
    ),
    Lookup(
        "POST",
        "/v1/principals/{principal_id}/invitations",
        "principal",
        outsiders=_NOT_ADMIN,
        status=403,
    ),
    Lookup(
        "GET",
        "/v1/loans/{loan_id}/statement.pdf",
        "loan",
        outsiders=_NOT_REPORT_READERS,
        status=403,
    ),
    # A miner's compliance record and documents: staff and the miner itself (issue 15).
    Lookup("GET", "/v1/parties/{party_id}/miner-record", "party", outsiders=_NOT_MINER),
    Lookup(
        "PUT",
        "/v1/parties/{party_id}/miner-record",
        "party",
        lambda o: CLEAN_RECORD,
        outsiders=_NOT_MINER,
    ),
    Lookup(
        "POST",
        "/v1/parties/{party_id}/miner-record/reviews",
        "party",
        lambda o: {"decision": "approve", "reason": "ok", "digest": "0" * 64},
        outsiders=_NOT_MINER,
    ),
    Lookup("GET", "/v1/parties/{party_id}/documents", "party", outsiders=_NOT_MINER),
    Lookup("POST", "/v1/parties/{party_id}/documents", "party", outsiders=_NOT_MINER),
    # (the same number for the party and the document: the party is looked up first)
    Lookup("GET", "/v1/parties/{party_id}/documents/{document_id}", "party", outsiders=_NOT_MINER),
    Lookup(
        "DELETE",
        "/v1/compliance/mining-bans/{ban_id}",
        "ban",
        outsiders=("bank_operator", "auditor", "miner", "arbiter"),
        status=403,
    ),
    # Screening is the compliance officers' (auditors read): every other role is refused.
    Lookup(
        "GET",
        "/v1/screening-decisions/{decision_id}",
        "screening",
        outsiders=_NOT_COMPLIANCE,
        status=403,
    ),
    Lookup(
        "POST",
        "/v1/screening-decisions/{decision_id}/resolution",
        "screening",
        lambda o: {"outcome": "clear", "reason": "checked"},
        outsiders=(*_NOT_COMPLIANCE, "auditor"),
        status=403,
    ),
    Lookup(
        "POST",
        "/v1/screening-lists/{entry_id}/removal",
        "list_entry",
        lambda o: {"reason": "checked"},
        outsiders=_NOT_COMPLIANCE,
        status=403,
    ),
)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('exist') / 'db.sqlite'}"
    else:
        server = request.getfixturevalue("postgres_server")
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        url = server.create_database(f"exist_{worker}")
    engine = make_engine(url)
    upgrade(engine)
    return offline_world(engine)


@pytest.fixture(scope="module")
def objects(world: World) -> dict[str, Any]:
    """One of each object, all of the miner's and the arbiter's loans at this bank."""
    loan = funded_loan(world)
    r = world.call(
        "bank_operator", "POST", f"/v1/loans/{loan}/signing-requests", json={"action": "release"}
    )
    assert r.status_code == 201, r.text
    request_id = r.json()["id"]
    psbt = world.call("miner", "GET", f"/v1/signing-requests/{request_id}/psbt").json()["psbt"]
    keyed = keyed_draft(world)
    r = world.call("bank_operator", "POST", f"/v1/loans/{keyed_draft(world)}/keys/bank/hsm")
    assert r.status_code == 201, r.text
    price = world.call("bank_operator", "POST", "/v1/prices", json={"price_rub_per_btc": "6000000"})
    assert price.status_code == 201, price.text
    auditor = world.call("admin", "GET", "/v1/me").json()  # any principal id will do
    entry = world.call(
        "compliance_officer",
        "POST",
        "/v1/screening-lists",
        json={"kind": "txid", "value": "ab" * 32, "action": "block", "note": "t"},
    )
    assert entry.status_code == 201, entry.text
    with transaction(world.engine) as session:
        decision = ScreeningDecision(
            subject="payout",
            loan_id=loan,
            address="bcrt1qexistence",
            purpose="miner_return",
            status=ScreeningStatus.review,
            result="review",
        )
        session.add(decision)
        session.flush()
        decision_id = decision.id
    return {
        "price": price.json()["id"],
        "principal": auditor["id"],
        "loan": loan,
        "draft": world.create_loan()["id"],
        "keyed": keyed,
        "request": request_id,
        "psbt": psbt,
        "statement": r.json()["id"],
        "endorsement": world.staff["operator"].endorse(r.json()["statement"]),
        "party": world.party_ids["miner"],
        "ban": 1,  # seeded by the migration
        "screening": decision_id,
        "list_entry": entry.json()["id"],
    }


@pytest.mark.parametrize("lookup", LOOKUPS, ids=lambda c: f"{c.method} {c.route}")
def test_an_outsider_cannot_tell_an_object_from_no_object(
    world: World, objects: dict[str, Any], lookup: Lookup
) -> None:
    existing = objects[lookup.target]
    body = lookup.body(objects) if lookup.body else None
    for who in lookup.outsiders:
        theirs = world.call(who, lookup.method, lookup.path(existing), json=body)
        nobodys = world.call(who, lookup.method, lookup.path(MISSING), json=body)
        assert theirs.status_code == nobodys.status_code == lookup.status, (
            who,
            theirs.text,
            nobodys.text,
        )
        assert theirs.content == nobodys.content, (who, theirs.text, nobodys.text)
        assert theirs.headers["content-type"] == nobodys.headers["content-type"]
        assert theirs.json()["field"] is None and str(existing) not in theirs.text


def test_the_objects_are_there_for_those_who_may_see_them(
    world: World, objects: dict[str, Any]
) -> None:
    """The outsiders' 404s above are about them, not about missing objects."""
    for path in (
        f"/v1/loans/{objects['loan']}",
        f"/v1/signing-requests/{objects['request']}",
        f"/v1/signer-statements/{objects['statement']}",
        f"/v1/parties/{objects['party']}/webhooks",
    ):
        assert world.call("admin", "GET", path).status_code == 200, path
    assert (
        world.call("miner", "GET", f"/v1/signing-requests/{objects['request']}").status_code == 200
    )


def test_every_route_with_an_id_is_checked(world: World) -> None:
    paths = world.client.get("/v1/openapi.json").json()["paths"]
    with_an_id = {(m.upper(), p) for p, ops in paths.items() for m in ops if "_id}" in p}
    assert with_an_id == {(c.method, c.route) for c in LOOKUPS}


def test_an_object_nobody_has_is_not_found_for_staff_too(world: World) -> None:
    """A missing party's webhooks are not an empty list: not found, like registering one."""
    for method, body in (
        ("GET", None),
        ("POST", {"url": "https://hooks.example/y", "secret": "s" * 40}),
    ):
        r = world.call("admin", method, f"/v1/parties/{MISSING}/webhooks", json=body)
        assert r.status_code == 404, (method, r.text)
        assert r.json() == {"error": "party_not_found", "message": "party not found", "field": None}
