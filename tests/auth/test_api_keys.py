"""API keys are revoked and rotated by admins (API and CLI), audited without the key,
effective at the next request on every replica, and never left in a cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from support.declared import CheckedClient
from support.world import World, build_world

from custody.auth.service import create_principal, revoke_principal
from custody.db.models import AuditEvent, Role
from custody.db.session import make_engine, transaction
from custody.errors import LastAdmin
from custody.root import Root

NO_STORE = {"cache-control": "no-store", "pragma": "no-cache"}


@pytest.fixture
def world(engine: Engine) -> World:
    return build_world(engine)


@pytest.fixture
def replica(world: World) -> Iterator[CheckedClient]:
    """A second API process's app: its own engine (pool) on the same database."""
    engine = make_engine(world.engine.url.render_as_string(hide_password=False))
    app = Root.assemble(world.settings, engine=engine).app()
    with CheckedClient(app, raise_server_exceptions=False) as client:
        yield client
    engine.dispose()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _new_principal(world: World, name: str, role: str = "auditor") -> tuple[int, str]:
    r = world.call("admin", "POST", "/v1/principals", json={"name": name, "role": role})
    assert r.status_code == 201, r.text
    assert {k: r.headers.get(k) for k in NO_STORE} == NO_STORE
    return r.json()["id"], r.json()["api_key"]


def _audit(engine: Engine, action: str) -> list[AuditEvent]:
    with Session(engine) as s:
        query = select(AuditEvent).where(AuditEvent.action == action)
        return list(s.exec(query.order_by(col(AuditEvent.id))).all())


def test_a_revoked_key_answers_401_at_once_on_every_replica(
    world: World, replica: CheckedClient
) -> None:
    pid, key = _new_principal(world, "soon-revoked")
    # Both replicas have served the key (anything they might keep, they now keep).
    assert world.client.get("/v1/me", headers=_bearer(key)).status_code == 200
    assert replica.get("/v1/me", headers=_bearer(key)).status_code == 200

    r = world.call("admin", "POST", f"/v1/principals/{pid}/revoke")
    assert r.status_code == 200, r.text
    assert r.json()["revoked"] is True and "api_key" not in r.json()
    for client in (world.client, replica):
        answer = client.get("/v1/me", headers=_bearer(key))
        assert answer.status_code == 401 and answer.json()["error"] == "not_authenticated"

    again = world.call("admin", "POST", f"/v1/principals/{pid}/revoke")
    assert again.status_code == 409 and again.json()["error"] == "principal_revoked"
    rotate = world.call("admin", "POST", f"/v1/principals/{pid}/rotate")
    assert rotate.status_code == 409 and rotate.json()["error"] == "principal_revoked"
    missing = world.call("admin", "POST", "/v1/principals/999999/revoke")
    assert missing.status_code == 404 and missing.json()["error"] == "principal_not_found"

    [event] = _audit(world.engine, "principal.revoked")
    assert event.actor == "admin:user-admin"
    assert json.loads(event.data or "{}")["principal_id"] == pid
    assert key not in (event.data or "")


def test_a_rotated_key_replaces_the_old_one_and_is_shown_once_uncached(
    world: World, replica: CheckedClient
) -> None:
    pid, old = _new_principal(world, "rotating")
    assert replica.get("/v1/me", headers=_bearer(old)).status_code == 200

    r = world.call("admin", "POST", f"/v1/principals/{pid}/rotate")
    assert r.status_code == 200, r.text
    assert {k: r.headers.get(k) for k in NO_STORE} == NO_STORE
    new = r.json()["api_key"]
    assert new != old and new.startswith("pc_") and r.json()["key_prefix"] == new[:9]
    for client in (world.client, replica):
        assert client.get("/v1/me", headers=_bearer(old)).status_code == 401
        me = client.get("/v1/me", headers=_bearer(new))
        assert me.status_code == 200 and me.json()["id"] == pid
        assert "api_key" not in me.json() and new not in me.text

    [event] = _audit(world.engine, "principal.key_rotated")
    data = json.loads(event.data or "{}")
    assert data["old_key_prefix"] == old[:9] and data["key_prefix"] == new[:9]
    assert old not in (event.data or "") and new not in (event.data or "")


def test_only_admins_revoke_and_the_last_admin_key_stays(world: World) -> None:
    admin_id = world.call("admin", "GET", "/v1/me").json()["id"]
    for who in ("bank_operator", "auditor", "miner"):
        r = world.call(who, "POST", f"/v1/principals/{admin_id}/revoke")
        assert r.status_code == 403 and r.json()["error"] == "role_not_allowed", who
    assert world.client.post(f"/v1/principals/{admin_id}/rotate").status_code == 401

    r = world.call("admin", "POST", f"/v1/principals/{admin_id}/revoke")
    assert r.status_code == 409 and r.json()["error"] == "last_admin", r.text
    assert world.call("admin", "GET", "/v1/me").status_code == 200

    # With a second admin, the first may go (even by its own hand); then the second is last.
    second_id, second_key = _new_principal(world, "second-admin", role="admin")
    assert world.call("admin", "POST", f"/v1/principals/{admin_id}/revoke").status_code == 200
    assert world.call("admin", "GET", "/v1/me").status_code == 401
    last = world.client.post(f"/v1/principals/{second_id}/revoke", headers=_bearer(second_key))
    assert last.status_code == 409 and last.json()["error"] == "last_admin"


def test_two_admins_revoking_each_other_at_once_leave_one(world: World) -> None:
    """The admins' rows are locked for the check: the second revocation waits for the
    first and then sees it (PostgreSQL's READ COMMITTED would otherwise let both pass)."""
    with transaction(world.engine) as s:
        other, _ = create_principal(s, name="admin-b", role=Role.admin, party_id=None, actor="t")
    first_id = world.call("admin", "GET", "/v1/me").json()["id"]
    assert other.id is not None
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def revoke(target: int, actor: str) -> None:
        barrier.wait()
        try:
            with transaction(world.engine) as s:
                revoke_principal(s, actor=actor, principal_id=target)
            outcomes.append("revoked")
        except LastAdmin:
            outcomes.append("last_admin")

    threads = [
        threading.Thread(target=revoke, args=(other.id, "admin:a")),
        threading.Thread(target=revoke, args=(first_id, "admin:b")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["last_admin", "revoked"]


def _cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUSTODY_", "HSM_"))}
    env.update({"DATABASE_URL": db_url, "CUSTODY_NETWORK": "regtest"})
    return subprocess.run(
        [sys.executable, "-m", "custody.cli", "principal", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.process
def test_the_cli_rotates_and_revokes_by_name(world: World, db_url: str) -> None:
    _, old = _new_principal(world, "cli-user")
    rotated = _cli(db_url, "rotate", "cli-user")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert world.client.get("/v1/me", headers=_bearer(old)).status_code == 401
    assert world.client.get("/v1/me", headers=_bearer(new)).json()["name"] == "cli-user"
    assert new not in rotated.stderr

    revoked = _cli(db_url, "revoke", "cli-user")
    assert revoked.returncode == 0, revoked.stderr
    assert world.client.get("/v1/me", headers=_bearer(new)).status_code == 401
    assert [e.actor for e in _audit(world.engine, "principal.revoked")] == ["cli"]

    refused = _cli(db_url, "revoke", "user-admin")  # the only admin
    assert refused.returncode == 2 and "last admin" in refused.stderr
    unknown = _cli(db_url, "rotate", "nobody")
    assert unknown.returncode == 2 and "not found" in unknown.stderr
