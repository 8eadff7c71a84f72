"""The code boundary between the service and the bank's signer, checked on the source.

`hsm/` (the signer) must not run the service's code, and the kernel (`pledge/`) must run
neither: an edit in `custody/` must never change what the bank's key will sign; the miner's tool
(`pledge_hwi/`) runs neither the service's code nor the bank's signer. The check
reads every import statement (including ones inside functions) with `ast`, so a lazy
`from custody... import` inside a function body is caught too.
"""

from __future__ import annotations

import ast
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN: dict[str, frozenset[str]] = {
    "pledge": frozenset({"pledge_hwi", "custody", "hsm", "regtest", "bench", "tests"}),
    "hsm": frozenset({"custody", "pledge_hwi", "regtest", "bench", "tests"}),
    "pledge_hwi": frozenset({"custody", "hsm", "regtest", "bench", "tests"}),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.unit
@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_it_must_not(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no source files under {package}/"
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in files
        for line, name in _imports(path)
        if name.split(".")[0] in FORBIDDEN[package]
    ]
    assert not bad, "layer rule broken:\n" + "\n".join(bad)


@pytest.mark.unit
def test_the_check_sees_a_lazy_import(tmp_path: Path) -> None:
    """The scanner itself must find an import hidden in a function body."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from custody.loans import service\n    return service\n")
    assert _imports(sample) == [(2, "custody.loans")]


def _import_linter_contracts() -> list[dict[str, Any]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contracts: list[dict[str, Any]] = config["tool"]["importlinter"]["contracts"]
    return contracts


@pytest.mark.unit
@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_linter_checks_the_same_rule(package: str) -> None:
    """`make lint` (lint-imports) enforces this file's rules too, with indirect imports."""
    assert any(
        c["type"] == "forbidden"
        and c["source_modules"] == [package]
        and set(c["forbidden_modules"]) == FORBIDDEN[package]
        for c in _import_linter_contracts()
    ), f"no import-linter contract in pyproject.toml forbids {package} -> {FORBIDDEN[package]}"


@pytest.mark.unit
def test_the_api_contract_names_every_custody_module() -> None:
    """Only custody.api, custody.cli and the composition root (custody.root) may import
    custody.api. The import-linter contract
    lists its source modules one by one: a new custody module must be added to it."""
    (contract,) = [
        c for c in _import_linter_contracts() if c.get("forbidden_modules") == ["custody.api"]
    ]
    here = ROOT / "custody"
    modules = {f"custody.{p.stem}" for p in here.glob("*.py") if p.stem != "__init__"}
    packages = {f"custody.{p.parent.name}" for p in here.glob("*/__init__.py")}
    assert set(contract["source_modules"]) == (modules | packages) - {
        "custody.api",
        "custody.cli",
        "custody.root",
    }


@pytest.mark.unit
def test_one_action_vocabulary() -> None:
    """The service's actions and the signer's are the kernel's, name for name."""
    from custody.db.models import SigningAction
    from hsm.messages import SignBody
    from pledge.actions import ACTIONS, BANK_ACTIONS

    assert {a.value for a in SigningAction} == set(ACTIONS)
    annotation = SignBody.model_fields["action"].annotation
    assert set(typing.get_args(annotation)) == set(BANK_ACTIONS)


@pytest.mark.unit
def test_every_endpoints_module_is_forbidden_to_the_domain() -> None:
    """Each domain's HTTP edge (`custody/<domain>/endpoints.py`) is named in the contract
    that keeps the domain from importing it, and `custody.api.app` includes its router."""
    (contract,) = [
        c
        for c in _import_linter_contracts()
        if all(m.endswith(".endpoints") for m in c.get("forbidden_modules", ["x"]))
    ]
    found = {
        f"custody.{p.parent.name}.endpoints" for p in (ROOT / "custody").glob("*/endpoints.py")
    }
    assert set(contract["forbidden_modules"]) == found
    app_source = (ROOT / "custody" / "api" / "app.py").read_text()
    for module in found:
        domain = module.split(".")[1]
        assert f"from custody.{domain} import endpoints" in app_source, module


@pytest.mark.unit
def test_the_layers_contract_places_every_custody_package() -> None:
    """A new custody package or top-level module must be given a layer, or the rule that
    imports only go down (and that no two packages import each other) does not see it."""
    (contract,) = [c for c in _import_linter_contracts() if c.get("type") == "layers"]
    placed = {m.strip() for layer in contract["layers"] for m in layer.split("|")}
    here = ROOT / "custody"
    modules = {f"custody.{p.stem}" for p in here.glob("*.py") if p.stem != "__init__"}
    packages = {f"custody.{p.parent.name}" for p in here.glob("*/__init__.py")}
    assert placed == modules | packages
