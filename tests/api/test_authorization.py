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
            "other_miner": 404,
            "arbiter": 404,
            "other_arbiter": 404,
        },
        body=lambda w, c: {"url": f"https://hooks.example/{c['n']}", "secret": "s" * 40},
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
            "other_miner": 404,
            "arbiter": 404,
            "other_arbiter": 404,
        },
    ),
]


def _expected(case: Case, who: str) -> int:
    if who in case.expect:
        return case.expect[who]
    return 401 if who == ANON else 403


class _RecordingHsm:
    """The matrix checks who may ask for a key, not the HSM (tested against SoftHSM2
    elsewhere); a fresh random public key per call is all it needs."""

    def generate_loan_key(self, loan_ref: str, **terms: str) -> Any:
        import os

        from embit.ec import PrivateKey

        class Evidence:
            label = loan_ref
            public_key = PrivateKey(os.urandom(32)).get_public_key().sec()
            local = True
            never_extractable = True

        return Evidence()


class _Chain:
    """Real transactions paying the loan's addresses, served as a node would: the
    matrix checks who may do what, the lifecycle tests use a real btcd."""

    def __init__(self) -> None:
        self.txs: dict[str, bytes] = {}

    def pay(self, script_pubkey: bytes, amount: int) -> str:
        from embit.script import Script
        from embit.transaction import Transaction, TransactionInput, TransactionOutput

        tx = Transaction(
            vin=[TransactionInput(os.urandom(32), 0)],
            vout=[TransactionOutput(amount, Script(script_pubkey))],
        )
        txid: str = tx.txid().hex()
        self.txs[txid] = tx.serialize()
        return txid

    def get_raw_transaction(self, txid: str, block_hash: str | None = None) -> bytes:
        return self.txs[txid]

    def estimate_fee_rate_sat_vb(self, conf_target: int) -> float | None:
        return None

    def test_mempool_accept(self, tx_hex: str, max_fee_rate_btc_kvb: float = 0.1) -> dict[str, Any]:
        return {"allowed": True}

    def send_raw_transaction(self, tx_hex: str) -> str:
        return "00" * 32


def _funded_loan(world: World) -> int:
    """An active loan with one confirmed deposit, recorded as the watcher would."""
    from sqlmodel import Session, select

    from custody.db.models import CollateralAddress, Deposit, DepositState, Loan, LoanState

    loan_id: int = world.funded_ready_loan()["id"]
    chain: _Chain = world.client.app.state.chain  # type: ignore[attr-defined]
    with Session(world.engine) as s:
        addr = s.exec(select(CollateralAddress).where(CollateralAddress.loan_id == loan_id)).one()
        txid = chain.pay(bytes.fromhex(addr.script_pubkey_hex), 50_000_000)
        s.add(
            Deposit(
                loan_id=loan_id,
                address_id=addr.id or 0,
                txid=txid,
                vout=0,
                amount_sats=50_000_000,
                state=DepositState.confirmed,
                block_height=1,
                block_hash="00" * 32,
                required_confirmations=1,
            )
        )
        loan = s.get(Loan, loan_id)
        assert loan is not None
        loan.state = LoanState.active
        s.add(loan)
        s.commit()
    return loan_id


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
    return build_world(engine, hsm=_RecordingHsm(), chain=_Chain())


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
    if case.needs == "price":
        r = world.call("bank_operator", "POST", "/v1/prices", json={"price_rub_per_btc": "6000000"})
        assert r.status_code == 201, r.text
    if case.needs in ("funded", "request"):
        ctx["funded"] = _funded_loan(world)
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
