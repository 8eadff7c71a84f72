"""The error catalogue: every error has a stable code of its own and an HTTP status, and
the service raises named errors, not bare categories a client cannot tell apart."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import custody
import custody.errors
import hsm
import pledge
from pledge.errors import (
    Conflict,
    ContentTooLarge,
    CustodyError,
    Forbidden,
    InvalidInput,
    NotAuthenticated,
    NotFound,
    Unsupported,
    UpstreamUnavailable,
)

ROOT = Path(__file__).resolve().parents[2]
CATEGORIES = (
    CustodyError,
    InvalidInput,
    NotAuthenticated,
    Forbidden,
    NotFound,
    Conflict,
    Unsupported,
    ContentTooLarge,
    UpstreamUnavailable,
)
# Every named error has a code of its own: no exceptions.
INHERITS_A_CATEGORY_CODE: set[str] = set()
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _subclasses(cls: type[CustodyError]) -> Iterator[type[CustodyError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def all_errors() -> list[type[CustodyError]]:
    """Every error class of the kernel, the signer and the service (all modules imported)."""
    for package in (pledge, hsm, custody):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if ".migrations" not in module.name:
                importlib.import_module(module.name)
    return sorted({CustodyError, *_subclasses(CustodyError)}, key=_name)


def _code_owner(cls: type[CustodyError]) -> type:
    return next(c for c in cls.__mro__ if "code" in c.__dict__)


@pytest.mark.unit
def test_every_error_has_a_snake_case_code_and_an_error_status() -> None:
    errors = all_errors()
    assert len(errors) > 60  # the catalogue, the signer's and the kernel's
    bad = [
        f"{_name(e)}: {e.code!r} {e.status_code!r}"
        for e in errors
        if not SNAKE.match(e.code)
        or not (isinstance(e.status_code, int) and 400 <= e.status_code < 600)
    ]
    assert not bad, bad


@pytest.mark.unit
def test_no_two_errors_declare_the_same_code() -> None:
    owners: dict[str, list[str]] = {}
    for error in all_errors():
        if "code" in error.__dict__:
            owners.setdefault(error.code, []).append(_name(error))
    assert {code: names for code, names in owners.items() if len(names) > 1} == {}


@pytest.mark.unit
def test_an_error_without_a_code_of_its_own_refines_a_named_error() -> None:
    """A subclass may share its parent's code (it is the same error, told apart inside the
    service, like the node's RPC errors), but never a bare category's: `conflict` or
    `not_found` tells a client nothing."""
    bare = [
        f"{_name(e)} answers {e.code!r} (from {_code_owner(e).__name__})"
        for e in all_errors()
        if _code_owner(e) in CATEGORIES
        and e not in CATEGORIES
        and _name(e) not in INHERITS_A_CATEGORY_CODE
    ]
    assert not bare, bare


@pytest.mark.unit
def test_every_catalogued_error_says_when_it_happens() -> None:
    catalogue = [
        v
        for v in vars(custody.errors).values()
        if isinstance(v, type) and issubclass(v, CustodyError) and v.__module__ == "custody.errors"
    ]
    assert len(catalogue) > 40
    for error in catalogue:
        assert "code" in error.__dict__, error
        assert error.__doc__ and error.__doc__.strip(), error
        assert issubclass(error, CATEGORIES[1:]), f"{error} is in no category"


def _bare_category_calls(path: Path, root: Path = ROOT) -> list[str]:
    """Every construction of a bare category (raised or not: `hidden = NotFound(...)`)."""
    names = {"CustodyError", "Conflict", "NotFound", "Forbidden", "UpstreamUnavailable"}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        f"{path.relative_to(root)}:{node.lineno} {node.func.id}(...)"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names
    ]


@pytest.mark.unit
def test_the_service_raises_named_errors_not_bare_categories() -> None:
    found = [
        hit
        for path in sorted((ROOT / "custody").rglob("*.py"))
        for hit in _bare_category_calls(path)
    ]
    assert not found, "name what happened (custody/errors.py):\n" + "\n".join(found)


@pytest.mark.unit
def test_the_scan_sees_a_bare_conflict(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    err = NotFound('x')\n    raise Conflict('no')\n")
    assert _bare_category_calls(sample, tmp_path) == [
        "sample.py:2 NotFound(...)",
        "sample.py:3 Conflict(...)",
    ]


@pytest.mark.unit
def test_the_answer_carries_the_code_the_field_and_the_signers_rule() -> None:
    from custody.errors import KeySetReused, RequestRefusedBySigner
    from hsm.signer import PolicyViolation

    assert KeySetReused("this key set is already used by another loan", field="key").to_dict() == {
        "error": "key_set_reused",
        "message": "this key set is already used by another loan",
        "field": "key",
    }
    refused = PolicyViolation("foreign_output", "pays an unknown address").to_dict()
    assert refused["error"] == "refused_by_signer" and refused["check"] == "foreign_output"
    kept = RequestRefusedBySigner(
        "foreign_output",
        "pays an unknown address",
        message="refused (foreign_output)",
        request_id=7,
    ).to_dict()
    assert kept == {
        "error": "request_refused_by_signer",
        "message": "refused (foreign_output)",
        "field": "psbt",
        "check": "foreign_output",
        "request_id": 7,
    }
    assert isinstance(RequestRefusedBySigner("c", "r", message="m", request_id=1), PolicyViolation)
