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

from custody.errors import (
    BodyTooLarge,
    MalformedBody,
    RequestRefusedBySigner,
    ServiceBusy,
    UnsupportedContentType,
)
from hsm.signer import PolicyViolation
from pledge.errors import CustodyError, InvalidInput

ErrorClass = type[CustodyError]

# What reading a route's body may meet: not JSON, another Content-Type, too large.
BODY_ERRORS: tuple[ErrorClass, ...] = (MalformedBody, UnsupportedContentType, BodyTooLarge)

_NULLABLE_STRING: dict[str, Any] = {"type": ["string", "null"]}


def media_type(content_type: str | None) -> str | None:
    """`application/json; charset=utf-8` -> `application/json` (`+json` types count as
    JSON, as FastAPI reads them); None without a header."""
    if not content_type:
        return None
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind.startswith("application/") and kind.endswith("+json"):
        return "application/json"
    return kind


def require_media_type(content_type: str | None, *accepted: str) -> str:
    """The body's media type if the route reads it, else `UnsupportedContentType` (415)."""
    kind = media_type(content_type)
    if kind is not None and kind in accepted:
        return kind
    raise UnsupportedContentType(f"this route reads only {' or '.join(accepted)} bodies")


def summary(error: ErrorClass) -> str:
    """When it happens: the first paragraph of its docstring, on one line."""
    doc = (error.__doc__ or "").strip().split("\n\n", 1)[0]
    return " ".join(doc.split()) or error.__name__


def _schema(status: int, errors: list[ErrorClass]) -> dict[str, Any]:
    codes = sorted({e.code for e in errors})
    properties: dict[str, Any] = {
        "error": {"type": "string", "enum": codes, "description": "what happened"},
        "message": {"type": "string", "description": "the same, for a person"},
        "field": {
            **_NULLABLE_STRING,
            "description": "the request field that is wrong (null: none in particular)",
        },
    }
    if InvalidInput in errors:  # the request's own validation lists every bad field
        properties["errors"] = {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": _NULLABLE_STRING, "message": {"type": "string"}},
                "required": ["field", "message"],
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
        "required": ["error", "message", "field"],
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
                "required": ["error", "message", "field"],
                "properties": {
                    "error": {"type": "string", "enum": ["internal_error"]},
                    "message": {"type": "string"},
                    "field": {"type": "null"},
                },
            }
        }
    },
}


def errors_for(*errors: ErrorClass) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` declaring these errors, grouped by HTTP status, and what any
    route may answer: `busy` (503, no database connection in time) and `internal_error`
    (500). Two classes with one code would make the answer ambiguous: refused."""
    by_status: dict[int, list[ErrorClass]] = {}
    every: tuple[ErrorClass, ...] = (*errors, ServiceBusy)
    for error in dict.fromkeys(every):  # groups may overlap: each class once
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


def error_body(error: CustodyError) -> dict[str, Any]:
    """The one shape of every error answer: `error`, `message`, `field` (null when no one
    field is wrong), then what a few errors add (`check`, `request_id`, `errors`)."""
    extra = error.to_dict()
    return {
        "error": extra.pop("error"),
        "message": extra.pop("message"),
        "field": extra.pop("field", None),
        **extra,
    }
