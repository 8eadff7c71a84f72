"""Each route declares its errors in the OpenAPI document (GET /v1/openapi.json), and the
test client holds the routes to it (`support.declared.CheckedClient`)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import create_engine
from support.declared import CheckedClient, MisshapenError, UndeclaredError, declared_codes

from custody.api.app import create_app
from custody.api.errors import errors_for
from custody.config import Settings
from custody.errors import LoanNotFound, RequestAlreadyOpen
from pledge.errors import Conflict, InvalidInput


def _app() -> FastAPI:
    return create_app(
        Settings(network="regtest", database_url="sqlite://"), create_engine("sqlite://")
    )


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    with CheckedClient(_app()) as client:
        r = client.get("/v1/openapi.json")
    assert r.status_code == 200
    doc: dict[str, Any] = r.json()
    return doc


def _codes(doc: dict[str, Any], method: str, path: str) -> dict[int, set[str]]:
    responses = doc["paths"][path][method]["responses"]
    return {
        int(status): set(
            response["content"]["application/json"]["schema"]["properties"]["error"]["enum"]
        )
        for status, response in responses.items()
        if status[0] in "45"
    }


@pytest.mark.unit
def test_reading_a_loan_answers_exactly_these_errors(document: dict[str, Any]) -> None:
    assert _codes(document, "get", "/v1/loans/{loan_id}") == {
        401: {"not_authenticated"},
        404: {"loan_not_found"},
        422: {"invalid_input"},
        500: {"internal_error"},
        503: {"busy"},
    }


@pytest.mark.unit
def test_creating_a_signing_request_names_each_of_its_conflicts(document: dict[str, Any]) -> None:
    codes = _codes(document, "post", "/v1/loans/{loan_id}/signing-requests")
    assert codes[409] == {
        "address_already_issued",
        "address_limit_reached",
        "collateral_below_fee",
        "collateral_changed",
        "fee_above_cap",
        "full_liquidation_needed",
        "keys_incomplete",
        "loan_not_in_state",
        "no_confirmed_collateral",
        "nothing_to_sell",
        "payout_address_blocked",
        "payout_address_under_review",
        "priced_by_signer",
        "request_already_open",
        "single_address_descriptor",
    }
    assert codes[422] == {
        "invalid_input",
        "fee_rate_out_of_range",
        "refused_by_signer",
        "request_refused_by_signer",
    }
    assert codes[503] == {
        "busy",
        "node_not_configured",
        "node_unavailable",
        "signer_not_configured",
        "signer_unavailable",
    }
    assert codes[404] == {"loan_not_found"} and codes[403] == {"role_not_allowed"}
    assert (codes[400], codes[413], codes[415]) == (
        {"malformed_body"},
        {"body_too_large"},
        {"unsupported_content_type"},
    )
    schema = document["paths"]["/v1/loans/{loan_id}/signing-requests"]["post"]["responses"]["422"][
        "content"
    ]["application/json"]["schema"]
    assert {"check", "request_id", "errors", "field"} <= set(schema["properties"])


@pytest.mark.unit
def test_registering_a_key_and_approving_name_their_conflicts(document: dict[str, Any]) -> None:
    key = _codes(document, "put", "/v1/loans/{loan_id}/keys/{seat}")
    assert key[409] == {
        "address_already_issued",
        "compliance_pending",
        "key_of_another_party",
        "key_seat_taken",
        "key_set_reused",
        "loan_not_in_state",
    }
    assert key[422] == {"invalid_input", "hd_key_required", "key_in_two_seats"}
    assert key[403] == {"seat_not_yours"}
    approve = _codes(document, "post", "/v1/signing-requests/{request_id}/approve")
    assert approve[409] == {
        "approve_via_signer_statement",
        "bank_does_not_sign",
        "self_approval",
        "signing_request_not_in_state",
    }


@pytest.mark.unit
def test_the_description_says_when_each_code_happens(document: dict[str, Any]) -> None:
    text = document["paths"]["/v1/loans/{loan_id}/signing-requests"]["post"]["responses"]["409"][
        "description"
    ]
    assert "- `request_already_open`: The loan already has an open signing request" in text
    assert text.count("\n- `") == 14  # one line per code


BODY_ERRORS = {400: {"malformed_body"}, 413: {"body_too_large"}, 415: {"unsupported_content_type"}}


def _error_schemas(op: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        status: response["content"]["application/json"]["schema"]
        for status, response in op["responses"].items()
        if status[0] in "45"
    }


@pytest.mark.unit
def test_every_route_declares_its_errors(document: dict[str, Any]) -> None:
    """Walks every operation of the document: each declares its errors, in the one error
    shape; every route but the health check and its metrics needs a key; every route with
    a parameter or a body can be refused by validation (`invalid_input`, not FastAPI's
    default schema), and one with a body for its format and size; a thing looked up by
    its id may not exist; any route may fail (500) or be at capacity (503 `busy`)."""
    assert "HTTPValidationError" not in document.get("components", {}).get("schemas", {})
    seen = 0
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            seen += 1
            where = (method, path)
            schemas = _error_schemas(op)
            assert schemas, where
            for status, schema in schemas.items():
                assert schema["type"] == "object", (where, status)
                assert {"error", "message", "field"} <= set(schema["required"]), (where, status)
                assert schema["properties"]["error"]["enum"], (where, status)
                assert (
                    schema["properties"]["message"] == {"type": "string"}
                    or schema["properties"]["message"]["type"] == "string"
                ), (where, status)
                assert "null" in str(schema["properties"]["field"]["type"]), (where, status)
            codes = _codes(document, method, path)
            assert "internal_error" in codes[500] and "busy" in codes[503], where
            if path in ("/v1/health", "/v1/metrics"):
                assert codes.keys() == {500, 503}, where
                continue
            assert codes[401] == {"not_authenticated"}, where
            if "{" in path or method in ("post", "put"):
                assert "invalid_input" in codes[422], where
            if "_id}" in path:
                assert 404 in codes, where
            if "requestBody" in op:
                for body_status, body_codes in BODY_ERRORS.items():
                    assert body_codes <= codes.get(body_status, set()), (where, body_status)
    assert seen >= 35


@pytest.mark.unit
def test_every_route_of_the_app_is_in_the_document(document: dict[str, Any]) -> None:
    """Nothing is served that the document hides (a fuzzer or a generated client would
    never call it), and every route that reads a body says which."""
    from fastapi.routing import APIRoute, iter_route_contexts

    contexts = [
        c for c in iter_route_contexts(_app().routes) if isinstance(c.original_route, APIRoute)
    ]
    # The console's pages (custody.console, under /console) are HTML for a browser, not
    # the API: tests/console drives them; everything else must be in the document.
    served = {
        (method.lower(), c.path)
        for c in contexts
        for method in c.methods or ()
        if not (c.path or "").startswith("/console/")
    }
    assert len(served) >= 35
    documented = {(m, p) for p, ops in document["paths"].items() for m in ops}
    assert served == documented
    # FastAPI describes the bodies it parses; the signature upload reads its own.
    parsed = {(m.lower(), c.path) for c in contexts if c.body_field for m in c.methods or ()}
    upload = ("post", "/v1/signing-requests/{request_id}/signatures")
    document_upload = ("post", "/v1/parties/{party_id}/documents")  # raw bytes (issue 15)
    takes_a_body = {
        (m, p)
        for p, ops in document["paths"].items()
        for m, op in ops.items()
        if "requestBody" in op
    }
    assert upload not in parsed and takes_a_body == parsed | {upload, document_upload}


@pytest.mark.unit
def test_the_signature_upload_documents_both_of_its_formats(document: dict[str, Any]) -> None:
    op = document["paths"]["/v1/signing-requests/{request_id}/signatures"]["post"]
    content = op["requestBody"]["content"]
    assert op["requestBody"]["required"] is True
    assert content["application/octet-stream"]["schema"] == {"type": "string", "format": "binary"}
    json_body = content["application/json"]["schema"]
    assert json_body["required"] == ["psbt"] and json_body["properties"]["psbt"]["type"] == "string"


@pytest.mark.unit
def test_two_errors_with_one_code_cannot_be_declared() -> None:
    class Twin(Conflict):
        code = "request_already_open"

    with pytest.raises(ValueError, match="declared twice"):
        errors_for(RequestAlreadyOpen, Twin)
    # 500 internal_error and 503 busy: what any route may answer
    assert errors_for(LoanNotFound, LoanNotFound).keys() == {404, 500, 503}


def _app_with_probe() -> FastAPI:
    """The real app (its error handlers) with one more route, which declares only
    `loan_not_found` (and validation) and answers what it is asked to."""
    app = _app()

    def probe(what: str) -> dict[str, str]:
        if what == "loan":
            raise LoanNotFound("loan 1 not found")
        if what == "open":
            raise RequestAlreadyOpen("loan 1 already has an open signing request")
        return {"ok": what}

    app.add_api_route(
        "/v1/probe/{what}", probe, methods=["GET"], responses=errors_for(LoanNotFound, InvalidInput)
    )
    return app


@pytest.mark.unit
def test_the_client_fails_a_test_on_an_undeclared_code() -> None:
    client = CheckedClient(_app_with_probe(), raise_server_exceptions=False)
    assert client.get("/v1/probe/fine").status_code == 200
    assert client.get("/v1/probe/loan").json()["error"] == "loan_not_found"  # declared
    with pytest.raises(UndeclaredError, match="declares no 409"):
        client.get("/v1/probe/open")
    assert declared_codes(client.app, "GET", "/v1/probe/{what}") == {
        404: frozenset({"loan_not_found"}),
        422: frozenset({"invalid_input"}),
        500: frozenset({"internal_error"}),
        503: frozenset({"busy"}),
    }


@pytest.mark.unit
def test_the_client_fails_a_test_on_an_undeclared_code_of_a_declared_status() -> None:
    client = CheckedClient(_app(), raise_server_exceptions=False)
    # /v1/me declares 401 not_authenticated only: any other 401 code would be refused.
    assert client.get("/v1/me").status_code == 401  # declared: passes
    app = _app()

    def other(n: int) -> None:
        raise RequestAlreadyOpen("busy")

    app.add_api_route("/v1/other/{n}", other, methods=["POST"], responses=errors_for(Conflict))
    with pytest.raises(UndeclaredError, match=r"declares only \['conflict'\]"):
        CheckedClient(app, raise_server_exceptions=False).post("/v1/other/1")


@pytest.mark.unit
def test_an_unknown_path_is_the_routers_not_a_route_answer() -> None:
    client = CheckedClient(_app(), raise_server_exceptions=False)
    assert client.get("/v1/no-such-thing").status_code == 404
    assert client.delete("/v1/loans/1").status_code == 405


@pytest.mark.unit
def test_the_client_fails_a_test_on_an_error_of_another_shape() -> None:
    from fastapi.responses import JSONResponse, PlainTextResponse

    app = _app()

    def detail() -> JSONResponse:
        return JSONResponse({"detail": "the framework's default"}, status_code=409)

    def text() -> PlainTextResponse:
        return PlainTextResponse("Content Too Large", status_code=413)

    app.add_api_route("/v1/detail", detail, methods=["GET"], responses=errors_for(Conflict))
    app.add_api_route("/v1/text", text, methods=["GET"], responses=errors_for(Conflict))
    client = CheckedClient(app, raise_server_exceptions=False)
    for path in ("/v1/detail", "/v1/text"):
        with pytest.raises(MisshapenError, match=r"is not \{error, message, field\}"):
            client.get(path)
