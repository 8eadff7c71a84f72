"""Passkey approvals through the real signer: SoftHSM2, btcd, in process and as `hsm serve`.

People enrolled with a WebAuthn credential (two admins sign the enrolment) approve a
release with assertions over the statement the signer issued; the bank's key signs and
the transaction is mined. Every attack ends in a typed refusal with its `check`, nothing
signed by the bank key, and the refusal in the signer's decision log.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from support.signer_world import Loan, SignerWorld, expires, in_process_world, serve_world
from support.webauthn_authenticator import FLAG_UP, PasskeyPerson

from hsm.signer import PolicyViolation
from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed
from regtest.softhsm import SoftHsmToken

pytestmark = [pytest.mark.node, pytest.mark.hsm]


@pytest.fixture(scope="module", params=["in-process", "hsm-serve"])
def world(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    regtest_node: RegtestNode,
    softhsm_token: SoftHsmToken,
    module_feed: PriceFeed,
) -> Iterator[SignerWorld]:
    """Both transports (a passkey is checked by the same core either way, but through
    hsm serve the assertion crosses the HTTP body as the console would send it)."""
    base = tmp_path_factory.mktemp(f"passkeys-{request.param}")
    if request.param == "in-process":
        with in_process_world(base, regtest_node, module_feed, softhsm_token) as w:
            yield w
    else:
        with serve_world(base, regtest_node, module_feed) as w:
            yield w


def enrol(world: SignerWorld, role: str) -> PasskeyPerson:
    person = PasskeyPerson(f"{role.split('_')[1]}.{secrets.token_hex(3)}", role)
    statement = person.enrolment(expires())
    answer = world.client.enroll(statement, world.approvals(statement, "admin1", "admin2"))
    assert answer == {"name": person.name, "role": role, "algorithm": "webauthn"}
    return person


@dataclass
class Release:
    loan: Loan
    psbt: str
    prepared: dict[str, Any]
    operator: PasskeyPerson
    approver: PasskeyPerson

    @property
    def statement(self) -> dict[str, Any]:
        statement: dict[str, Any] = self.prepared["statement"]
        return statement

    def sign(self, world: SignerWorld, approvals: list[dict[str, Any]]) -> Any:
        return world.client.sign(
            self.loan.loan_ref,
            "release",
            self.psbt,
            nonce=self.prepared["nonce"],
            approvals=approvals,
        )


def release(world: SignerWorld, sats: int = 400_000) -> Release:
    operator, approver = enrol(world, "bank_operator"), enrol(world, "bank_approver")
    loan = world.register_loan()
    world.fund(loan, sats)
    psbt = world.release_psbt(loan)
    return Release(loan, psbt, world.prepare(loan, "release", psbt), operator, approver)


def refusals(world: SignerWorld, loan_ref: str, check: str) -> int:
    registry = world.registry()
    try:
        return sum(
            1 for d in registry.decisions(loan_ref) if d.decision == "refused" and d.check == check
        )
    finally:
        if world.transport == "hsm-serve":
            registry.close()


def test_a_release_approved_by_two_passkeys_is_signed_and_mined(world: SignerWorld) -> None:
    r = release(world)
    before = world.bank_signatures()
    signed = r.sign(world, [r.operator.endorse(r.statement), r.approver.endorse(r.statement)])
    assert world.bank_signatures() == before + 1
    assert signed.authorized == f"requested by {r.operator.name}, approved by {r.approver.name}"
    txid = world.broadcast(signed.psbt, r.loan, with_seat="miner")
    assert world.node.rpc.call("getrawtransaction", txid, 1)["confirmations"] == 1
    # the statement is used: the same assertions approve nothing again
    with pytest.raises(PolicyViolation) as again:
        r.sign(world, [r.operator.endorse(r.statement), r.approver.endorse(r.statement)])
    assert again.value.check == "approval_replayed"


Attack = Callable[[SignerWorld, Release], list[dict[str, Any]]]


def _for_another_transaction(world: SignerWorld, r: Release) -> list[dict[str, Any]]:
    other = release(world, 300_000)
    return [r.operator.endorse(r.statement), r.approver.endorse(other.statement)]


def _for_another_amount(world: SignerWorld, r: Release) -> list[dict[str, Any]]:
    """The page showed a statement the service rewrote (less to the miner, more fee)."""
    shown = dict(r.statement)
    shown["fee_sats"] = int(shown["fee_sats"]) + 10_000
    return [r.operator.endorse(r.statement), r.approver.endorse(shown)]


def _from_another_origin(world: SignerWorld, r: Release) -> list[dict[str, Any]]:
    return [
        r.operator.endorse(r.statement),
        r.approver.endorse(r.statement, origin="https://custody-bank.test.evil.example"),
    ]


def _for_another_rp_id(world: SignerWorld, r: Release) -> list[dict[str, Any]]:
    return [r.operator.endorse(r.statement), r.approver.endorse(r.statement, rp_id="evil.example")]


def _without_user_verification(world: SignerWorld, r: Release) -> list[dict[str, Any]]:
    return [r.operator.endorse(r.statement), r.approver.endorse(r.statement, flags=FLAG_UP)]


def _an_unknown_credential(world: SignerWorld, r: Release) -> list[dict[str, Any]]:
    stranger = PasskeyPerson(r.approver.name, r.approver.role)
    return [r.operator.endorse(r.statement), stranger.endorse(r.statement)]


def _the_operators_passkey_as_approver(world: SignerWorld, r: Release) -> list[dict[str, Any]]:
    return [
        r.operator.endorse(r.statement),
        {**r.operator.endorse(r.statement), "person": r.approver.name},
    ]


def _two_operators(world: SignerWorld, r: Release) -> list[dict[str, Any]]:
    second = enrol(world, "bank_operator")
    return [r.operator.endorse(r.statement), second.endorse(r.statement)]


def _a_cloned_authenticator(world: SignerWorld, r: Release) -> list[dict[str, Any]]:
    clone = r.approver.passkey.clone()
    earlier = release(world, 300_000)
    # the approver's real passkey approves another release (its counter moves to 1)...
    copy = PasskeyPerson(r.approver.name, r.approver.role, r.approver.passkey)
    earlier.sign(
        world, [earlier.operator.endorse(earlier.statement), copy.endorse(earlier.statement)]
    )
    # ...then the clone, whose counter is where the original's was, signs this one
    copied = PasskeyPerson(r.approver.name, r.approver.role, clone)
    return [r.operator.endorse(r.statement), copied.endorse(r.statement)]


def _a_removed_person(world: SignerWorld, r: Release) -> list[dict[str, Any]]:
    removal = {"kind": "remove", "name": r.approver.name, "expires_at": expires()}
    assert world.client.remove(removal, world.approvals(removal, "admin1", "admin2"))["removed"]
    return [r.operator.endorse(r.statement), r.approver.endorse(r.statement)]


def _the_same_passkey_twice(world: SignerWorld, r: Release) -> list[dict[str, Any]]:
    return [r.approver.endorse(r.statement), r.approver.endorse(r.statement)]


def _a_raw_signature_for_a_passkey_person(world: SignerWorld, r: Release) -> list[dict[str, Any]]:
    forged = world.staff["approver"].endorse(r.statement)
    return [r.operator.endorse(r.statement), {**forged, "person": r.approver.name}]


ATTACKS: list[tuple[str, Attack, str]] = [
    ("another-transaction", _for_another_transaction, "approval_signature"),
    ("another-amount", _for_another_amount, "approval_signature"),
    ("wrong-origin", _from_another_origin, "approval_signature"),
    ("wrong-rp-id", _for_another_rp_id, "approval_signature"),
    ("no-user-verification", _without_user_verification, "approval_signature"),
    ("unknown-credential", _an_unknown_credential, "approval_credential"),
    ("operator-passkey-as-approver", _the_operators_passkey_as_approver, "approval_credential"),
    ("two-operators", _two_operators, "approval_roles"),
    ("cloned-authenticator", _a_cloned_authenticator, "approval_counter"),
    ("removed-person", _a_removed_person, "approval_unknown_person"),
    ("same-passkey-twice", _the_same_passkey_twice, "approval_duplicate"),
    ("raw-signature-for-passkey", _a_raw_signature_for_a_passkey_person, "approval_signature"),
]


@pytest.mark.parametrize(("attack", "check"), [pytest.param(a, c, id=n) for n, a, c in ATTACKS])
def test_passkey_attacks_are_refused(world: SignerWorld, attack: Attack, check: str) -> None:
    r = release(world)
    approvals = attack(world, r)
    logged = refusals(world, r.loan.loan_ref, check)
    before = world.bank_signatures()
    with pytest.raises(PolicyViolation) as info:
        r.sign(world, approvals)
    assert info.value.check == check, info.value.reason
    assert world.bank_signatures() == before, "the bank key signed during an attack"
    assert refusals(world, r.loan.loan_ref, check) == logged + 1
    # the honest approvals still sign it (nothing the attack did spent the statement),
    # unless the attack removed the approver
    if check != "approval_unknown_person":
        honest = [r.operator.endorse(r.statement), r.approver.endorse(r.statement)]
        assert r.sign(world, honest).signatures == 1
