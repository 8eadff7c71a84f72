"""Every endpoint x every role. A miner never sees or acts on another miner's loan;
an arbiter only on loans it arbitrates; nobody without a key gets anything but health
and its metrics.

Runs on SQLite (the rules are in Python, not in the database); the loan tests run
on both databases."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from support.kyc import CLEAN_RECORD
from support.offline import RecordingSigner, funded_loan, keyed_draft, offline_world
from support.world import WHO, World, hd_key

from custody.db.migrate import upgrade
from custody.db.models import ScreeningDecision, ScreeningStatus
from custody.db.session import make_engine, transaction

ANON = "anonymous"
EVERYONE = (*WHO, ANON)


@dataclass
class Case:
    method: str
    route: str  # the route template, to check coverage
    path: Callable[[World, dict[str, Any]], str]
    expect: dict[str, int]  # who -> status; missing = 403 for authenticated, 401 for anonymous
    body: Callable[[World, dict[str, Any]], Any] | None = None
    # which fixture: "ready" (all keys), "hsm" (bank key with the signer), or fresh per call:
    # "draft" (no keys), "keyed" (miner's and arbiter's keys), "funded", "request",
    # "statement" (an open bank-key registration statement), "price" (a confirmed manual
    # price), "proposal" (one the bank operator proposed), "principal" (a fresh auditor's key)
    # "screening" (a payout screening under review), "list_entry" (one on the bank's lists)
    needs: str = "ready"
    raw: tuple[str, bytes] | None = None  # (content type, bytes): an upload, not JSON


def _visible(ok: int) -> dict[str, int]:
    """Readable by staff and the loan's own miner and arbiter; 404 for other parties."""
    return {
        "admin": ok,
        "bank_operator": ok,
        "bank_approver": ok,
        "auditor": ok,
        "compliance_officer": ok,
        "miner": ok,
        "arbiter": ok,
        "other_miner": 404,
        "other_arbiter": 404,
    }


def _act(ok_for: tuple[str, ...], ok: int) -> dict[str, int]:
    """An action on a loan: outsiders get 404, insiders without the right get 403."""
    out = {"other_miner": 404, "other_arbiter": 404}
    out.update({who: ok for who in ok_for})
    return out


CASES: list[Case] = [
    Case("GET", "/v1/health", lambda w, c: "/v1/health", {who: 200 for who in EVERYONE}),
    Case("GET", "/v1/metrics", lambda w, c: "/v1/metrics", {who: 200 for who in EVERYONE}),
    Case("GET", "/v1/me", lambda w, c: "/v1/me", {who: 200 for who in WHO}),
    Case(
        "POST",
        "/v1/principals",
        lambda w, c: "/v1/principals",
        {"admin": 201},
        body=lambda w, c: {"name": f"p-{c['n']}", "role": "auditor"},
    ),
    Case(
        "POST",
        "/v1/principals/{principal_id}/revoke",
        lambda w, c: f"/v1/principals/{c['principal']}/revoke",
        {"admin": 200},
        needs="principal",
    ),
    Case(
        "POST",
        "/v1/principals/{principal_id}/rotate",
        lambda w, c: f"/v1/principals/{c['principal']}/rotate",
        {"admin": 200},
        needs="principal",
    ),
    Case(
        "POST",
        "/v1/principals/{principal_id}/invitations",
        lambda w, c: f"/v1/principals/{c['principal']}/invitations",
        {"admin": 201},
        needs="principal",
    ),
    Case(
        "POST",
        "/v1/parties",
        lambda w, c: "/v1/parties",
        {"admin": 201, "bank_operator": 201},
        body=lambda w, c: {"name": f"party-{c['n']}", "kind": "miner"},
    ),
    Case("GET", "/v1/parties", lambda w, c: "/v1/parties", {who: 200 for who in WHO}),
    Case(
        "GET",
        "/v1/parties/{party_id}",
        lambda w, c: f"/v1/parties/{w.party_ids['miner']}",
        {
            "admin": 200,
            "bank_operator": 200,
            "bank_approver": 200,
            "auditor": 200,
            "compliance_officer": 200,
            "miner": 200,
            "other_miner": 404,
            "arbiter": 404,
            "other_arbiter": 404,
        },
    ),
    Case(
        "POST",
        "/v1/loans",
        lambda w, c: "/v1/loans",
        {"bank_operator": 201},
        body=lambda w, c: w.loan_body(),
    ),
    Case("GET", "/v1/loans", lambda w, c: "/v1/loans", {who: 200 for who in WHO}),
    Case("GET", "/v1/loans/{loan_id}", lambda w, c: f"/v1/loans/{c['ready']}", _visible(200)),
    Case(
        "PUT",
        "/v1/loans/{loan_id}/keys/{seat}",
        lambda w, c: f"/v1/loans/{c['draft']}/keys/miner",
        _act(("miner",), 200),
        body=lambda w, c: {"kind": "hd", "key": hd_key()},
        needs="draft",
    ),
    Case(
        "PUT",
        "/v1/loans/{loan_id}/keys/{seat}",
        lambda w, c: f"/v1/loans/{c['draft']}/keys/bank",
        _act(("bank_operator",), 200),
        body=lambda w, c: {"kind": "hd", "key": hd_key()},
        needs="draft",
    ),
    Case(
        "PUT",
        "/v1/loans/{loan_id}/keys/{seat}",
        lambda w, c: f"/v1/loans/{c['draft']}/keys/arbiter",
        _act(("arbiter",), 200),
        body=lambda w, c: {"kind": "hd", "key": hd_key()},
        needs="draft",
    ),
    Case(
        "POST",
        "/v1/loans/{loan_id}/keys/bank/hsm",
        lambda w, c: f"/v1/loans/{c['keyed']}/keys/bank/hsm",
        # The miner's and arbiter's keys are in: the registration statement is opened.
        _act(("bank_operator",), 201),
        needs="keyed",
    ),
    Case(
        "POST",
        "/v1/loans/{loan_id}/keys/bank/hsm",
        lambda w, c: f"/v1/loans/{c['draft']}/keys/bank/hsm",
        # Past the rules, a draft without the miner's and arbiter's keys: register them first.
        _act(("bank_operator",), 409),
        needs="draft",
    ),
    Case(
        "POST",
        "/v1/loans/{loan_id}/repayments",
        lambda w, c: f"/v1/loans/{c['hsm']}/repayments",
        _act(("bank_operator",), 201),
        body=lambda w, c: {
            "amount_kopecks": 1_000_00,
            "paid_at": datetime.now(UTC).isoformat(),
            "repayment_id": f"r-{c['n']}",
        },
        needs="hsm",
    ),
    Case(
        "GET",
        "/v1/signer-statements/{statement_id}",
        lambda w, c: f"/v1/signer-statements/{c['statement']}",
        # Bank staff, auditors and admins; the loan's own miner and arbiter never see it.
        {
            "admin": 200,
            "bank_operator": 200,
            "bank_approver": 200,
            "auditor": 200,
            "compliance_officer": 404,
            "miner": 404,
            "arbiter": 404,
            "other_miner": 404,
            "other_arbiter": 404,
        },
        needs="statement",
    ),
    Case(
        "POST",
        "/v1/signer-statements/{statement_id}/endorsements",
        lambda w, c: f"/v1/signer-statements/{c['statement']}/endorsements",
        # One signature is kept (the signer is called at two); an auditor sees, never signs.
        {
            "admin": 200,
            "bank_operator": 200,
            "bank_approver": 200,
            "auditor": 403,
            "compliance_officer": 404,
            "miner": 404,
            "arbiter": 404,
            "other_miner": 404,
            "other_arbiter": 404,
        },
        body=lambda w, c: w.staff["operator"].endorse(c["statement_body"]),
        needs="statement",
    ),
    Case(
        "POST",
        "/v1/signer-people",
        lambda w, c: "/v1/signer-people",
        # Only an admin opens an enrolment; two admins enrolled in the signer sign it.
        {**{who: 403 for who in WHO}, "admin": 201},
        body=lambda w, c: {
            "name": f"new.person{secrets.token_hex(3)}",
            "role": "bank_approver",
            "public_key": secrets.token_hex(32),
        },
    ),
    Case(
        "POST",
        "/v1/signer-people/{name}/removal",
        lambda w, c: "/v1/signer-people/anton.approver/removal",
        {**{who: 403 for who in WHO}, "admin": 201},
    ),
    Case(
        "POST",
        "/v1/signer-statements/{statement_id}/retry",
        lambda w, c: f"/v1/signer-statements/{c['statement']}/retry",
        # Without two signatures there is nothing to retry: the staff learn why (409).
        {
            "admin": 409,
            "bank_operator": 409,
            "bank_approver": 409,
            "auditor": 403,
            "compliance_officer": 404,
            "miner": 404,
            "arbiter": 404,
            "other_miner": 404,
            "other_arbiter": 404,
        },
        needs="statement",
    ),
    Case(
        "POST",
        "/v1/loans/{loan_id}/addresses",
        lambda w, c: f"/v1/loans/{c['ready']}/addresses",
        _act(("miner", "bank_operator"), 201),
    ),
    Case(
        "GET",
        "/v1/loans/{loan_id}/addresses",
        lambda w, c: f"/v1/loans/{c['ready']}/addresses",
        _visible(200),
    ),
    Case(
        "GET",
        "/v1/loans/{loan_id}/deposits",
        lambda w, c: f"/v1/loans/{c['ready']}/deposits",
        _visible(200),
    ),
    Case(
        "GET",
        "/v1/loans/{loan_id}/export/{fmt}",
        lambda w, c: f"/v1/loans/{c['ready']}/export/descriptor",
        _visible(200),
    ),
    Case(
        "GET",
        "/v1/audit/verify",
        lambda w, c: "/v1/audit/verify",
        {"admin": 200, "auditor": 200, "bank_approver": 200},
    ),
    # Proof of collateral (issue 15 D). The offline world has no node, so who may have a
    # proof gets 503 node_not_configured (tests/proof builds real ones against btcd); the
    # book is for auditors, compliance officers and admins, a loan's proof its miner's too.
    Case(
        "GET",
        "/v1/proofs/collateral",
        lambda w, c: "/v1/proofs/collateral",
        {"admin": 503, "auditor": 503, "compliance_officer": 503},
    ),
    Case(
        "GET",
        "/v1/proofs/collateral",
        lambda w, c: f"/v1/proofs/collateral?loan_id={c['ready']}",
        {
            "admin": 503,
            "auditor": 503,
            "compliance_officer": 503,
            "miner": 503,
            "other_miner": 404,
        },
    ),
    Case(
        "POST",
        "/v1/loans/{loan_id}/signing-requests",
        lambda w, c: f"/v1/loans/{c['funded']}/signing-requests",
        _act(("bank_operator",), 201),
        body=lambda w, c: {"action": "release"},
        needs="funded",
    ),
    Case(
        "GET",
        "/v1/loans/{loan_id}/signing-requests",
        lambda w, c: f"/v1/loans/{c['ready']}/signing-requests",
        _visible(200),
    ),
    Case(
        "GET",
        "/v1/signing-requests/{request_id}",
        lambda w, c: f"/v1/signing-requests/{c['request']}",
        _visible(200),
        needs="request",
    ),
    Case(
        "GET",
        "/v1/signing-requests/{request_id}/psbt",
        lambda w, c: f"/v1/signing-requests/{c['request']}/psbt",
        _visible(200),
        needs="request",
    ),
    Case(
        "GET",
        "/v1/signing-requests/{request_id}/approval",
        lambda w, c: f"/v1/signing-requests/{c['request']}/approval",
        # The bank's staff, auditors and admins (the page of an approval); the loan's own
        # miner and arbiter see the request, not this (403); other parties not even it.
        # This world's bank key is an xpub, so there is no signer statement to approve.
        {
            "admin": 409,
            "bank_operator": 409,
            "bank_approver": 409,
            "auditor": 409,
            "miner": 403,
            "arbiter": 403,
            "other_miner": 404,
            "other_arbiter": 404,
        },
        needs="request",
    ),
    Case(
        "GET",
        "/v1/signing-requests/{request_id}/psbt.bin",
        lambda w, c: f"/v1/signing-requests/{c['request']}/psbt.bin",
        _visible(200),
        needs="request",
    ),
    Case(
        "POST",
        "/v1/signing-requests/{request_id}/signatures",
        lambda w, c: f"/v1/signing-requests/{c['request']}/signatures",
        # Past the rules, an unsigned PSBT is refused for carrying no new signature.
        _act(("miner", "arbiter", "bank_operator", "bank_approver"), 422),
        body=lambda w, c: {"psbt": c["psbt"]},
        needs="request",
    ),
    Case(
        "POST",
        "/v1/signing-requests/{request_id}/broadcast",
        lambda w, c: f"/v1/signing-requests/{c['request']}/broadcast",
        _act(("bank_operator", "bank_approver"), 409),  # not ready yet
        needs="request",
    ),
    Case(
        "POST",
        "/v1/signing-requests/{request_id}/cancel",
        lambda w, c: f"/v1/signing-requests/{c['request']}/cancel",
        _act(("bank_operator",), 200),
        needs="request",
    ),
    Case(
        "POST",
        "/v1/signing-requests/{request_id}/bump",
        lambda w, c: f"/v1/signing-requests/{c['request']}/bump",
        _act(("bank_operator",), 409),  # only a broadcast request is bumped
        body=lambda w, c: {"fee_rate_sat_vb": "5"},
        needs="request",
    ),
    Case(
        "POST",
        "/v1/signing-requests/{request_id}/approve",
        lambda w, c: f"/v1/signing-requests/{c['request']}/approve",
        # This loan's bank key is an xpub: the approval is recorded, the bank's device signs.
        _act(("bank_approver",), 200),
        needs="request",
    ),
    Case(
        "POST",
        "/v1/prices",
        lambda w, c: "/v1/prices",
        {"bank_operator": 201, "bank_approver": 201},
        body=lambda w, c: {"price_rub_per_btc": "6000000.5"},
    ),
    Case(
        "GET",
        "/v1/prices/latest",
        lambda w, c: "/v1/prices/latest",
        {"bank_operator": 200, "bank_approver": 200, "auditor": 200, "admin": 200},
        needs="price",
    ),
    # The history says who proposed and who confirmed: staff and auditors only.
    Case(
        "GET",
        "/v1/prices",
        lambda w, c: "/v1/prices",
        {"bank_operator": 200, "bank_approver": 200, "auditor": 200, "admin": 200},
        needs="price",
    ),
    Case(
        "GET",
        "/v1/prices/{price_id}",
        lambda w, c: f"/v1/prices/{c['price']}",
        {"bank_operator": 200, "bank_approver": 200, "auditor": 200, "admin": 200},
        needs="proposal",
    ),
    Case(
        "POST",
        "/v1/prices/{price_id}/confirm",
        lambda w, c: f"/v1/prices/{c['price']}/confirm",
        # The bank operator proposed it: 4-eyes, a second person confirms.
        {"bank_operator": 409, "bank_approver": 200},
        needs="proposal",
    ),
    Case(
        "POST",
        "/v1/prices/{price_id}/reject",
        lambda w, c: f"/v1/prices/{c['price']}/reject",
        {"bank_operator": 200, "bank_approver": 200},
        needs="proposal",
    ),
    Case(
        "POST",
        "/v1/parties/{party_id}/webhooks",
        lambda w, c: f"/v1/parties/{w.party_ids['miner']}/webhooks",
        {
            "admin": 201,
            "miner": 201,
            "bank_operator": 404,
            "bank_approver": 404,
            "auditor": 404,
            "compliance_officer": 404,
            "other_miner": 404,
            "arbiter": 404,
            "other_arbiter": 404,
        },
        body=lambda w, c: {"url": f"https://hooks.example/{c['n']}", "secret": "s" * 40},
    ),
    # AML screening: compliance officers and auditors read the decisions; only a compliance
    # officer resolves one; compliance officers and the admin keep the bank's lists.
    Case(
        "GET",
        "/v1/screening-decisions",
        lambda w, c: "/v1/screening-decisions?result=review",
        {"compliance_officer": 200, "auditor": 200},
    ),
    Case(
        "GET",
        "/v1/screening-decisions.csv",
        lambda w, c: "/v1/screening-decisions.csv",
        {"compliance_officer": 200, "auditor": 200},
    ),
    Case(
        "GET",
        "/v1/screening-decisions/{decision_id}",
        lambda w, c: f"/v1/screening-decisions/{c['screening']}",
        {"compliance_officer": 200, "auditor": 200},
        needs="screening",
    ),
    Case(
        "POST",
        "/v1/screening-decisions/{decision_id}/resolution",
        lambda w, c: f"/v1/screening-decisions/{c['screening']}/resolution",
        {"compliance_officer": 200},
        body=lambda w, c: {"outcome": "clear", "reason": "source of funds documented"},
        needs="screening",
    ),
    Case(
        "GET",
        "/v1/screening-lists",
        lambda w, c: "/v1/screening-lists",
        {"compliance_officer": 200, "auditor": 200, "admin": 200},
    ),
    Case(
        "POST",
        "/v1/screening-lists",
        lambda w, c: "/v1/screening-lists",
        {"compliance_officer": 201, "admin": 201},
        body=lambda w, c: {
            "kind": "txid",
            "value": f"{c['n']:064x}",
            "action": "review",
            "note": "a test entry",
        },
    ),
    Case(
        "POST",
        "/v1/screening-lists/{entry_id}/removal",
        lambda w, c: f"/v1/screening-lists/{c['entry']}/removal",
        {"compliance_officer": 200, "admin": 200},
        body=lambda w, c: {"reason": "listed in error"},
        needs="list_entry",
    ),
    Case(
        "GET",
        "/v1/parties/{party_id}/webhooks",
        lambda w, c: f"/v1/parties/{w.party_ids['miner']}/webhooks",
        {
            "admin": 200,
            "miner": 200,
            "bank_operator": 404,
            "bank_approver": 404,
            "auditor": 404,
            "compliance_officer": 404,
            "other_miner": 404,
            "arbiter": 404,
            "other_arbiter": 404,
        },
    ),
    # Issue 15's reports: auditors and compliance officers only, whoever's loan it is.
    Case(
        "GET",
        "/v1/reports/collateral-register.csv",
        lambda w, c: "/v1/reports/collateral-register.csv",
        {"auditor": 200, "compliance_officer": 200},
    ),
    Case(
        "GET",
        "/v1/reports/collateral-register.xlsx",
        lambda w, c: "/v1/reports/collateral-register.xlsx",
        {"auditor": 200, "compliance_officer": 200},
    ),
    Case(
        "GET",
        "/v1/loans/{loan_id}/statement.pdf",
        lambda w, c: f"/v1/loans/{c['ready']}/statement.pdf",
        {"auditor": 200, "compliance_officer": 200},
    ),
]


def _miner_record_party(ok_staff: int, own: int) -> dict[str, int]:
    """A miner's compliance record: the miner itself and staff; other parties get 404."""
    return {
        "admin": ok_staff,
        "bank_operator": ok_staff,
        "bank_approver": ok_staff,
        "auditor": ok_staff,
        "compliance_officer": ok_staff,
        "miner": own,
        "other_miner": 404,
        "arbiter": 404,
        "other_arbiter": 404,
    }


def _record_digest(w: World) -> str:
    digest: str = w.call("admin", "GET", f"/v1/parties/{w.party_ids['miner']}/miner-record").json()[
        "digest"
    ]
    return digest


_PDF = ("application/pdf", b"%PDF-1.4 register extract")
CASES += [
    Case(
        "GET",
        "/v1/parties/{party_id}/miner-record",
        lambda w, c: f"/v1/parties/{w.party_ids['miner']}/miner-record",
        _miner_record_party(200, 200),
    ),
    Case(
        "PUT",
        "/v1/parties/{party_id}/miner-record",
        lambda w, c: f"/v1/parties/{w.party_ids['miner']}/miner-record",
        # The same values as the world's approved record: nothing changes, nothing voided.
        {
            **_miner_record_party(403, 403),
            "admin": 200,
            "bank_operator": 200,
            "compliance_officer": 200,
        },
        body=lambda w, c: CLEAN_RECORD,
    ),
    Case(
        "POST",
        "/v1/parties/{party_id}/miner-record/reviews",
        lambda w, c: f"/v1/parties/{w.party_ids['miner']}/miner-record/reviews",
        # Only a compliance officer reviews; the world's officer approved this content already.
        {**_miner_record_party(403, 403), "compliance_officer": 409},
        body=lambda w, c: {"decision": "approve", "reason": "ok", "digest": _record_digest(w)},
    ),
    # Documents on the other miner's party: a new document voids its record's approval,
    # and the loans here are the first miner's.
    Case(
        "POST",
        "/v1/parties/{party_id}/documents",
        lambda w, c: f"/v1/parties/{w.party_ids['other_miner']}/documents?kind=register_extract",
        {
            "admin": 201,
            "bank_operator": 201,
            "compliance_officer": 201,
            "other_miner": 201,
            "miner": 404,
            "arbiter": 404,
            "other_arbiter": 404,
        },
        raw=_PDF,
    ),
    Case(
        "GET",
        "/v1/parties/{party_id}/documents",
        lambda w, c: f"/v1/parties/{w.party_ids['other_miner']}/documents",
        {**_miner_record_party(200, 404), "other_miner": 200},
    ),
    Case(
        "GET",
        "/v1/parties/{party_id}/documents/{document_id}",
        lambda w, c: f"/v1/parties/{w.party_ids['other_miner']}/documents/{c['document']}",
        {**_miner_record_party(200, 404), "other_miner": 200},
        needs="document",
    ),
    Case(
        "GET",
        "/v1/compliance/mining-bans",
        lambda w, c: "/v1/compliance/mining-bans",
        {
            "admin": 200,
            "bank_operator": 200,
            "bank_approver": 200,
            "auditor": 200,
            "compliance_officer": 200,
        },
    ),
    Case(
        "POST",
        "/v1/compliance/mining-bans",
        lambda w, c: "/v1/compliance/mining-bans",
        {"admin": 201, "compliance_officer": 201},
        # Adygea from 2040: no loan or record of this world is flagged by it.
        body=lambda w, c: {"region": "01", "starts_on": "2040-01-01", "note": f"t{c['n']}"},
    ),
    Case(
        "DELETE",
        "/v1/compliance/mining-bans/{ban_id}",
        lambda w, c: f"/v1/compliance/mining-bans/{c['ban']}",
        {"admin": 204, "compliance_officer": 204},
        needs="ban",
    ),
]


def _expected(case: Case, who: str) -> int:
    if who in case.expect:
        return case.expect[who]
    return 401 if who == ANON else 403


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('authz') / 'db.sqlite'}"
    else:
        server = request.getfixturevalue("postgres_server")
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        url = server.create_database(f"authz_{worker}")
    engine = make_engine(url)
    upgrade(engine)
    return offline_world(engine)


@pytest.fixture(scope="module")
def ready_loan(world: World) -> int:
    loan_id: int = world.funded_ready_loan()["id"]
    return loan_id


@pytest.fixture(scope="module")
def hsm_loan(world: World) -> int:
    """A loan whose bank key the (recording) bank's signer made, on two signatures."""
    loan_id = keyed_draft(world)
    world.hsm_bank_key(loan_id)
    return loan_id


_counter = iter(range(1, 10**6))


@pytest.mark.parametrize("who", EVERYONE)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c.method} {c.path.__code__.co_consts}"[:60]
)
def test_endpoint_role_matrix(
    world: World, ready_loan: int, hsm_loan: int, case: Case, who: str
) -> None:
    ctx: dict[str, Any] = {"ready": ready_loan, "hsm": hsm_loan, "n": next(_counter)}
    if case.needs == "draft":
        ctx["draft"] = world.create_loan()["id"]
    if case.needs == "keyed":
        ctx["keyed"] = keyed_draft(world)
    if case.needs == "statement":
        r = world.call("bank_operator", "POST", f"/v1/loans/{keyed_draft(world)}/keys/bank/hsm")
        assert r.status_code == 201, r.text
        ctx["statement"], ctx["statement_body"] = r.json()["id"], r.json()["statement"]
    if case.needs == "principal":
        r = world.call(
            "admin", "POST", "/v1/principals", json={"name": f"t-{ctx['n']}", "role": "auditor"}
        )
        assert r.status_code == 201, r.text
        ctx["principal"] = r.json()["id"]
    if case.needs in ("price", "proposal"):
        r = world.call("bank_operator", "POST", "/v1/prices", json={"price_rub_per_btc": "6000000"})
        assert r.status_code == 201, r.text
        ctx["price"] = r.json()["id"]
    if case.needs == "price":
        r = world.call("bank_approver", "POST", f"/v1/prices/{ctx['price']}/confirm")
        assert r.status_code == 200, r.text
    if case.needs == "screening":
        ctx["screening"] = _review_decision(world, ready_loan, ctx["n"])
    if case.needs == "list_entry":
        r = world.call(
            "compliance_officer",
            "POST",
            "/v1/screening-lists",
            json={
                "kind": "outpoint",
                "value": f"{ctx['n']:064x}:1",
                "action": "block",
                "note": "t",
            },
        )
        assert r.status_code == 201, r.text
        ctx["entry"] = r.json()["id"]
    if case.needs in ("funded", "request"):
        ctx["funded"] = funded_loan(world)
    if case.needs == "request":
        r = world.call(
            "bank_operator",
            "POST",
            f"/v1/loans/{ctx['funded']}/signing-requests",
            json={"action": "release"},
        )
        assert r.status_code == 201, r.text
        ctx["request"] = r.json()["id"]
        ctx["psbt"] = world.call(
            "bank_operator", "GET", f"/v1/signing-requests/{ctx['request']}/psbt"
        ).json()["psbt"]
    if case.needs == "document":
        r = world.client.post(
            f"/v1/parties/{world.party_ids['other_miner']}/documents",
            content=b"%PDF-1.4 charter",
            headers={**world.h("bank_operator"), "Content-Type": "application/pdf"},
        )
        assert r.status_code == 201, r.text
        ctx["document"] = r.json()["id"]
    if case.needs == "ban":
        r = world.call(
            "admin",
            "POST",
            "/v1/compliance/mining-bans",
            json={"region": "01", "starts_on": "2040-01-01"},
        )
        assert r.status_code == 201, r.text
        ctx["ban"] = r.json()["id"]
    body = case.body(world, ctx) if case.body else None
    if case.raw is not None:
        headers = {**world.h(None if who == ANON else who), "Content-Type": case.raw[0]}
        r = world.client.request(
            case.method, case.path(world, ctx), content=case.raw[1], headers=headers
        )
    else:
        r = world.call(None if who == ANON else who, case.method, case.path(world, ctx), json=body)
    assert r.status_code == _expected(case, who), (who, case.method, case.route, r.text)
    if r.status_code >= 400:
        assert r.json()["error"] and r.json()["message"]


def _review_decision(world: World, loan_id: int, n: int) -> int:
    """A payout address's screening waiting for a compliance officer (as the providers
    would leave it: the offline world has no watcher)."""
    with transaction(world.engine) as session:
        row = ScreeningDecision(
            subject="payout",
            loan_id=loan_id,
            address=f"bcrt1qtest{n}",
            purpose="miner_return",
            status=ScreeningStatus.review,
            result="review",
            score=60,
            reasons='["on the review list"]',
        )
        session.add(row)
        session.flush()
        assert row.id is not None
        return row.id


def test_matrix_covers_every_route(world: World) -> None:
    paths = world.client.get("/v1/openapi.json").json()["paths"]
    routes = {(method.upper(), path) for path, ops in paths.items() for method in ops}
    covered = {(c.method, c.route) for c in CASES}
    assert routes == covered, routes ^ covered


def test_listings_are_scoped_to_the_callers_loans(world: World, ready_loan: int) -> None:
    mine = {loan["id"] for loan in world.call("miner", "GET", "/v1/loans").json()}
    theirs = {loan["id"] for loan in world.call("other_miner", "GET", "/v1/loans").json()}
    everyone = {loan["id"] for loan in world.call("auditor", "GET", "/v1/loans").json()}
    assert ready_loan in mine and ready_loan in everyone
    assert not theirs & mine
    assert {loan["id"] for loan in world.call("other_arbiter", "GET", "/v1/loans").json()} == set()
    parties = world.call("miner", "GET", "/v1/parties").json()
    assert [p["id"] for p in parties] == [world.party_ids["miner"]]


def test_garbage_credentials_are_refused(world: World) -> None:
    for header in ("Bearer", "Bearer nope", "Basic abc", "pc_" + "a" * 43):
        r = world.client.get("/v1/loans", headers={"Authorization": header})
        assert r.status_code == 401 and r.json()["error"] == "not_authenticated"


def _other_bank_operator(world: World) -> dict[str, str]:
    """An operator of another bank: bank staff, but not of this loan's bank."""
    from custody.auth.service import create_principal
    from custody.db.models import Party, PartyKind, Role
    from custody.db.session import transaction

    with transaction(world.engine) as session:
        party = Party(name=f"party-other-bank-{next(_counter)}", kind=PartyKind.bank)
        session.add(party)
        session.flush()
        _, key = create_principal(
            session,
            name=f"user-other-bank-{party.id}",
            role=Role.bank_operator,
            party_id=party.id,
            actor="test",
        )
    return {"Authorization": f"Bearer {key}"}


def test_a_signer_statement_is_hidden_from_the_parties_and_other_banks(world: World) -> None:
    """The loan's own miner and arbiter, other parties and another bank's operator can
    neither read nor sign the loan's statement, and learn nothing from trying: the answer
    is the one a statement that does not exist gets."""
    from support.world import audit_actions

    signer: RecordingSigner = world.client.app.state.signer.transport
    calls = len(signer.calls)
    loan_id = keyed_draft(world)
    r = world.call("bank_operator", "POST", f"/v1/loans/{loan_id}/keys/bank/hsm")
    assert r.status_code == 201, r.text
    sid, statement = r.json()["id"], r.json()["statement"]
    missing = sid + 10_000
    signature = world.staff["operator"].endorse(statement)
    outsiders = {who: world.h(who) for who in ("miner", "arbiter", "other_miner", "other_arbiter")}
    outsiders["another bank's operator"] = _other_bank_operator(world)
    for who, headers in outsiders.items():
        for target in (sid, missing):
            read = world.client.get(f"/v1/signer-statements/{target}", headers=headers)
            sent = world.client.post(
                f"/v1/signer-statements/{target}/endorsements", json=signature, headers=headers
            )
            for answer in (read, sent):
                assert answer.status_code == 404, (who, target, answer.text)
                assert answer.json()["error"] == "signer_statement_not_found", (who, answer.text)
                assert answer.json()["message"] == "signer statement not found"
    view = world.call("bank_operator", "GET", f"/v1/signer-statements/{sid}").json()
    assert view["state"] == "open" and view["signed_by"] == []
    assert "signer.statement_signed" not in audit_actions(world.engine, loan_id=loan_id)
    # The loan's own bank staff can: the same signature is kept.
    kept = world.call(
        "bank_approver", "POST", f"/v1/signer-statements/{sid}/endorsements", json=signature
    )
    assert kept.status_code == 200 and kept.json()["signed_by"] == ["olga.operator"], kept.text
    assert kept.json()["state"] == "open" and len(signer.calls) == calls  # one is not two
