"""Loans, keys and addresses through the HTTP API, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select
from support.world import World, build_world, hd_key

from custody.db.models import AuditEvent, CollateralAddress, Loan, LoanKey


@pytest.fixture
def world(engine: Engine) -> World:
    return build_world(engine)


def _counts(engine: Engine) -> tuple[int, int, int, int]:
    with Session(engine) as s:
        return (
            s.exec(select(func.count()).select_from(Loan)).one(),
            s.exec(select(func.count()).select_from(LoanKey)).one(),
            s.exec(select(func.count()).select_from(CollateralAddress)).one(),
            s.exec(select(func.count()).select_from(AuditEvent)).one(),
        )


def test_three_hd_keys_make_a_collateral_address(world: World) -> None:
    loan = world.create_loan()
    assert loan["state"] == "draft" and loan["descriptor"] is None
    assert world.register(loan["id"], "miner").status_code == 200
    assert world.register(loan["id"], "bank").status_code == 200
    r = world.register(loan["id"], "arbiter")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "awaiting_deposit"
    assert body["descriptor"].startswith("wsh(sortedmulti(2,[")
    assert "/<0;1>/*" in body["descriptor"] and "#" in body["descriptor"]
    assert body["collateral_address"].startswith("bcrt1q")
    assert [k["role"] for k in body["keys"]] == ["miner", "bank", "arbiter"]

    # Addresses are handed out in order, each new, and listed.
    a1 = world.call("miner", "POST", f"/v1/loans/{loan['id']}/addresses").json()
    a2 = world.call("bank_operator", "POST", f"/v1/loans/{loan['id']}/addresses").json()
    assert (a1["index"], a2["index"]) == (1, 2)
    listed = world.call("miner", "GET", f"/v1/loans/{loan['id']}/addresses").json()
    assert [a["address"] for a in listed] == [
        body["collateral_address"],
        a1["address"],
        a2["address"],
    ]
    assert len({a["address"] for a in listed}) == 3


def test_addresses_are_never_shared_across_loans(world: World) -> None:
    seen: set[str] = set()
    for _ in range(3):
        loan = world.funded_ready_loan()
        for _ in range(3):
            world.call("miner", "POST", f"/v1/loans/{loan['id']}/addresses")
        for a in world.call("miner", "GET", f"/v1/loans/{loan['id']}/addresses").json():
            assert a["address"] not in seen
            seen.add(a["address"])
    assert len(seen) == 12


def test_target_ltv_computes_required_collateral(world: World) -> None:
    # 1,500,000.00 RUB at 6,000,000 RUB/BTC and 60% LTV -> 0.41666667 BTC, rounded up.
    loan = world.create_loan(
        principal_kopecks=1_500_000_00,
        required_collateral_sats=None,
        target_ltv_bps=6_000,
        price_rub_per_btc="6000000",
        price_source="manual:test",
    )
    assert loan["terms"]["required_collateral_sats"] == 41_666_667
    assert loan["terms"]["price_rub_per_btc"] == "6000000"


def test_the_same_key_twice_in_a_loan_is_refused(world: World) -> None:
    loan = world.create_loan()
    key = hd_key()
    assert world.register(loan["id"], "miner", key).status_code == 200
    before = _counts(world.engine)
    r = world.register(loan["id"], "bank", key)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "key" and "already the loan's miner key" in r.json()["message"]
    assert _counts(world.engine) == before


def test_the_same_key_set_as_another_loan_is_refused(world: World) -> None:
    keys = {"miner": hd_key(), "bank": hd_key(), "arbiter": hd_key()}
    first = world.create_loan()
    for seat, key in keys.items():
        assert world.register(first["id"], seat, key).status_code == 200
    second = world.create_loan()
    assert world.register(second["id"], "miner", keys["miner"]).status_code == 200
    assert world.register(second["id"], "bank", keys["bank"]).status_code == 200
    before = _counts(world.engine)
    r = world.register(second["id"], "arbiter", keys["arbiter"])
    assert r.status_code == 409, r.text
    assert "key set" in r.json()["message"] and r.json()["field"] == "key"
    assert r.json()["error"] == "key_set_reused"
    assert _counts(world.engine) == before
    assert world.call("miner", "GET", f"/v1/loans/{second['id']}").json()["state"] == "draft"


def test_a_seat_cannot_be_registered_twice(world: World) -> None:
    loan = world.create_loan()
    assert world.register(loan["id"], "miner").status_code == 200
    r = world.register(loan["id"], "miner")
    assert r.status_code == 409 and "already registered" in r.json()["message"]
    assert r.json()["error"] == "key_seat_taken"


def test_keys_after_completion_are_refused(world: World) -> None:
    loan = world.funded_ready_loan()
    r = world.register(loan["id"], "miner")
    assert r.status_code == 409 and "draft" in r.json()["message"]
    assert r.json()["error"] == "loan_not_in_state"


BAD_TERMS: list[tuple[dict[str, Any], str]] = [
    ({"principal_kopecks": 0}, "terms.principal_kopecks"),
    ({"principal_kopecks": 1.5}, "terms.principal_kopecks"),
    ({"principal_kopecks": "100"}, "terms.principal_kopecks"),
    ({"required_collateral_sats": -1}, "terms.required_collateral_sats"),
    ({"required_collateral_sats": 21_000_000 * 10**8 + 1}, "terms.required_collateral_sats"),
    ({"maturity_at": "2020-01-01T00:00:00+00:00"}, "terms.maturity_at"),
    ({"maturity_at": "2030-01-01T00:00:00"}, "terms.maturity_at"),  # no time zone
    ({"margin_call_ltv_bps": 9_500}, "terms.margin_call_ltv_bps"),
    ({"liquidation_ltv_bps": 10_001}, "terms.liquidation_ltv_bps"),
    (
        {"miner_return_address": "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4"},
        "terms.miner_return_address",
    ),
    ({"miner_return_address": "not an address"}, "terms.miner_return_address"),
    (
        {"bank_liquidation_address": "tb1qw508d6qejxtdg4y5r3zarvary0c5xw7kxpjzsx"},
        "terms.bank_liquidation_address",
    ),
    (
        {"bank_liquidation_address": "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"},
        "terms.bank_liquidation_address",
    ),  # same as the miner's return address
    ({"target_ltv_bps": 6_000}, "terms.required_collateral_sats"),  # both given
    ({"required_collateral_sats": None, "target_ltv_bps": 6_000}, "terms.price_rub_per_btc"),
    ({"surprise": 1}, "terms.surprise"),
]


@pytest.mark.parametrize(("override", "field"), BAD_TERMS)
def test_bad_terms_are_refused_naming_the_field(
    world: World, override: dict[str, Any], field: str
) -> None:
    before = _counts(world.engine)
    r = world.call("bank_operator", "POST", "/v1/loans", json=world.loan_body(**override))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field, r.json()
    assert r.json()["message"]
    assert _counts(world.engine) == before


def test_unknown_parties_are_refused(world: World) -> None:
    body = world.loan_body()
    body["miner_party_id"] = world.party_ids["arbiter"]
    r = world.call("bank_operator", "POST", "/v1/loans", json=body)
    assert r.status_code == 422 and r.json()["field"] == "miner_party_id"
    body["miner_party_id"] = 999_999
    r = world.call("bank_operator", "POST", "/v1/loans", json=body)
    assert r.status_code == 422 and r.json()["field"] == "miner_party_id"


BAD_KEYS: list[tuple[dict[str, Any], str]] = [
    ({"kind": "hd", "key": ""}, "key"),
    ({"kind": "hd", "key": "xpub-not-a-key"}, "key"),
    (
        {
            "kind": "hd",
            "key": "tprv8ZgxMBicQKsPd7Uf69XL1XwhmjHopUGep8GuEiJDZmbQz6o58LninorQAfcKZWARbtRtfnLcJ5MQ2AtHcQJCCRUcMRvmDUjyEmNUWwx8UbK",  # noqa: E501
        },
        "key",
    ),
    ({"kind": "hd", "key": "Ünïcode"}, "key"),
    ({"kind": "hsm", "public_key": "02" + "00" * 32}, "kind"),  # miners use HD keys
    ({"kind": "nfc", "key": "x"}, "kind"),
    ({"key": "x"}, "kind"),
    ({"kind": "hd"}, "key"),
    ({"kind": "hd", "key": 5}, "key"),
]


@pytest.mark.parametrize(("body", "field"), BAD_KEYS)
def test_bad_keys_are_refused_naming_the_field(
    world: World, body: dict[str, Any], field: str
) -> None:
    loan = world.create_loan()
    before = _counts(world.engine)
    r = world.call("miner", "PUT", f"/v1/loans/{loan['id']}/keys/miner", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field, r.json()
    assert _counts(world.engine) == before


def test_mainnet_key_on_regtest_is_refused(world: World) -> None:
    loan = world.create_loan()
    mainnet = hd_key(network_coin=0)
    r = world.register(loan["id"], "miner", mainnet)
    assert r.status_code == 422 and r.json()["field"] == "key"


def test_bank_hsm_public_key_is_accepted_and_bad_ones_refused(world: World) -> None:
    loan = world.create_loan()
    bad = world.call(
        "bank_operator",
        "PUT",
        f"/v1/loans/{loan['id']}/keys/bank",
        json={"kind": "hsm", "public_key": "04" + "11" * 64},
    )
    assert bad.status_code == 422 and bad.json()["field"] == "public_key"
    good_pub = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
    r = world.call(
        "bank_operator",
        "PUT",
        f"/v1/loans/{loan['id']}/keys/bank",
        json={"kind": "hsm", "public_key": good_pub},
    )
    assert r.status_code == 200, r.text
    assert r.json()["keys"][0]["public_key"] == good_pub


def test_exports(world: World) -> None:
    loan = world.funded_ready_loan()
    lid = loan["id"]
    d = world.call("miner", "GET", f"/v1/loans/{lid}/export/descriptor")
    assert d.status_code == 200 and d.json()["descriptor"] == loan["descriptor"]
    cc = world.call("miner", "GET", f"/v1/loans/{lid}/export/coldcard")
    assert cc.status_code == 200 and "Policy: 2 of 3" in cc.text
    bsms = world.call("arbiter", "GET", f"/v1/loans/{lid}/export/bsms")
    assert bsms.status_code == 200 and bsms.text.startswith("BSMS 1.0")
    assert loan["collateral_address"] in bsms.text
    cv = world.call("bank_operator", "GET", f"/v1/loans/{lid}/export/caravan")
    assert cv.status_code == 200 and cv.json()["quorum"]["requiredSigners"] == 2
    assert world.call("miner", "GET", f"/v1/loans/{lid}/export/pdf").status_code == 422
    draft = world.create_loan()
    r = world.call("miner", "GET", f"/v1/loans/{draft['id']}/export/descriptor")
    assert r.status_code == 409 and r.json()["error"] == "keys_incomplete"


def test_exports_say_plainly_when_a_format_cannot_hold_an_hsm_key(world: World) -> None:
    loan = world.create_loan()
    world.register(loan["id"], "miner")
    world.call(
        "bank_operator",
        "PUT",
        f"/v1/loans/{loan['id']}/keys/bank",
        json={
            "kind": "hsm",
            "public_key": "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798",
        },
    )
    world.register(loan["id"], "arbiter")
    for fmt in ("coldcard", "caravan", "wallet-policy", "sparrow"):
        r = world.call("miner", "GET", f"/v1/loans/{loan['id']}/export/{fmt}")
        assert r.status_code == 422 and r.json()["error"] == "export_unsupported", r.text
        assert "Trezor via HWI, Bitcoin Core or BDK only" in r.json()["message"]
    ok = world.call("miner", "GET", f"/v1/loans/{loan['id']}/export/descriptor")
    assert ok.status_code == 200
    assert ok.json()["works_with"] == ["Trezor via HWI", "Bitcoin Core", "BDK"]
    bsms = world.call("arbiter", "GET", f"/v1/loans/{loan['id']}/export/bsms")
    assert bsms.status_code == 200 and len(bsms.text.split("\n")) == 4
    assert bsms.headers["X-Works-With"] == "Trezor via HWI; Bitcoin Core; BDK"
    assert "Do not use Coldcard, Ledger" in bsms.headers["X-Export-Note"]


def test_exports_serve_a_wallet_policy_and_a_sparrow_file(world: World) -> None:
    loan = world.keyed_loan()
    lid = loan["id"]
    policy = world.call("bank_operator", "GET", f"/v1/loans/{lid}/export/wallet-policy")
    assert policy.status_code == 200, policy.text
    body = policy.json()
    assert body["descriptor_template"] == "wsh(sortedmulti(2,@0/**,@1/**,@2/**))"
    assert body["name"] == f"loan-{lid}" and len(body["keys_info"]) == 3
    assert body["first_address"] == loan["collateral_address"]
    assert policy.headers["X-Works-With"].startswith("Ledger Bitcoin app 2.1+")
    sparrow = world.call("miner", "GET", f"/v1/loans/{lid}/export/sparrow")
    assert sparrow.status_code == 200, sparrow.text
    assert sparrow.headers["Content-Disposition"] == (
        f'attachment; filename="loan-{lid}-sparrow.txt"'
    )
    descriptor = [line for line in sparrow.text.splitlines() if not line.startswith("#")]
    assert len(descriptor) == 1 and descriptor[0].startswith("wsh(sortedmulti(2,[")
    assert loan["collateral_address"] in sparrow.text


def test_audit_chain_records_the_loan_and_verifies(world: World) -> None:
    loan = world.funded_ready_loan()
    with Session(world.engine) as s:
        actions = s.exec(select(AuditEvent.action).where(AuditEvent.loan_id == loan["id"])).all()
    assert actions == [
        "loan.created",
        "key.registered",
        "key.registered",
        "key.registered",
        "loan.state_changed",
        "address.issued",
    ]
    r = world.call("auditor", "GET", "/v1/audit/verify")
    assert r.status_code == 200 and r.json()["ok"] is True and r.json()["events"] > 6


def test_no_secret_or_hash_in_principal_responses(world: World) -> None:
    r = world.call(
        "admin", "POST", "/v1/principals", json={"name": "new-auditor", "role": "auditor"}
    )
    assert r.status_code == 201
    key = r.json()["api_key"]
    me = world.client.get("/v1/me", headers={"Authorization": f"Bearer {key}"}).json()
    assert me["role"] == "auditor" and "api_key" not in me and "key_hash" not in me
    assert key not in str(me)
