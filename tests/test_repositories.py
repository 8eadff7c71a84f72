"""Queries live in a domain's `repository.py` (and in `custody/db/`), never inline in its
service code: so a query is found by name, reused instead of rewritten, and read apart from
the rules that use it (see ARCHITECTURE.md, "A domain package").

The check reads every module of `custody/` with `ast` and names each call that builds or runs
SQL elsewhere: SQLAlchemy's and SQLModel's `select`, `update`, `delete`, `insert` and `text`
(however imported), and `session.exec/execute/get/scalar/scalars/query` (also on a
connection). `session.add`/`delete`/`flush` are the unit of work, not queries: they stay.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUSTODY = ROOT / "custody"

BUILDERS = frozenset({"select", "update", "delete", "insert", "text"})
RUNNERS = frozenset({"exec", "execute", "get", "scalar", "scalars", "query"})
RECEIVERS = frozenset({"session", "conn", "connection"})
SQL_PACKAGES = frozenset({"sqlalchemy", "sqlmodel"})

# Modules whose queries are still inline, each for a reason of its own. Keep it short: a
# module leaves the list when its queries move (test_allow_list_is_not_stale says when).
NOT_MOVED_YET: frozenset[str] = frozenset()


def _may_query(relative: str) -> bool:
    return (
        relative.startswith("custody/db/")
        or relative.endswith("/repository.py")
        or relative in NOT_MOVED_YET
    )


def _sql_names(tree: ast.Module) -> tuple[dict[str, str], set[str]]:
    """(local name -> builder, for `from sqlalchemy... import select as s`; the local names
    of SQLAlchemy/SQLModel modules and objects, for `sa.select` or `sql.expression.text`)."""
    builders: dict[str, str] = {}
    namespaces: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in SQL_PACKAGES:
                continue
            for alias in node.names:
                local = alias.asname or alias.name
                if alias.name in BUILDERS:
                    builders[local] = alias.name
                else:
                    namespaces.add(local)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in SQL_PACKAGES:
                    namespaces.add(alias.asname or alias.name.split(".")[0])
    return builders, namespaces


def _root_name(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _receiver(node: ast.expr) -> str | None:
    """`session` for `session.get`, `self.session.get` and `ctx.db_session.get`."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _builds(func: ast.Attribute, namespaces: set[str]) -> bool:
    """`sa.select(...)`, `sql.expression.text(...)`."""
    return func.attr in BUILDERS and _root_name(func.value) in namespaces


def _runs(func: ast.Attribute) -> bool:
    """`session.exec(...)`, `self.session.get(...)`, `conn.execute(...)`."""
    receiver = _receiver(func.value)
    return (
        func.attr in RUNNERS
        and receiver is not None
        and (receiver in RECEIVERS or receiver.endswith("_session"))
    )


def queries_in(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, what) for every query built or run in `source`."""
    tree = ast.parse(source, filename=filename)
    builders, namespaces = _sql_names(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in builders:
            found.append((node.lineno, f"{builders[func.id]}("))
        elif isinstance(func, ast.Attribute) and (_builds(func, namespaces) or _runs(func)):
            found.append((node.lineno, f"{ast.unparse(func)}("))
    return sorted(found)


def _modules() -> list[tuple[str, Path]]:
    return [(p.relative_to(ROOT).as_posix(), p) for p in sorted(CUSTODY.rglob("*.py"))]


@pytest.mark.unit
def test_queries_live_in_repositories() -> None:
    modules = _modules()
    assert modules, "no modules under custody/"
    inline = [
        f"{relative}:{line} {what}"
        for relative, path in modules
        if not _may_query(relative)
        for line, what in queries_in(path.read_text(encoding="utf-8"), relative)
    ]
    assert not inline, (
        "queries outside a repository.py (move each into its domain's repository, named "
        "for what it returns):\n" + "\n".join(inline)
    )


@pytest.mark.unit
def test_allow_list_is_not_stale() -> None:
    """A module whose queries have moved leaves NOT_MOVED_YET, so none slips back in."""
    modules = dict(_modules())
    stale = [
        relative
        for relative in sorted(NOT_MOVED_YET)
        if relative not in modules
        or not queries_in(modules[relative].read_text(encoding="utf-8"), relative)
    ]
    assert not stale, f"remove from NOT_MOVED_YET (no queries left, or gone): {stale}"


@pytest.mark.unit
def test_the_check_sees_every_form() -> None:
    """The scanner itself: aliases, module attributes, lazy imports, nested functions."""
    source = """\
import sqlalchemy as sa
from sqlmodel import select as pick, col
from sqlalchemy import sql


def f(session, self, conn, models):
    from sqlalchemy import update
    session.exec(pick(models.Loan))
    sa.delete(models.Loan)
    sql.expression.text("SELECT 1")
    self.session.get(models.Loan, 1)
    conn.execute(update(models.Loan))
    col(models.Loan.id).in_([1])
    session.add(models.Loan())
    session.delete(models.Loan())
    {}.get("select")
"""
    assert queries_in(source) == [
        (8, "select("),
        (8, "session.exec("),
        (9, "sa.delete("),
        (10, "sql.expression.text("),
        (11, "self.session.get("),
        (12, "conn.execute("),
        (12, "update("),
    ]
