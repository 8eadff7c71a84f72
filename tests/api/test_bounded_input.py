"""Bounded input (issue 12), on SQLite and PostgreSQL: every request the issue found answering
500, stored as sent on one backend, or read whole before its key was checked, answered as
the service's own error, the same on both databases, and nothing in the database changed.

The requests are the issue's own: `GET /v1/loans/2147483648` (a 32-bit id column on
PostgreSQL), ids and offsets >= 2^63, ids beyond range in bodies, NUL bytes and blank names,
`GET /v1/parties/-1/webhooks`, bodies larger than a route reads, bodies without a key. The
same limits against a real `custody serve` (uvicorn, httptools) are in test_server_limits.py.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel
from support.world import World, build_world, hd_key

from custody.api.limits import JSON_BODY_LIMIT, UPLOAD_BODY_LIMIT
from custody.db.migrate import upgrade
from custody.db.models import Party
from custody.db.session import make_engine
from custody.schemas import ID_MAX

BEYOND_32 = 2**31  # the issue's GET /v1/loans/2147483648: a failed query on int4 columns
BEYOND_64 = 2**63  # SQLite's INTEGER and PostgreSQL's BIGINT end at 2^63 - 1
MISSING = 999_999  # an id nobody has, inside every range


class _NoNode:
    """Routes that reach the node depend on it being configured; none of these requests may
    get as far as asking it anything."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the node was asked {name!r} for a request that names nothing")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('bounded') / 'db.sqlite'}"
    else:
        server = request.getfixturevalue("postgres_server")
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        url = server.create_database(f"bounded_{worker}")
    engine = make_engine(url)
    upgrade(engine)
    return build_world(engine, chain=_NoNode())


@pytest.fixture(scope="module")
def loan_id(world: World) -> int:
    loan: dict[str, Any] = world.create_loan()
    return int(loan["id"])


def counts(engine: Engine) -> dict[str, int]:
    """Rows per table, every table."""
    with Session(engine) as session:
        return {
            table.name: int(session.execute(select(func.count()).select_from(table)).scalar_one())
            for table in SQLModel.metadata.sorted_tables
        }


@pytest.fixture
def unchanged(world: World) -> Iterator[None]:
    """The test's requests are all refused: no row anywhere is added or removed."""
    before = counts(world.engine)
    yield
    assert counts(world.engine) == before


# -- path ids --------------------------------------------------------------------------------

# A body each route accepts, so that an id nobody has gets as far as the lookup.
_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("put", "/v1/loans/{loan_id}/keys/{seat}"): {"kind": "hd", "key": hd_key()},
    ("post", "/v1/loans/{loan_id}/signing-requests"): {"action": "release"},
    ("post", "/v1/loans/{loan_id}/repayments"): {
        "amount_kopecks": 100,
        "paid_at": datetime.now(UTC).isoformat(),
    },
    ("post", "/v1/signing-requests/{request_id}/bump"): {"fee_rate_sat_vb": "5"},
    ("post", "/v1/signing-requests/{request_id}/signatures"): {"psbt": "cHNidP8="},
    ("post", "/v1/signer-statements/{statement_id}/endorsements"): {
        "person": "olga.operator",
        "signature": "AAAA",
    },
    ("post", "/v1/parties/{party_id}/webhooks"): {
        "url": "https://hooks.example.com/custody",
        "secret": "s" * 32,
    },
    ("put", "/v1/parties/{party_id}/miner-record"): {
        "legal_form": "individual",
        "inn": "500100732259",
        "region": "50",
        "monthly_energy_kwh": 1000,
    },
    ("post", "/v1/parties/{party_id}/miner-record/reviews"): {
        "decision": "approve",
        "reason": "checked",
        "digest": "0" * 64,
    },
}
_ID_PARAM = re.compile(r"\{(loan_id|request_id|statement_id|party_id|document_id|ban_id)\}")
# Who asks: the first of them to whom an id nobody has is not found.
_CALLERS = ("admin", "bank_operator", "miner", "arbiter", "bank_approver", "auditor")


def _routes_with_an_id() -> list[tuple[str, str]]:
    from custody.api.app import create_app
    from custody.config import Settings

    app = create_app(
        Settings(network="regtest", database_url="sqlite://"), make_engine("sqlite://")
    )
    return sorted(
        (method, path)
        for path, operations in app.openapi()["paths"].items()
        if _ID_PARAM.search(path)
        for method in operations
    )


ROUTES_WITH_AN_ID = _routes_with_an_id()


def _call(world: World, who: str, method: str, template: str, the_id: str) -> Any:
    path = _ID_PARAM.sub(the_id, template).replace("{seat}", "miner").replace("{fmt}", "descriptor")
    body = _BODIES.get((method, template))
    return (
        world.call(who, method.upper(), path, json=body)
        if body
        else world.call(who, method.upper(), path)
    )


def test_every_route_with_an_id_is_covered() -> None:
    assert len(ROUTES_WITH_AN_ID) >= 20, ROUTES_WITH_AN_ID
    assert ("get", "/v1/loans/{loan_id}") in ROUTES_WITH_AN_ID
    assert ("get", "/v1/parties/{party_id}/webhooks") in ROUTES_WITH_AN_ID


@pytest.mark.parametrize(("method", "template"), ROUTES_WITH_AN_ID)
def test_an_id_beyond_any_column_is_the_same_404_as_one_nobody_has(
    world: World, method: str, template: str, unchanged: None
) -> None:
    """2^31 and 2^63 - 1 are looked up (64-bit columns on both databases); from 2^63 on,
    and for a number longer than pydantic parses, no query is made: the route's 404."""
    for who in _CALLERS:
        missing = _call(world, who, method, template, str(MISSING))
        if missing.status_code == 404:
            break
    else:
        pytest.fail(f"{method} {template}: an id nobody has is found by nobody? {missing.text}")
    expected = missing.json()
    for the_id in (
        BEYOND_32,
        ID_MAX,
        BEYOND_64,
        -(2**63) - 1,
        10**30,
        -1,
        "0" * 30 + "7" * 19,  # still in range: leading zeros
        "9" * 5000,  # beyond what an integer parser takes
    ):
        answer = _call(world, who, method, template, str(the_id))
        assert answer.status_code == 404, (who, the_id, answer.text)
        body = answer.json()
        shown = str(the_id).lstrip("0") if isinstance(the_id, str) else str(the_id)
        assert body == {**expected, "message": expected["message"].replace(str(MISSING), shown)}


def test_the_issue_s_loan_2147483648_is_not_found(world: World, unchanged: None) -> None:
    for the_id in (BEYOND_32, BEYOND_64):
        r = world.call("admin", "GET", f"/v1/loans/{the_id}")
        assert r.status_code == 404, r.text
        assert r.json() == {"error": "loan_not_found", "message": "loan not found", "field": None}


def test_a_path_id_that_is_no_integer_is_invalid_input(world: World, unchanged: None) -> None:
    for bad in ("abc", "1e3", "1.5"):
        r = world.call("admin", "GET", f"/v1/loans/{bad}")
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "invalid_input" and r.json()["field"] == "loan_id"


def test_ids_beyond_2_to_the_31_are_numbered_and_found_on_both_databases(engine: Engine) -> None:
    """The next id after 2^31 is handed out, stored and found, in a table and in the
    columns that refer to it (a PostgreSQL serial's sequence stopped at 2^31 - 1 too)."""
    own = build_world(engine)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(
                text("SELECT setval(pg_get_serial_sequence('party', 'id'), :n)"), {"n": BEYOND_32}
            )
        else:  # SQLite numbers a new row one past the largest rowid
            conn.execute(
                text(
                    "INSERT INTO party (id, name, kind, created_at)"
                    " VALUES (:n, 'at 2^31', 'miner', :t)"
                ),
                {"n": BEYOND_32, "t": datetime.now(UTC)},
            )
    r = own.call("admin", "POST", "/v1/parties", json={"name": "beyond 2^31", "kind": "miner"})
    assert r.status_code == 201, r.text
    party_id = r.json()["id"]
    assert party_id == BEYOND_32 + 1
    got = own.call("admin", "GET", f"/v1/parties/{party_id}")
    assert got.status_code == 200 and got.json()["name"] == "beyond 2^31", got.text
    principal = own.call(
        "admin",
        "POST",
        "/v1/principals",
        json={"name": "user beyond 2^31", "role": "miner", "party_id": party_id},
    )
    assert principal.status_code == 201, principal.text
    assert principal.json()["party_id"] == party_id


def test_every_id_column_is_64_bit(world: World) -> None:
    """PostgreSQL: BIGINT columns and sequences. SQLite: INTEGER, 64-bit already, and an
    INTEGER PRIMARY KEY stays the rowid alias that numbers new rows (BIGINT would not be)."""
    ids = {
        (table.name, column.name)
        for table in SQLModel.metadata.sorted_tables
        for column in table.columns
        if column.type.python_type is int
        and (column.name == "id" or column.name.endswith("_id") or column.name == "created_by")
    }
    with world.engine.connect() as conn:
        if world.engine.dialect.name == "postgresql":
            types = dict(
                ((t, c), d)
                for t, c, d in conn.execute(
                    text(
                        "SELECT table_name, column_name, data_type FROM information_schema.columns"
                        " WHERE table_schema = 'public'"
                    )
                ).all()
            )
            sequences = conn.execute(
                text("SELECT sequencename, data_type FROM pg_sequences WHERE schemaname = 'public'")
            ).all()
            assert {key: types[key] for key in ids} == dict.fromkeys(ids, "bigint")
            assert len(sequences) >= 15, sequences
            assert {d for _, d in sequences} == {"bigint"}, sequences
        else:
            types = {
                (table, row[1]): row[2]
                for table in {t for t, _ in ids}
                for row in conn.execute(text(f"PRAGMA table_info({table})")).all()
            }
            assert {key: types[key] for key in ids} == dict.fromkeys(ids, "INTEGER")


# -- query bounds ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (f"offset={BEYOND_64}", "offset"),
        ("offset=-1", "offset"),
        (f"offset={10**30}", "offset"),
        (f"limit={BEYOND_64}", "limit"),
        ("limit=-1", "limit"),
        ("limit=0", "limit"),
    ],
)
def test_a_query_bound_beyond_its_range_names_the_field(
    world: World, query: str, field: str, unchanged: None
) -> None:
    r = world.call("bank_operator", "GET", f"/v1/loans?{query}")
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_input" and r.json()["field"] == field


def test_the_largest_offset_is_an_empty_page(world: World, unchanged: None) -> None:
    r = world.call("bank_operator", "GET", f"/v1/loans?offset={ID_MAX}")
    assert r.status_code == 200 and r.json() == [], r.text


# -- ids in bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["miner_party_id", "arbiter_party_id"])
@pytest.mark.parametrize("value", [BEYOND_64, 10**30, 0, -1])
def test_a_loan_naming_a_party_id_beyond_range_names_the_field(
    world: World, field: str, value: int, unchanged: None
) -> None:
    body = world.loan_body()
    body[field] = value
    r = world.call("bank_operator", "POST", "/v1/loans", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_input" and r.json()["field"] == field


@pytest.mark.parametrize("field", ["miner_party_id", "arbiter_party_id"])
def test_a_loan_naming_a_party_nobody_has_is_an_unknown_party(
    world: World, field: str, unchanged: None
) -> None:
    """In range (2^31 included, on PostgreSQL too) but not a party: the domain's own 422."""
    for value in (BEYOND_32, ID_MAX):
        body = world.loan_body()
        body[field] = value
        r = world.call("bank_operator", "POST", "/v1/loans", json=body)
        assert r.status_code == 422, r.text
        assert r.json() == {
            "error": "unknown_party",
            "message": f"party {value} does not exist",
            "field": field,
        }


def test_a_principal_of_a_party_beyond_range_names_the_field(world: World, unchanged: None) -> None:
    for value, error in ((BEYOND_64, "invalid_input"), (BEYOND_32, "unknown_party")):
        r = world.call(
            "admin",
            "POST",
            "/v1/principals",
            json={"name": f"p{value}", "role": "miner", "party_id": value},
        )
        assert r.status_code == 422, r.text
        assert (r.json()["error"], r.json()["field"]) == (error, "party_id")


# -- text ------------------------------------------------------------------------------------

_REFUSED_TEXT = (
    "nul\x00inside",
    "   ",
    "",
    "line\nbreak",
    "tab\tinside",
    "\x7f",
    "c1\x85inside",
    "\u2028",
)


@pytest.mark.parametrize("value", _REFUSED_TEXT)
def test_a_party_name_with_a_control_character_or_blank_names_the_field(
    world: World, value: str, unchanged: None
) -> None:
    r = world.call("admin", "POST", "/v1/parties", json={"name": value, "kind": "miner"})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_input" and r.json()["field"] == "name"


def test_a_lone_surrogate_is_refused_not_a_failed_insert(world: World, unchanged: None) -> None:
    r = world.client.post(
        "/v1/parties",
        content=b'{"name": "x\\ud800", "kind": "miner"}',
        headers={**world.h("admin"), "content-type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "name"


def test_a_name_is_stored_trimmed(world: World) -> None:
    r = world.call(
        "admin", "POST", "/v1/parties", json={"name": "  Trimmed Ltd \t", "kind": "miner"}
    )
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "Trimmed Ltd"
    with Session(world.engine) as session:
        party = session.get(Party, r.json()["id"])
        assert party is not None and party.name == "Trimmed Ltd"


@pytest.mark.parametrize("value", ["nul\x00inside", "  ", "new\nline"])
def test_every_text_field_refuses_control_characters_and_blanks(
    world: World, loan_id: int, value: str, unchanged: None
) -> None:
    """Each body's text fields, through its route: the field named is the one that is wrong."""
    miner_party = world.party_ids["miner"]
    loan = world.loan_body
    cases: list[tuple[str, str, str, dict[str, Any], str]] = [
        ("admin", "POST", "/v1/principals", {"name": value, "role": "auditor"}, "name"),
        (
            "bank_operator",
            "POST",
            "/v1/loans",
            loan(price_source=value, price_rub_per_btc="1"),
            "terms.price_source",
        ),
        (
            "bank_operator",
            "POST",
            "/v1/loans",
            loan(miner_return_address=value),
            "terms.miner_return_address",
        ),
        (
            "bank_operator",
            "POST",
            "/v1/loans",
            loan(bank_liquidation_address=value),
            "terms.bank_liquidation_address",
        ),
        ("miner", "PUT", f"/v1/loans/{loan_id}/keys/miner", {"kind": "hd", "key": value}, "key"),
        (
            "bank_operator",
            "PUT",
            f"/v1/loans/{loan_id}/keys/bank",
            {"kind": "hsm", "public_key": value},
            "public_key",
        ),
        (
            "miner",
            "POST",
            f"/v1/parties/{miner_party}/webhooks",
            {"url": value, "secret": "s" * 32},
            "url",
        ),
        (
            "miner",
            "POST",
            f"/v1/parties/{miner_party}/webhooks",
            {
                "url": "https://h.example.com",
                "secret": value * 32 if value.isspace() else value + "s" * 32,
            },
            "secret",
        ),
        (
            "miner",
            "POST",
            f"/v1/parties/{miner_party}/webhooks",
            {"url": "https://h.example.com", "secret": "s" * 32, "events": [value]},
            "events",
        ),
        (
            "bank_operator",
            "POST",
            f"/v1/loans/{loan_id}/signing-requests",
            {"action": "liquidation", "price_source": value},
            "price_source",
        ),
        (
            "bank_operator",
            "POST",
            f"/v1/loans/{loan_id}/repayments",
            {"amount_kopecks": 1, "paid_at": datetime.now(UTC).isoformat(), "repayment_id": value},
            "repayment_id",
        ),
        (
            "bank_operator",
            "POST",
            "/v1/signer-people",
            {"name": value, "role": "bank_operator", "public_key": "a" * 64},
            "name",
        ),
    ]
    for who, method, path, body, field in cases:
        r = world.call(who, method, path, json=body)
        assert r.status_code == 422, (path, field, r.text)
        assert r.json()["error"] == "invalid_input", (path, field, r.text)
        assert r.json()["field"].startswith(field), (path, field, r.json())


def test_the_openapi_document_states_the_text_rule(world: World) -> None:
    """A client (or schemathesis) generating from the document sends what is accepted."""
    schema = world.client.app.openapi()["components"]["schemas"]["PartyCreate"]
    name = schema["properties"]["name"]
    assert name["maxLength"] == 120 and name["minLength"] == 1
    pattern = re.compile(name["pattern"])
    assert pattern.fullmatch(" Acme ") and not pattern.fullmatch("   ")
    assert not pattern.fullmatch("a\x00b") and not pattern.fullmatch("a\nb")


# -- webhooks of a party that does not exist ---------------------------------------------------


@pytest.mark.parametrize("party", ["-1", str(MISSING), str(BEYOND_64)])
def test_listing_webhooks_of_no_party_is_the_404_registering_one_is(
    world: World, party: str, unchanged: None
) -> None:
    listed = world.call("admin", "GET", f"/v1/parties/{party}/webhooks")
    registered = world.call(
        "admin",
        "POST",
        f"/v1/parties/{party}/webhooks",
        json={"url": "https://hooks.example.com/x", "secret": "s" * 32},
    )
    assert listed.status_code == registered.status_code == 404, (listed.text, registered.text)
    assert (
        listed.json()
        == registered.json()
        == {
            "error": "party_not_found",
            "message": "party not found",
            "field": None,
        }
    )


# -- body size and the key before the body -------------------------------------------------


def _padded_party(size: int, name: str) -> bytes:
    """A valid party body of exactly `size` bytes (JSON whitespace pads it)."""
    body = json.dumps({"name": name, "kind": "miner"}).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


@pytest.mark.parametrize("who", ["admin", None])
def test_a_json_body_over_its_limit_is_413_whoever_sends_it(
    world: World, who: str | None, unchanged: None
) -> None:
    r = world.client.post(
        "/v1/parties",
        content=_padded_party(JSON_BODY_LIMIT + 1, "too big"),
        headers={**world.h(who), "content-type": "application/json"},
    )
    assert r.status_code == 413, r.text
    assert r.json() == {
        "error": "body_too_large",
        "message": f"the request body is larger than this route accepts ({JSON_BODY_LIMIT} bytes)",
        "field": None,
    }


def test_a_json_body_at_its_limit_is_read(world: World) -> None:
    r = world.client.post(
        "/v1/parties",
        content=_padded_party(JSON_BODY_LIMIT, "just fits"),
        headers={**world.h("admin"), "content-type": "application/json"},
    )
    assert r.status_code == 201, r.text


def _chunks(total: int, sent: list[int], size: int = 16 * 1024) -> Iterator[bytes]:
    """A body with no Content-Length (chunked), counting what was taken from it."""
    while sent[0] < total:
        chunk = b" " * min(size, total - sent[0])
        sent[0] += len(chunk)
        yield chunk


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(
    world: World, unchanged: None
) -> None:
    sent = [0]
    r = world.client.post(
        "/v1/parties",
        content=_chunks(50 * JSON_BODY_LIMIT, sent),
        headers={**world.h("admin"), "content-type": "application/json"},
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "body_too_large"


@pytest.mark.parametrize("key", [None, "pc_not-a-key"])
def test_without_a_valid_key_the_body_is_not_read(
    world: World, key: str | None, unchanged: None
) -> None:
    """401 before the body: not even a broken one is parsed (it was 422 before)."""
    headers = {"content-type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    for path in ("/v1/parties", "/v1/loans", f"/v1/parties/{world.party_ids['miner']}/webhooks"):
        r = world.client.post(path, content=b'{"broken', headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"] == "not_authenticated"


def test_the_binary_psbt_upload_reads_a_few_megabytes_and_no_more(
    world: World, unchanged: None
) -> None:
    path = f"/v1/signing-requests/{MISSING}/signatures"
    headers = {**world.h("miner"), "content-type": "application/octet-stream"}
    fits = world.client.post(path, content=b"\x00" * UPLOAD_BODY_LIMIT, headers=headers)
    assert fits.status_code == 404, fits.text  # read whole, then the request is not found
    over = world.client.post(path, content=b"\x00" * (UPLOAD_BODY_LIMIT + 1), headers=headers)
    assert over.status_code == 413, over.text
    assert over.json()["error"] == "body_too_large"
    as_json = world.client.post(
        path,
        content=json.dumps({"psbt": "A" * (UPLOAD_BODY_LIMIT + 1)}).encode(),
        headers={**world.h("miner"), "content-type": "application/json"},
    )
    assert as_json.status_code == 413, as_json.text


def test_each_body_route_declares_its_413_and_no_other_route_does(world: World) -> None:
    doc = world.client.app.openapi()
    with_body = set()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            reads_a_body = "requestBody" in operation or path.endswith("/signatures")
            if reads_a_body:
                with_body.add((method, path))
                error = responses["413"]["content"]["application/json"]["schema"]
                assert error["properties"]["error"]["enum"] == ["body_too_large"], path
            else:
                assert "413" not in responses, (method, path)
    assert ("post", "/v1/signing-requests/{request_id}/signatures") in with_body
    assert len(with_body) >= 12, with_body


def test_the_openapi_document_publishes_the_id_bounds_exactly(world: World) -> None:
    """FastAPI's OpenAPI model keeps bounds as floats: 2^63 - 1 would read back as 2^63 (one
    id more than is accepted). Bounds a float holds exactly say precisely what is accepted,
    so a client generating the largest allowed id gets an answer, not a 422."""
    document = json.loads(json.dumps(world.client.app.openapi()))
    schemas = document["components"]["schemas"]
    for model, field in (
        ("LoanCreate", "miner_party_id"),
        ("LoanCreate", "arbiter_party_id"),
        ("PrincipalCreate", "party_id"),
    ):
        prop = schemas[model]["properties"][field]
        bounds = prop["anyOf"][0] if "anyOf" in prop else prop
        assert bounds["exclusiveMaximum"] == ID_MAX + 1 and bounds["exclusiveMinimum"] == 0
        assert int(bounds["exclusiveMaximum"]) - 1 == ID_MAX
    (offset,) = [
        p for p in document["paths"]["/v1/loans"]["get"]["parameters"] if p["name"] == "offset"
    ]
    assert offset["schema"]["exclusiveMaximum"] == ID_MAX + 1
