"""Invitations through the API (admins only) and the CLI: a link with a fresh token each
time, kept by the service as a hash only."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from support.world import WHO, World, build_world

from custody.console.service import hash_token
from custody.db.models import ConsoleInvitation

ORIGIN = "https://console.bank.example"


@pytest.fixture
def world(engine: Engine) -> World:
    return build_world(engine, console_origin=ORIGIN)


def _id(world: World, who: str) -> int:
    value: int = world.call(who, "GET", "/v1/me").json()["id"]
    return value


def test_an_admin_invites_and_the_link_holds_the_only_copy_of_the_token(world: World) -> None:
    miner = _id(world, "miner")
    r = world.call("admin", "POST", f"/v1/principals/{miner}/invitations")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["principal"] == "user-miner" and body["role"] == "miner"
    assert r.headers["cache-control"] == "no-store"
    prefix = f"{ORIGIN}/console/invite/"
    assert body["url"].startswith(prefix)
    token = body["url"][len(prefix) :]
    again = world.call("admin", "POST", f"/v1/principals/{miner}/invitations").json()
    assert again["url"] != body["url"]
    with Session(world.engine) as session:
        rows = session.exec(select(ConsoleInvitation)).all()
    assert rows[0].token_hash == hash_token(token)
    assert all(token not in str(row) for row in rows)


@pytest.mark.parametrize("who", [w for w in WHO if w != "admin"])
def test_nobody_but_an_admin_invites(world: World, who: str) -> None:
    r = world.call(who, "POST", f"/v1/principals/{_id(world, who)}/invitations")
    assert r.status_code == 403 and r.json()["error"] == "role_not_allowed"
    with Session(world.engine) as session:
        assert session.exec(select(ConsoleInvitation)).all() == []


def test_an_unknown_or_revoked_principal_is_not_invited(world: World) -> None:
    r = world.call("admin", "POST", "/v1/principals/987654/invitations")
    assert r.status_code == 404 and r.json()["error"] == "principal_not_found"
    auditor = _id(world, "auditor")
    assert world.call("admin", "POST", f"/v1/principals/{auditor}/revoke").status_code == 200
    r = world.call("admin", "POST", f"/v1/principals/{auditor}/invitations")
    assert r.status_code == 409 and r.json()["error"] == "principal_revoked"
    assert world.call(None, "POST", f"/v1/principals/{auditor}/invitations").status_code == 401


@pytest.mark.process
def test_the_cli_prints_an_invitation_link(tmp_path_factory: pytest.TempPathFactory) -> None:
    db = tmp_path_factory.mktemp("cli") / "custody.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODY_")}
    env.update({"DATABASE_URL": f"sqlite:///{db}", "CUSTODY_CONSOLE_ORIGIN": ORIGIN})
    cli = [sys.executable, "-m", "custody.cli"]
    made = subprocess.run([*cli, "create-admin", "root"], env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    link = subprocess.run([*cli, "invite", "root"], env=env, capture_output=True, text=True)
    assert link.returncode == 0, link.stderr
    assert link.stdout.strip().startswith(f"{ORIGIN}/console/invite/")
    missing = subprocess.run([*cli, "invite", "nobody"], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr
