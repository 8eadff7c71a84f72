"""Every endpoint x every role. A miner never sees or acts on another miner's loan;
an arbiter only on loans it arbitrates; nobody without a key gets anything but health.

Runs on SQLite (the rules are in Python, not in the database); the loan tests run
on both databases."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from support.world import WHO, World, build_world, hd_key

from custody.db.migrate import upgrade
from custody.db.session import make_engine

ANON = "anonymous"
EVERYONE = (*WHO, ANON)


@dataclass
class Case:
    method: str
    route: str  # the route template, to check coverage
    path: Callable[[World, dict[str, Any]], str]
    expect: dict[str, int]  # who -> status; missing = 403 for authenticated, 401 for anonymous
    body: Callable[[World, dict[str, Any]], Any] | None = None
    needs: str = "ready"  # which fixture loan: "ready" (all keys) or "draft" (fresh per call)


def _visible(ok: int) -> dict[str, int]:
    """Readable by staff and the loan's own miner and arbiter; 404 for other parties."""
    return {
        "admin": ok,
        "bank_operator": ok,
        "bank_approver": ok,
        "auditor": ok,
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
        lambda w, c: f"/v1/loans/{c['draft']}/keys/bank/hsm",
        _act(("bank_operator",), 201),
        needs="draft",
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
]


def _expected(case: Case, who: str) -> int:
    if who in case.expect:
        return case.expect[who]
    return 401 if who == ANON else 403


class _RecordingHsm:
    """The matrix checks who may ask for a key, not the HSM (tested against SoftHSM2
    elsewhere); a fresh random public key per call is all it needs."""

    def generate_loan_key(self, loan_ref: str) -> Any:
        import os

        from embit.ec import PrivateKey

        class Evidence:
            label = loan_ref
            public_key = PrivateKey(os.urandom(32)).get_public_key().sec()
            local = True
            never_extractable = True

        return Evidence()


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
    return build_world(engine, hsm=_RecordingHsm())


@pytest.fixture(scope="module")
def ready_loan(world: World) -> int:
    loan_id: int = world.funded_ready_loan()["id"]
    return loan_id


_counter = iter(range(1, 10**6))


@pytest.mark.parametrize("who", EVERYONE)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c.method} {c.path.__code__.co_consts}"[:60]
)
def test_endpoint_role_matrix(world: World, ready_loan: int, case: Case, who: str) -> None:
    ctx: dict[str, Any] = {"ready": ready_loan, "n": next(_counter)}
    if case.needs == "draft":
        ctx["draft"] = world.create_loan()["id"]
    body = case.body(world, ctx) if case.body else None
    r = world.call(None if who == ANON else who, case.method, case.path(world, ctx), json=body)
    assert r.status_code == _expected(case, who), (who, case.method, case.route, r.text)
    if r.status_code >= 400:
        assert r.json()["error"] and r.json()["message"]


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
