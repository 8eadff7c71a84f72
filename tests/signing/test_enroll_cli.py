"""`custody enroll` with a passkey, as an API admin runs it: the registration a person's
browser made is read and checked (py_webauthn) on the admin's machine, the enrolment
statement opened through the real API (uvicorn on loopback), two signer admins sign it,
and the passkey then approves a release the bank's signer (SoftHSM2, btcd) signs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session, select
from support.lending import bank_sign, funded_loan, request, sign, the_psbt, upload
from support.served import served
from support.signer_world import SignerWorld
from support.webauthn_authenticator import FLAG_UP, PasskeyPerson
from support.world import World

from custody.db.models import SignerStatement
from custody.watcher.service import Watcher
from pledge.statements import statement_digest
from regtest.node import RegtestNode, free_port

pytestmark = [pytest.mark.node, pytest.mark.hsm]


@pytest.fixture
def api_url(world: World) -> Iterator[str]:
    with served(world.client.app, free_port()) as url:
        yield url


def _enroll(world: World, api_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "custody.cli", "enroll", *args],
        env={
            "PATH": "/usr/bin:/bin",
            "CUSTODY_API_URL": api_url,
            "CUSTODY_API_KEY": world.api_keys["admin"],
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=os.getcwd(),
    )


def _registration(tmp_path: Path, person: PasskeyPerson, **options: object) -> Path:
    path = tmp_path / f"{person.name}.json"
    path.write_text(json.dumps(person.passkey.registration(os.urandom(32), **options)))  # type: ignore[arg-type]
    return path


def test_a_passkey_is_enrolled_from_its_registration_and_approves(
    world: World,
    regtest_node: RegtestNode,
    watcher: Watcher,
    bank_signer: SignerWorld,
    api_url: str,
    tmp_path: Path,
) -> None:
    nina = PasskeyPerson("nina.approver", "bank_approver")
    key = nina.passkey
    out = _enroll(
        world,
        api_url,
        nina.name,
        "--role",
        nina.role,
        "--passkey",
        str(_registration(tmp_path, nina)),
        "--rp-id",
        key.rp_id,
        "--origin",
        key.origin,
    )
    assert out.returncode == 0, out.stderr
    assert key.credential_id_b64 in out.stdout
    found = re.search(r"signer statement (\d+)", out.stdout)
    assert found, out.stdout
    sid = int(found.group(1))
    view = world.call("admin", "GET", f"/v1/signer-statements/{sid}").json()
    assert view["statement"]["credential_id"] == key.credential_id_b64
    assert view["statement"]["origins"] == [key.origin]
    done = world.sign_statement(sid, "admin1", "admin2", submitter="admin").json()
    assert done["state"] == "done", done
    # the enrolled passkey approves a release with the world's operator
    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    psbt = the_psbt(world, "miner", req["id"])
    assert upload(world, "miner", req["id"], sign(psbt, f.roots["miner"])).status_code == 200
    assert bank_sign(world, req["id"], "operator").json()["state"] == "open"
    page = world.call("bank_approver", "GET", f"/v1/signing-requests/{req['id']}/approval").json()
    assertion = key.assertion(statement_digest(page["statement"]))
    before = bank_signer.bank_signatures()
    r = world.call(
        "bank_approver",
        "POST",
        page["endorse_at"],
        json={"person": nina.name, "webauthn": assertion},
    )
    assert r.status_code == 200 and r.json()["state"] == "done", r.text
    assert bank_signer.bank_signatures() == before + 1


@pytest.mark.parametrize(
    ("options", "origin", "words"),
    [
        ({"origin": "https://evil.example"}, None, "registered from"),
        ({}, "https://other.bank.test", "registered from"),
        ({"flags": FLAG_UP}, None, "verif"),
    ],
    ids=["registered-elsewhere", "origin-not-allowed", "no-user-verification"],
)
def test_a_registration_that_does_not_verify_opens_nothing(
    world: World,
    api_url: str,
    tmp_path: Path,
    options: dict[str, object],
    origin: str | None,
    words: str,
) -> None:
    person = PasskeyPerson("olga.operator2", "bank_operator")
    before = _enrolments(world)
    out = _enroll(
        world,
        api_url,
        person.name,
        "--role",
        person.role,
        "--passkey",
        str(_registration(tmp_path, person, **options)),
        "--rp-id",
        person.passkey.rp_id,
        "--origin",
        origin or person.passkey.origin,
    )
    assert out.returncode == 2 and words in out.stderr, out.stderr
    assert _enrolments(world) == before, "a statement was opened for a bad registration"


def _enrolments(world: World) -> int:
    with Session(world.engine) as session:
        return len(
            session.exec(select(SignerStatement).where(SignerStatement.kind == "enroll")).all()
        )
