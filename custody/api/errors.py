"""The errors a route may answer, declared on the route for the OpenAPI document.

`errors_for(LoanNotFound, RequestAlreadyOpen, ...)` is a route's `responses=`: one entry
per HTTP status, whose JSON schema's `error` is an enum of exactly the codes the route
can answer with that status, and whose description says when each happens (the first
line of the error class's docstring). A client generated from the document knows every
code it must handle; `tests/support/declared.py` fails any test in which a route
answers a code its entry does not list.
"""

from __future__ import annotations

import copy
from typing import Any

from custody.errors import RequestRefusedBySigner
from hsm.signer import PolicyViolation
from pledge.errors import CustodyError, InvalidInput

ErrorClass = type[CustodyError]


def summary(error: ErrorClass) -> str:
    """When it happens: the first paragraph of its docstring, on one line."""
    doc = (error.__doc__ or "").strip().split("\n\n", 1)[0]
    return " ".join(doc.split()) or error.__name__


def _schema(status: int, errors: list[ErrorClass]) -> dict[str, Any]:
    codes = sorted({e.code for e in errors})
    properties: dict[str, Any] = {
        "error": {"type": "string", "enum": codes, "description": "what happened"},
        "message": {"type": "string", "description": "the same, for a person"},
        "field": {"type": "string", "description": "the request field that is wrong"},
    }
    if InvalidInput in errors:  # the request's own validation lists every bad field
        properties["errors"] = {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        }
    if any(issubclass(e, PolicyViolation) for e in errors):
        properties["check"] = {"type": "string", "description": "the signer's rule that refused"}
    if RequestRefusedBySigner in errors:
        properties["request_id"] = {
            "type": "integer",
            "description": "the refused request, kept cancelled",
        }
    return {
        "title": f"Error{status}",
        "type": "object",
        "required": ["error", "message"],
        "properties": properties,
    }


# What the app answers for an exception nobody meant to report (custody.api.app): the
# same body on every route, with nothing of the failure in it.
_INTERNAL: dict[str, Any] = {
    "description": "- `internal_error`: an unexpected failure; the answer says nothing "
    "more, the operator's log has the trace",
    "content": {
        "application/json": {
            "schema": {
                "title": "Error500",
                "type": "object",
                "required": ["error", "message"],
                "properties": {
                    "error": {"type": "string", "enum": ["internal_error"]},
                    "message": {"type": "string"},
                },
            }
        }
    },
}


def errors_for(*errors: ErrorClass) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` declaring these errors, grouped by HTTP status. Two classes
    with one code would make the answer ambiguous: refused."""
    by_status: dict[int, list[ErrorClass]] = {}
    for error in dict.fromkeys(errors):  # groups may overlap: each class once
        group = by_status.setdefault(error.status_code, [])
        if any(e.code == error.code for e in group):
            raise ValueError(f"{error.__name__}: code {error.code!r} is declared twice")
        group.append(error)
    responses: dict[int | str, dict[str, Any]] = {}
    for status in sorted(by_status):
        group = sorted(by_status[status], key=lambda e: e.code)
        responses[status] = {
            "description": "\n".join(f"- `{e.code}`: {summary(e)}" for e in group),
            "content": {"application/json": {"schema": _schema(status, group)}},
        }
    # Any route may fail unexpectedly (custody.api.app answers `internal_error`).
    internal = responses.setdefault(500, copy.deepcopy(_INTERNAL))
    if internal is not _INTERNAL and "internal_error" not in _enum(internal):
        _enum(internal).append("internal_error")
        _enum(internal).sort()
        internal["description"] += "\n" + _INTERNAL["description"]
    return responses


def _enum(response: dict[str, Any]) -> list[str]:
    enum: list[str] = response["content"]["application/json"]["schema"]["properties"]["error"][
        "enum"
    ]
    return enum
