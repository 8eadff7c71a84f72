"""The service and the bank's signer together, through the API: the bank key is made on a
statement two enrolled people signed, a release is signed on their signatures over the
signer's own statement, and a database attacker cannot talk the signer into more."""

from __future__ import annotations

import json

import pytest
from sqlmodel import Session
from support.lending import bank_sign, funded_loan, request, sign, the_psbt, upload
from support.signer_world import SignerWorld
from support.world import World, audit_actions

from custody.db.models import SignerStatement, SigningRequest
from custody.signing.statements import KEY_LABEL_PREFIX
from custody.watcher.service import Watcher
from regtest.node import RegtestNode

pytestmark = [pytest.mark.node, pytest.mark.hsm]


def test_the_bank_key_needs_two_enrolled_people(world: World, bank_signer: SignerWorld) -> None:
    loan = world.create_loan()
    early = world.call("bank_operator", "POST", f"/v1/loans/{loan['id']}/keys/bank/hsm")
    assert early.status_code == 409 and "miner" in early.json()["message"]
    assert early.json()["error"] == "keys_incomplete"
    assert world.register(loan["id"], "miner").status_code == 200
    assert world.register(loan["id"], "arbiter").status_code == 200
    r = world.call("bank_operator", "POST", f"/v1/loans/{loan['id']}/keys/bank/hsm")
    assert r.status_code == 201, r.text
    view = r.json()
    assert view["kind"] == "register_loan" and view["state"] == "open"
    assert view["statement"]["terms"]["principal_kopecks"] == loan["terms"]["principal_kopecks"]
    # the loan names no confirmation count: the signer gets the watcher's cautious one
    assert loan["terms"]["required_confirmations"] is None
    assert view["statement"]["terms"]["required_confirmations"] == 3
    # two operators are not 4 eyes: the signer refuses, the statement stays open
    refused = world.sign_statement(view["id"], "operator", "operator2").json()
    assert refused["state"] == "open" and "approval_roles" in refused["outcome"]
    assert world.call("miner", "GET", f"/v1/loans/{loan['id']}").json()["state"] == "draft"
    before = bank_signer.registry().loan_count()
    done = world.sign_statement(view["id"], "approver").json()
    assert done["state"] == "done", done
    after = world.call("miner", "GET", f"/v1/loans/{loan['id']}").json()
    assert after["state"] == "awaiting_deposit"
    assert bank_signer.registry().loan_count() == before + 1
    # the signer built the same descriptor from its own key and the two HD keys
    ref = view["statement"]["loan_ref"]
    assert bank_signer.client.loan(ref)["descriptor"] == after["descriptor"]
    assert "signer.refused" in audit_actions(world.engine, loan_id=loan["id"])


def test_a_release_signed_on_the_statement_is_broadcast(
    world: World, regtest_node: RegtestNode, watcher: Watcher, bank_signer: SignerWorld
) -> None:
    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    assert req["signer_statement_id"] is not None
    psbt = the_psbt(world, "miner", req["id"])
    assert upload(world, "miner", req["id"], sign(psbt, f.roots["miner"])).status_code == 200
    old_approve = world.call("bank_approver", "POST", f"/v1/signing-requests/{req['id']}/approve")
    assert old_approve.status_code == 409 and "custody approve" in old_approve.json()["message"]
    assert old_approve.json()["error"] == "approve_via_signer_statement"
    before = bank_signer.bank_signatures()
    done = bank_sign(world, req["id"]).json()
    assert done["state"] == "done", done
    assert bank_signer.bank_signatures() == before + 1
    after = world.call("miner", "GET", f"/v1/signing-requests/{req['id']}").json()
    assert after["state"] == "broadcast", after
    regtest_node.mine(1)
    watcher.step()
    assert world.call("miner", "GET", f"/v1/loans/{f.loan['id']}").json()["state"] == "released"


def test_a_rewritten_psbt_in_the_database_is_refused(
    world: World, regtest_node: RegtestNode, watcher: Watcher, bank_signer: SignerWorld
) -> None:
    """A database attacker redirects the release to their own address after the statement
    was issued: the signer signs only the transaction it issued the statement for."""
    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    from embit.psbt import PSBT

    with Session(world.engine) as s:
        row = s.get(SigningRequest, req["id"])
        assert row is not None
        changed = PSBT.from_string(row.psbt)
        changed.locktime = 1
        row.psbt = changed.to_string()
        s.add(row)
        s.commit()
    before = bank_signer.bank_signatures()
    outcome = bank_sign(world, req["id"]).json()
    assert outcome["state"] == "refused" and "approval_other_txid" in outcome["outcome"]
    assert bank_signer.bank_signatures() == before
    assert "signer.refused" in audit_actions(world.engine, request_id=req["id"])


def test_a_forged_statement_in_the_database_is_refused(
    world: World, regtest_node: RegtestNode, watcher: Watcher, bank_signer: SignerWorld
) -> None:
    """A database attacker rewrites the statement people will sign (lower fee, other
    amounts): the signer checks signatures over the statement it issued and kept."""
    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    with Session(world.engine) as s:
        st = s.get(SignerStatement, req["signer_statement_id"])
        assert st is not None
        body = json.loads(st.body)
        body["fee_sats"] = 1
        st.body = json.dumps(body)
        s.add(st)
        s.commit()
    before = bank_signer.bank_signatures()
    outcome = bank_sign(world, req["id"]).json()
    assert outcome["state"] == "open" and "approval_signature" in outcome["outcome"]
    assert bank_signer.bank_signatures() == before


def test_a_cancelled_request_kills_its_approvals(
    world: World, regtest_node: RegtestNode, watcher: Watcher, bank_signer: SignerWorld
) -> None:
    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    sid = req["signer_statement_id"]
    statement = world.call("bank_operator", "GET", f"/v1/signer-statements/{sid}").json()
    approvals = bank_signer.approvals(statement["statement"])
    r = world.call("bank_operator", "POST", f"/v1/signing-requests/{req['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    # the attacker replays the collected approvals straight to the signer
    from hsm.signer import PolicyViolation

    with pytest.raises(PolicyViolation) as refused:
        bank_signer.client.sign(
            statement["statement"]["loan_ref"],
            "release",
            the_psbt(world, "miner", req["id"]),
            nonce=statement["statement"]["nonce"],
            approvals=approvals,
        )
    assert refused.value.check == "approval_cancelled"


def test_a_bad_signature_under_someones_name_does_not_block_them(
    world: World, regtest_node: RegtestNode, watcher: Watcher, bank_signer: SignerWorld
) -> None:
    """Another bank login posts garbage as the approver: the signer refuses the pair, the
    statement stays open, and the approver's own signature replaces the garbage."""
    import base64

    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    sid = req["signer_statement_id"]
    statement = world.call("bank_operator", "GET", f"/v1/signer-statements/{sid}").json()
    approver = bank_signer.staff["approver"]
    garbage = {"person": approver.name, "signature": base64.b64encode(b"x" * 64).decode()}
    r = world.call(
        "bank_operator", "POST", f"/v1/signer-statements/{sid}/endorsements", json=garbage
    )
    assert r.status_code == 200 and r.json()["state"] == "open"
    before = bank_signer.bank_signatures()
    refused = world.sign_statement(sid, "operator").json()
    assert refused["state"] == "open" and "approval_signature" in refused["outcome"]
    assert bank_signer.bank_signatures() == before
    good = approver.endorse(statement["statement"])
    done = world.call(
        "bank_approver", "POST", f"/v1/signer-statements/{sid}/endorsements", json=good
    ).json()
    assert done["state"] == "done", done
    again = world.call(
        "bank_approver", "POST", f"/v1/signer-statements/{sid}/endorsements", json=good
    )
    assert again.status_code == 409 and again.json()["error"] == "signer_statement_not_in_state"
    actions = audit_actions(world.engine, request_id=req["id"])
    assert "signer.statement_resigned" in actions and "signer.signed" in actions


def test_a_lost_signer_call_is_retried(
    world: World, regtest_node: RegtestNode, watcher: Watcher, bank_signer: SignerWorld
) -> None:
    """The signer cannot be reached when the second signature arrives: the statement
    stays open with the reason, and a retry later finishes it without new signatures."""
    from hsm.client import BankSigner, HttpTransport

    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    sid = req["signer_statement_id"]
    app = world.client.app
    real = app.state.signer
    app.state.signer = BankSigner(HttpTransport("http://127.0.0.1:9", "t" * 40, timeout=2))
    try:
        lost = world.sign_statement(sid).json()
    finally:
        app.state.signer = real
    assert lost["state"] == "open" and "could not be reached" in lost["outcome"]
    early = world.call("auditor", "POST", f"/v1/signer-statements/{sid}/retry")
    assert early.status_code == 403
    done = world.call("bank_approver", "POST", f"/v1/signer-statements/{sid}/retry").json()
    assert done["state"] == "done", done
    twice = world.call("bank_approver", "POST", f"/v1/signer-statements/{sid}/retry")
    assert twice.status_code == 409 and twice.json()["error"] == "signer_statement_not_in_state"


def test_a_person_is_enrolled_through_the_service_by_two_signer_admins(
    world: World, regtest_node: RegtestNode, watcher: Watcher, bank_signer: SignerWorld
) -> None:
    """An API admin only opens the enrolment: it takes effect when two admins enrolled in
    the signer have signed it. The new approver can then approve; once removed, not."""
    from regtest.people import new_staff

    newcomer = new_staff("nina.approver", "bank_approver")
    r = world.call(
        "admin",
        "POST",
        "/v1/signer-people",
        json={"name": newcomer.name, "role": "bank_approver", "public_key": newcomer.public_hex},
    )
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert r.json()["statement"]["kind"] == "enroll"
    world.staff["nina"] = newcomer
    # an operator and an approver are not admins: the signer refuses, nothing changes
    refused = world.sign_statement(sid, "operator", "approver", submitter="admin").json()
    assert refused["state"] == "open" and "approval_roles" in refused["outcome"]
    done = world.sign_statement(sid, "admin1", "admin2", submitter="admin").json()
    assert done["state"] == "done", done
    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    psbt = the_psbt(world, "miner", req["id"])
    assert upload(world, "miner", req["id"], sign(psbt, f.roots["miner"])).status_code == 200
    assert bank_sign(world, req["id"], "operator", "nina").json()["state"] == "done"
    gone = world.call("admin", "POST", f"/v1/signer-people/{newcomer.name}/removal")
    assert gone.status_code == 201
    removed = world.sign_statement(gone.json()["id"], "admin1", "admin2", submitter="admin")
    assert removed.json()["state"] == "done"
    assert bank_signer.client.health()["people"] == 6  # two admins and four staff remain


def test_the_engine_liquidates_nothing_when_the_signer_has_no_price(
    world: World, regtest_node: RegtestNode, watcher: Watcher, bank_signer: SignerWorld
) -> None:
    """The service's price says liquidate; the signer's own feed is stale. The signer
    will not value the loan, so nothing is liquidated, and the audit log says why."""
    from datetime import UTC, datetime, timedelta
    from decimal import Decimal

    from custody.risk.engine import RiskEngine
    from custody.risk.prices import ManualPriceSource as Manual
    from custody.risk.prices import MedianPriceSource
    from custody.signing.chain import FeePolicy

    f = funded_loan(world, regtest_node, watcher)
    desk = Manual("desk")
    desk.set(Decimal(1_000_000), datetime.now(UTC), by="test")  # a crash, per the service
    engine = RiskEngine(
        world.engine,
        network="regtest",
        prices=MedianPriceSource([desk], max_age=timedelta(minutes=10), max_spread_bps=200),
        chain=regtest_node.rpc,
        signer=bank_signer.client,
        fees=FeePolicy(),
    )
    bank_signer.feed.set("1000000", quoted_at=datetime.now(UTC) - timedelta(hours=2))
    before = bank_signer.bank_signatures()
    report = engine.run_once()
    assert report.liquidations == [] and not report.errors, report
    assert bank_signer.bank_signatures() == before
    actions = audit_actions(world.engine, loan_id=f.loan["id"])
    assert "signer.refused" in actions
    assert world.call("miner", "GET", f"/v1/loans/{f.loan['id']}").json()["state"] != (
        "liquidating"
    )


def test_a_signature_the_signer_made_is_not_lost_when_the_node_is_down(
    world: World, regtest_node: RegtestNode, watcher: Watcher, bank_signer: SignerWorld
) -> None:
    """The signer signs, then the node is unreachable when the service broadcasts: the
    bank's signature is committed first, the request stays ready, the statement says how to
    go on, and a later broadcast sends it without asking the signer again (its statement is
    used up: asking again would be refused)."""
    from pledge.errors import UpstreamUnavailable

    f = funded_loan(world, regtest_node, watcher)
    req = request(world, "bank_operator", f.loan["id"], action="release")
    sid = req["signer_statement_id"]
    psbt = the_psbt(world, "miner", req["id"])
    assert upload(world, "miner", req["id"], sign(psbt, f.roots["miner"])).status_code == 200

    class DownNode:
        def __getattr__(self, name: str) -> object:
            def down(*args: object, **kwargs: object) -> object:
                raise UpstreamUnavailable("the node is down")

            return down

    app = world.client.app
    real = app.state.chain
    app.state.chain = DownNode()
    before = bank_signer.bank_signatures()
    try:
        view = world.sign_statement(sid).json()
    finally:
        app.state.chain = real
    assert bank_signer.bank_signatures() == before + 1
    assert view["state"] == "done" and "not broadcast yet" in view["outcome"], view
    ready = world.call("miner", "GET", f"/v1/signing-requests/{req['id']}").json()
    assert ready["state"] == "ready" and ready["signed_seats"] == ["miner", "bank"]
    sent = world.call("bank_operator", "POST", f"/v1/signing-requests/{req['id']}/broadcast")
    assert sent.status_code == 200 and sent.json()["state"] == "broadcast", sent.text
    assert bank_signer.bank_signatures() == before + 1  # not signed twice


def test_the_bank_key_statement_says_which_kind_and_keeps_to_it(
    world: World, bank_signer: SignerWorld
) -> None:
    """hd is the default; the kind is in what the two people sign; an open statement for
    one kind is not silently turned into the other; a kind that does not exist is 422."""
    loan = world.create_loan()
    for seat in ("miner", "arbiter"):
        assert world.register(loan["id"], seat).status_code == 200
    path = f"/v1/loans/{loan['id']}/keys/bank/hsm"
    bad = world.call("bank_operator", "POST", path, json={"kind": "xpub"})
    assert bad.status_code == 422 and bad.json()["field"] == "kind", bad.text
    opened = world.call("bank_operator", "POST", path)
    assert opened.status_code == 201 and opened.json()["statement"]["bank_key"] == "hd"
    again = world.call("bank_operator", "POST", path, json={"kind": "hd"})
    assert again.json()["id"] == opened.json()["id"]
    other = world.call("bank_operator", "POST", path, json={"kind": "fixed"})
    assert other.status_code == 409 and other.json()["error"] == "bank_key_request_open"
    done = world.sign_statement(opened.json()["id"]).json()
    assert done["state"] == "done", done
    after = world.call("miner", "GET", f"/v1/loans/{loan['id']}").json()
    bank = after["keys"][1]
    assert bank["kind"] == "hd" and bank["xpub"] in after["descriptor"]
    assert bank["hsm_key_label"] == KEY_LABEL_PREFIX + opened.json()["statement"]["loan_ref"]
