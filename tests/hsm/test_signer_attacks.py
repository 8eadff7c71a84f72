"""The attack corpus of the bank's signer ("the bank's signer decides alone").

Every attack below is what a caller holding the service (its database, its API process,
the PSBTs it builds) could send the signer. Each runs on both transports (`in-process`
and a real `hsm serve`) and must end in a typed refusal
(`hsm.signer.PolicyViolation`) with the expected stable `check`, with ZERO C_Sign calls
on the token during the attack, and with a 'refused' row carrying that check in the
signer's own decision log. Setup (registering, funding, preparing, any legitimate
signature an attack builds on) happens before the C_Sign count is taken.

The attacks are parametrized tables, one per theme, so the count is visible:

    APPROVAL_FORGERIES       19  forged roles and signatures on a 4-eyes release
    REQUEST_ATTACKS          20  automatic flag, nonces, replays, cancelled/expired
                                 statements, statements moved to other PSBTs or actions,
                                 things that changed between prepare and sign
    EVIDENCE_ATTACKS         16  valuations: verdict, id, owner, records changed since;
                                 PSBTs priced on figures other than the signer's
    PRICE_FEED_ATTACKS       11  stale, future-dated and impossible prices from the feed
    DESK_QUOTE_ATTACKS       12  desk quotes: signers, keys, source, price, times
    COLLATERAL_ATTACKS        9  subsets, unknown, unconfirmed, foreign, spent, doubled
    REGISTRATION_ATTACKS     38  who signed, expiry, networks, types, keys, terms, refs
    AMENDMENT_ATTACKS        11  payout changes without the right approvals, replays
    REPAYMENT_ATTACKS         8  unapproved, future-dated, malformed, conflicting
    PEOPLE_ATTACKS           14  enrolment and removal without two admins, and so on
    SHAPE_ATTACKS            37  the transaction itself: locktime, version, sequences,
                                 sighash, scripts, utxos, outputs, fee
    RELEASE_SHAPE_ATTACKS     8  a release or partial liquidation paying the wrong way
    RAW_ATTACKS              27  hostile bytes through the one entry point
                            ---
                            230  distinct attacks in tables (x 2 transports x 2 kinds of bank key)

plus 4 written out as their own tests (a removed person's approval, spent collateral
named again, a loan registered twice with the same and with a new statement), and
tests/hsm/test_signer_limits.py (velocity and stale valuations in dedicated worlds).
`test_the_corpus_is_what_the_docstring_says` keeps these table counts honest.

One behaviour is asserted as found rather than refused: a second loan may reuse an
existing loan's miner and arbiter keys (its descriptor differs by the new bank key);
see `test_reusing_another_loans_miner_and_arbiter_keys_is_accepted`.

Expiry without waiting: a transaction statement's expiry is the signer's own
(approval TTL >= 60 s). In process the core's injectable clock is moved past it; for
`hsm serve` (no clock to move) the stored statement's `expires_at` is moved into the
past in the serve process's registry, which is what the passing of that time looks like
to the signer. Statements the caller writes (registration, enrolment, repayment, desk
quote) carry their own `expires_at`, set directly.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from embit import compact
from embit.bip32 import HDKey as EmbitHDKey
from embit.psbt import PSBT, InputScope, OutputScope
from embit.script import Script, Witness, address_to_scriptpubkey
from embit.transaction import SIGHASH, Transaction, TransactionInput, TransactionOutput
from support.signer_world import (
    NETWORK,
    Loan,
    SignerWorld,
    expires,
    matured,
    software_party,
)

from custody.signing.psbt import PayTo, PayToCollateral
from hsm.client import InProcessTransport
from hsm.pkcs11_backend import key_ref_for_loan
from hsm.registry import Registry
from hsm.signer import PolicyViolation, SignerRefused
from pledge.statements import iso
from regtest.faucet import random_p2wpkh_address
from regtest.people import Staff, new_staff

pytestmark = [pytest.mark.node, pytest.mark.hsm]

Call = Callable[[], object]
Setup = Callable[[SignerWorld], tuple[str, Call]]
Approve = Callable[[SignerWorld, dict[str, Any]], list[dict[str, str]]]

MAINNET_ADDRESS = "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4"
TESTNET_ADDRESS = "tb1qw508d6qejxtdg4y5r3zarvary0c5xw7kxpjzsx"


# --------------------------------------------------------------------------- asserting


@dataclass(frozen=True)
class Attack:
    name: str
    setup: Setup
    check: str
    reason: str | None = None

    def param(self) -> Any:
        return pytest.param(self, id=self.name)


@contextmanager
def signer_registry(world: SignerWorld) -> Iterator[Registry]:
    """The signer's own registry (for hsm serve: its state db, opened here and closed)."""
    registry = world.registry()
    try:
        yield registry
    finally:
        if world.transport == "hsm-serve":
            registry.close()


def refusals(world: SignerWorld, loan_ref: str | None, check: str) -> int:
    """Refused rows with `check` in the signer's decision log (of one loan, or all)."""
    with signer_registry(world) as registry:
        return sum(
            1 for d in registry.decisions(loan_ref) if d.decision == "refused" and d.check == check
        )


def assert_refused(
    world: SignerWorld, loan_ref: str, check: str, call: Call, reason: str | None = None
) -> PolicyViolation:
    """`call` is refused with `check`, the token signs nothing meanwhile, and the
    refusal is in the signer's decision log."""
    logged = refusals(world, loan_ref, check)
    before = world.bank_signatures()
    with pytest.raises(PolicyViolation) as info:
        call()
    assert world.bank_signatures() == before, "the token signed during an attack"
    refusal = info.value
    assert refusal.check == check, f"refused as {refusal.check!r}: {refusal.reason}"
    if reason is not None:
        assert reason in refusal.reason, refusal.reason
    assert refusals(world, loan_ref, check) == logged + 1, "the refusal is not in the log"
    return refusal


def run(world: SignerWorld, attack: Attack) -> PolicyViolation:
    loan_ref, call = attack.setup(world)
    return assert_refused(world, loan_ref, attack.check, call, attack.reason)


# --------------------------------------------------------------------------- loans


def released(world: SignerWorld, sats: int = 500_000) -> tuple[Loan, str, dict[str, Any]]:
    """A funded loan, its release PSBT and the statement the signer issued for it."""
    loan = world.register_loan()
    world.fund(loan, sats)
    psbt = world.release_psbt(loan)
    return loan, psbt, world.prepare(loan, "release", psbt)


def liquidatable(world: SignerWorld) -> tuple[Loan, dict[str, Any], str]:
    loan = matured(world)
    valuation = world.client.valuation(loan.loan_ref)
    assert valuation["verdict"] == "liquidate", valuation
    return loan, valuation, world.liquidation_psbt(loan, valuation)


def margin_called(world: SignerWorld) -> tuple[Loan, dict[str, Any]]:
    loan = world.register_loan(principal_kopecks=6_500_000)  # LTV 81.25 % at 8M
    world.fund(loan, 1_000_000)
    valuation = world.client.valuation(loan.loan_ref)
    assert valuation["verdict"] == "margin_call", valuation
    return loan, valuation


def automatic(world: SignerWorld, loan: Loan, psbt: str, valuation_id: str | None) -> Call:
    return lambda: world.client.sign(
        loan.loan_ref, "liquidation", psbt, automatic=True, valuation_id=valuation_id
    )


def approved(
    world: SignerWorld,
    loan: Loan,
    action: str,
    psbt: str,
    prepared: dict[str, Any],
    approvals: list[dict[str, str]] | None = None,
) -> Call:
    statement = prepared["statement"]
    return lambda: world.client.sign(
        loan.loan_ref,
        action,
        psbt,
        nonce=prepared["nonce"],
        approvals=world.approvals(statement) if approvals is None else approvals,
    )


# --------------------------------------------------------------------------- PSBTs


def edit(psbt_b64: str, change: Callable[[PSBT], object]) -> str:
    psbt = PSBT.from_string(psbt_b64)
    change(psbt)
    out: str = psbt.to_string()
    return out


def splice_unsigned_tx(psbt_b64: str, change: Callable[[Transaction], object]) -> str:
    """Rewrite the global unsigned transaction byte for byte (for what embit's own
    writer normalises away: a zero sequence, a scriptSig)."""
    raw = base64.b64decode(psbt_b64)
    psbt = PSBT.from_string(psbt_b64)
    old = psbt.tx.serialize()
    head = PSBT.MAGIC + b"\x01\x00" + compact.to_bytes(len(old))
    assert raw.startswith(head + old)
    tx = Transaction.parse(old)
    change(tx)
    new = tx.serialize()
    spliced = PSBT.MAGIC + b"\x01\x00" + compact.to_bytes(len(new)) + new + raw[len(head + old) :]
    return base64.b64encode(spliced).decode()


def attacker_spk() -> Script:
    return address_to_scriptpubkey(random_p2wpkh_address())


def add_output(psbt: PSBT, value: int, script: Script) -> None:
    psbt.outputs.append(OutputScope(unknown={}, vout=TransactionOutput(value, script)))


def add_input(psbt: PSBT, txid: str, vout: int) -> None:
    psbt.inputs.append(InputScope(vin=TransactionInput(bytes.fromhex(txid), vout)))


def paid_elsewhere(world: SignerWorld, sats: int = 50_000) -> tuple[str, int]:
    """A confirmed coin paying a random address (no loan's)."""
    txid, vout = world.node.faucet.pay(random_p2wpkh_address(), sats)
    world.node.mine(1)
    return txid, vout


def spent_outpoint(world: SignerWorld) -> tuple[str, int]:
    """An output the faucet has already spent (confirmed)."""
    txid, _ = paid_elsewhere(world, 20_000)
    tx = Transaction.parse(world.node.rpc.get_raw_transaction(txid))
    return tx.vin[0].txid.hex(), int(tx.vin[0].vout)


def other_loans_psbt(world: SignerWorld) -> PSBT:
    other = world.register_loan()
    world.fund(other, 300_000)
    return PSBT.from_string(world.release_psbt(other))


def test_the_honest_bases_of_the_attacks_are_signed(world: SignerWorld) -> None:
    """Control: what the tables tamper with is signed when left alone, so each refusal
    below is the tampering's doing."""
    loan, psbt, prepared = released(world)
    before = world.bank_signatures()
    assert approved(world, loan, "release", psbt, prepared)()
    loan, valuation, psbt = liquidatable(world)
    assert automatic(world, loan, psbt, valuation["valuation_id"])()
    loan, valuation = margin_called(world)
    psbt = world.partial_psbt(loan, valuation, change_index=3)
    prepared = world.prepare(loan, "partial_liquidation", psbt, valuation["valuation_id"])
    assert approved(world, loan, "partial_liquidation", psbt, prepared)()
    assert world.bank_signatures() == before + 3


# --------------------------------------------------------------------------- forged approvals


def signed_by(*who: str) -> Approve:
    return lambda world, st: world.approvals(st, *who)


def strangers(*roles: str) -> Approve:
    def approve(world: SignerWorld, st: dict[str, Any]) -> list[dict[str, str]]:
        return [new_staff(f"mallory{n}.{r[:3]}", r).endorse(st) for n, r in enumerate(roles)]

    return approve


def over_other(change: Callable[[dict[str, Any]], object]) -> Approve:
    """Valid signatures of the right people, over a different statement."""

    def approve(world: SignerWorld, st: dict[str, Any]) -> list[dict[str, str]]:
        other = copy.deepcopy(st)
        change(other)
        assert other != st
        return world.approvals(other)

    return approve


def with_signature(person: str, signature: str) -> Approve:
    def approve(world: SignerWorld, st: dict[str, Any]) -> list[dict[str, str]]:
        good = world.approvals(st)
        return [good[0], {"person": world.staff[person].name, "signature": signature}]

    return approve


def unknown_key_under(person: str) -> Approve:
    """A valid Ed25519 signature by a key nobody enrolled, under an enrolled name."""

    def approve(world: SignerWorld, st: dict[str, Any]) -> list[dict[str, str]]:
        forger = Staff(
            world.staff[person].name, "bank_approver", ed25519.Ed25519PrivateKey.generate()
        )
        return [world.staff["operator"].endorse(st), forger.endorse(st)]

    return approve


def swapped_names(world: SignerWorld, st: dict[str, Any]) -> list[dict[str, str]]:
    op, ap = world.approvals(st)
    return [
        {"person": op["person"], "signature": ap["signature"]},
        {"person": ap["person"], "signature": op["signature"]},
    ]


def plus_stranger(world: SignerWorld, st: dict[str, Any]) -> list[dict[str, str]]:
    return [*world.approvals(st), new_staff("mallory", "bank_approver").endorse(st)]


def _outputs_to_one_sat(st: dict[str, Any]) -> None:
    st["outputs"] = [o.rsplit(":", 1)[0] + ":1" for o in st["outputs"]]


def _later(st: dict[str, Any]) -> None:
    st["expires_at"] = iso(datetime.now(UTC) + timedelta(days=3))


def release_with(approve: Approve) -> Setup:
    def setup(world: SignerWorld) -> tuple[str, Call]:
        loan, psbt, prepared = released(world)
        approvals = approve(world, prepared["statement"])
        return loan.loan_ref, approved(world, loan, "release", psbt, prepared, approvals)

    return setup


def _previous_statement_for_the_same_psbt(world: SignerWorld) -> tuple[str, Call]:
    loan, psbt, first = released(world)
    second = world.prepare(loan, "release", psbt)
    assert second["nonce"] != first["nonce"]
    return loan.loan_ref, approved(
        world, loan, "release", psbt, second, world.approvals(first["statement"])
    )


APPROVAL_FORGERIES = [
    Attack(
        "two_operators_no_approver",
        release_with(signed_by("operator", "operator2")),
        "approval_roles",
    ),
    Attack(
        "two_approvers_no_operator",
        release_with(signed_by("approver", "approver2")),
        "approval_roles",
    ),
    Attack("two_admins", release_with(signed_by("admin1", "admin2")), "approval_roles"),
    Attack("operator_alone", release_with(signed_by("operator")), "approval_roles"),
    Attack("no_signatures", release_with(lambda w, st: []), "approval_roles"),
    Attack(
        "one_person_twice", release_with(signed_by("operator", "operator")), "approval_duplicate"
    ),
    Attack(
        "person_not_enrolled",
        release_with(
            lambda w, st: [w.staff["operator"].endorse(st), *strangers("bank_approver")(w, st)]
        ),
        "approval_unknown_person",
        "not enrolled",
    ),
    Attack(
        "two_people_not_enrolled",
        release_with(strangers("bank_operator", "bank_approver")),
        "approval_unknown_person",
    ),
    Attack("valid_quorum_plus_a_stranger", release_with(plus_stranger), "approval_unknown_person"),
    Attack(
        "signed_other_txid",
        release_with(over_other(lambda st: st.update(unsigned_txid="00" * 32))),
        "approval_signature",
    ),
    Attack(
        "signed_other_nonce",
        release_with(over_other(lambda st: st.update(nonce=secrets.token_urlsafe(24)))),
        "approval_signature",
    ),
    Attack(
        "signed_other_amounts", release_with(over_other(_outputs_to_one_sat)), "approval_signature"
    ),
    Attack("signed_a_later_expiry", release_with(over_other(_later)), "approval_signature"),
    Attack(
        "signed_previous_statement_same_psbt",
        _previous_statement_for_the_same_psbt,
        "approval_signature",
    ),
    Attack(
        "garbage_base64_signature",
        release_with(with_signature("approver", "%%not-b64%%")),
        "approval_signature",
    ),
    Attack(
        "zero_bytes_signature",
        release_with(with_signature("approver", "AAAA")),
        "approval_signature",
    ),
    Attack(
        "oversized_signature",
        release_with(with_signature("approver", base64.b64encode(b"\x01" * 250).decode())),
        "approval_signature",
    ),
    Attack(
        "unknown_key_under_enrolled_name",
        release_with(unknown_key_under("approver")),
        "approval_signature",
        "does not verify",
    ),
    Attack("signatures_under_swapped_names", release_with(swapped_names), "approval_signature"),
]


@pytest.mark.parametrize("attack", [a.param() for a in APPROVAL_FORGERIES])
def test_forged_approvals_are_refused(world: SignerWorld, attack: Attack) -> None:
    run(world, attack)


def test_a_removed_person_cannot_approve(world: SignerWorld) -> None:
    """Enrol a temporary approver (two admins), remove them (two admins): their
    signature no longer counts."""
    temp = new_staff(f"temp.{secrets.token_hex(4)}", "bank_approver")
    enrol = {
        "kind": "enroll",
        "name": temp.name,
        "role": temp.role,
        "algorithm": "ed25519",
        "public_key": temp.public_hex,
        "expires_at": expires(),
    }
    world.client.enroll(enrol, world.approvals(enrol, "admin1", "admin2"))
    loan, psbt, prepared = released(world)
    removal = {"kind": "remove", "name": temp.name, "expires_at": expires()}
    assert world.client.remove(removal, world.approvals(removal, "admin1", "admin2"))["removed"]
    statement = prepared["statement"]
    approvals = [world.staff["operator"].endorse(statement), temp.endorse(statement)]
    assert_refused(
        world,
        loan.loan_ref,
        "approval_unknown_person",
        approved(world, loan, "release", psbt, prepared, approvals),
    )


# --------------------------------------------------------------------------- requests


def _automatic_release(world: SignerWorld) -> tuple[str, Call]:
    loan, psbt, _ = released(world)
    return loan.loan_ref, lambda: world.client.sign(loan.loan_ref, "release", psbt, automatic=True)


def _automatic_release_on_a_liquidate_verdict(world: SignerWorld) -> tuple[str, Call]:
    loan, valuation, _ = liquidatable(world)
    psbt = world.release_psbt(loan)
    return loan.loan_ref, lambda: world.client.sign(
        loan.loan_ref, "release", psbt, automatic=True, valuation_id=valuation["valuation_id"]
    )


def _automatic_partial(world: SignerWorld) -> tuple[str, Call]:
    loan, valuation = margin_called(world)
    psbt = world.partial_psbt(loan, valuation, change_index=3)
    return loan.loan_ref, lambda: world.client.sign(
        loan.loan_ref,
        "partial_liquidation",
        psbt,
        automatic=True,
        valuation_id=valuation["valuation_id"],
    )


def _automatic_with_approvals(world: SignerWorld) -> tuple[str, Call]:
    loan, valuation, psbt = liquidatable(world)
    prepared = world.prepare(loan, "liquidation", psbt, valuation["valuation_id"])
    return loan.loan_ref, lambda: world.client.sign(
        loan.loan_ref,
        "liquidation",
        psbt,
        automatic=True,
        approvals=world.approvals(prepared["statement"]),
        valuation_id=valuation["valuation_id"],
    )


def _automatic_with_nonce(world: SignerWorld) -> tuple[str, Call]:
    loan, valuation, psbt = liquidatable(world)
    prepared = world.prepare(loan, "liquidation", psbt, valuation["valuation_id"])
    return loan.loan_ref, lambda: world.client.sign(
        loan.loan_ref,
        "liquidation",
        psbt,
        automatic=True,
        nonce=prepared["nonce"],
        valuation_id=valuation["valuation_id"],
    )


def _no_nonce(world: SignerWorld) -> tuple[str, Call]:
    loan, psbt, prepared = released(world)
    approvals = world.approvals(prepared["statement"])
    return loan.loan_ref, lambda: world.client.sign(
        loan.loan_ref, "release", psbt, approvals=approvals
    )


def _unknown_nonce(world: SignerWorld) -> tuple[str, Call]:
    loan, psbt, prepared = released(world)
    forged = {**prepared, "nonce": secrets.token_urlsafe(24)}
    return loan.loan_ref, approved(world, loan, "release", psbt, forged)


def _nonce_of_another_loan(world: SignerWorld) -> tuple[str, Call]:
    _, other_psbt, other_prepared = released(world)
    loan, _, _ = released(world)
    return loan.loan_ref, lambda: world.client.sign(
        loan.loan_ref,
        "release",
        other_psbt,
        nonce=other_prepared["nonce"],
        approvals=world.approvals(other_prepared["statement"]),
    )


def _replayed(world: SignerWorld) -> tuple[str, Call]:
    loan, psbt, prepared = released(world)
    approved(world, loan, "release", psbt, prepared)()  # signed once, legitimately
    return loan.loan_ref, approved(world, loan, "release", psbt, prepared)


def _cancelled(world: SignerWorld) -> tuple[str, Call]:
    loan, psbt, prepared = released(world)
    assert world.client.cancel(prepared["nonce"])["state"] == "cancelled"
    return loan.loan_ref, approved(world, loan, "release", psbt, prepared)


def _cancel_unknown(world: SignerWorld) -> tuple[str, Call]:
    return "-", lambda: world.client.cancel(secrets.token_urlsafe(24))


def _expired(world: SignerWorld) -> tuple[str, Call]:
    loan, psbt, prepared = released(world)
    sign = approved(world, loan, "release", psbt, prepared)

    def call() -> object:
        with past_expiry(world, prepared["nonce"]):
            return sign()

    return loan.loan_ref, call


@contextmanager
def past_expiry(world: SignerWorld, nonce: str) -> Iterator[None]:
    """Make the statement `nonce` expired, as the passing of its TTL would (see the
    module docstring)."""
    transport = world.client.transport
    if isinstance(transport, InProcessTransport):
        core = transport.core
        real = core.clock
        core.clock = lambda: real() + timedelta(days=8)
        try:
            yield
        finally:
            core.clock = real
        return
    past = iso(datetime.now(UTC) - timedelta(minutes=1))
    with signer_registry(world) as registry, registry.tx() as db:
        db.execute(
            "UPDATE statement SET body = json_set(body, '$.statement.expires_at', ?) "
            "WHERE nonce = ?",
            (past, nonce),
        )
    yield


def _other_txid(world: SignerWorld) -> tuple[str, Call]:
    loan, psbt_a, prepared = released(world)
    psbt_b = edit(psbt_a, lambda p: setattr(p.outputs[0], "value", p.outputs[0].value - 1_000))
    return loan.loan_ref, approved(world, loan, "release", psbt_b, prepared)


def _release_approval_for_liquidation(world: SignerWorld) -> tuple[str, Call]:
    loan, psbt, prepared = released(world)
    return loan.loan_ref, approved(world, loan, "liquidation", psbt, prepared)


def _liquidation_approval_for_partial(world: SignerWorld) -> tuple[str, Call]:
    loan, valuation, psbt = liquidatable(world)
    prepared = world.prepare(loan, "liquidation", psbt, valuation["valuation_id"])
    return loan.loan_ref, approved(world, loan, "partial_liquidation", psbt, prepared)


def _approved_with_a_valuation(world: SignerWorld) -> tuple[str, Call]:
    loan, valuation, psbt = liquidatable(world)
    prepared = world.prepare(loan, "liquidation", psbt, valuation["valuation_id"])
    return loan.loan_ref, lambda: world.client.sign(
        loan.loan_ref,
        "liquidation",
        psbt,
        nonce=prepared["nonce"],
        approvals=world.approvals(prepared["statement"]),
        valuation_id=valuation["valuation_id"],
    )


def _unknown_loan_sign(world: SignerWorld) -> tuple[str, Call]:
    _, psbt, prepared = released(world)
    ghost = f"ghost-{secrets.token_hex(4)}"
    return ghost, lambda: world.client.sign(
        ghost,
        "release",
        psbt,
        nonce=prepared["nonce"],
        approvals=world.approvals(prepared["statement"]),
    )


def _unknown_loan_prepare(world: SignerWorld) -> tuple[str, Call]:
    _, psbt, _ = released(world)
    ghost = f"ghost-{secrets.token_hex(4)}"
    return ghost, lambda: world.client.prepare(ghost, "release", psbt)


def _payout_amended_after_approval(world: SignerWorld) -> tuple[str, Call]:
    loan, psbt, prepared = released(world)
    amendment = amend_statement(loan, miner_return_address=random_p2wpkh_address())
    world.client.amend_loan(amendment, world.approvals(amendment))
    return loan.loan_ref, approved(world, loan, "release", psbt, prepared)


def _deposit_after_approval(world: SignerWorld) -> tuple[str, Call]:
    loan, psbt, prepared = released(world)
    world.fund(loan, 100_000, index=1)
    return loan.loan_ref, approved(world, loan, "release", psbt, prepared)


REQUEST_ATTACKS = [
    Attack("automatic_release", _automatic_release, "automatic_action"),
    Attack(
        "automatic_release_on_liquidate_verdict",
        _automatic_release_on_a_liquidate_verdict,
        "automatic_action",
    ),
    Attack("automatic_partial_liquidation", _automatic_partial, "automatic_action"),
    Attack("automatic_with_approvals", _automatic_with_approvals, "automatic_action"),
    Attack("automatic_with_nonce", _automatic_with_nonce, "automatic_action"),
    Attack("approved_without_nonce", _no_nonce, "approval_missing"),
    Attack("unknown_nonce", _unknown_nonce, "approval_unknown_statement"),
    Attack("nonce_of_another_loan", _nonce_of_another_loan, "approval_unknown_statement"),
    Attack("replayed_statement", _replayed, "approval_replayed"),
    Attack("cancelled_statement", _cancelled, "approval_cancelled"),
    Attack("cancel_unknown_statement", _cancel_unknown, "approval_unknown_statement"),
    Attack("expired_statement", _expired, "approval_expired"),
    Attack("approval_of_txid_a_on_psbt_b", _other_txid, "approval_other_txid"),
    Attack(
        "release_approval_used_for_liquidation",
        _release_approval_for_liquidation,
        "approval_other_action",
    ),
    Attack(
        "liquidation_approval_used_for_partial",
        _liquidation_approval_for_partial,
        "approval_other_action",
    ),
    Attack("approved_path_names_a_valuation", _approved_with_a_valuation, "approval_format"),
    Attack("sign_for_unknown_loan", _unknown_loan_sign, "unknown_loan"),
    Attack("prepare_for_unknown_loan", _unknown_loan_prepare, "unknown_loan"),
    Attack(
        "payout_amended_between_approval_and_sign", _payout_amended_after_approval, "foreign_output"
    ),
    Attack("deposit_between_approval_and_sign", _deposit_after_approval, "collateral_not_spent"),
]


@pytest.mark.parametrize("attack", [a.param() for a in REQUEST_ATTACKS])
def test_forged_requests_are_refused(world: SignerWorld, attack: Attack) -> None:
    run(world, attack)


# --------------------------------------------------------------------------- evidence


def _automatic_on(make: Callable[[SignerWorld], tuple[Loan, dict[str, Any]]]) -> Setup:
    def setup(world: SignerWorld) -> tuple[str, Call]:
        loan, valuation = make(world)
        psbt = world.liquidation_psbt(loan, valuation)
        return loan.loan_ref, automatic(world, loan, psbt, valuation["valuation_id"])

    return setup


def _healthy(world: SignerWorld) -> tuple[Loan, dict[str, Any]]:
    loan = world.register_loan(principal_kopecks=5_000_000)  # LTV 62.5 % at 8M
    world.fund(loan, 1_000_000)
    valuation = world.client.valuation(loan.loan_ref)
    assert valuation["verdict"] == "ok", valuation
    return loan, valuation


def _no_collateral_yet(world: SignerWorld) -> tuple[Loan, dict[str, Any]]:
    now = datetime.now(UTC)
    loan = world.register_loan(
        principal_kopecks=5_000_000,
        start_at=iso(now - timedelta(days=2)),
        maturity_at=iso(now - timedelta(days=1)),
    )
    world.fund(loan, 1_000_000, confirmations=0)  # in the mempool only
    valuation = world.client.valuation(loan.loan_ref)
    assert valuation["verdict"] == "ok" and valuation["collateral_sats"] == 0
    fake = {**valuation, "debt_kopecks": 5_000_000, "price_rub_per_btc": "8000000"}
    return loan, {**fake, "valuation_id": valuation["valuation_id"]}


def _unknown_valuation(world: SignerWorld) -> tuple[str, Call]:
    loan, _, psbt = liquidatable(world)
    return loan.loan_ref, automatic(world, loan, psbt, secrets.token_urlsafe(18))


def _valuation_of_another_loan(world: SignerWorld) -> tuple[str, Call]:
    _, other_valuation, _ = liquidatable(world)
    loan, valuation = _healthy(world)
    psbt = world.liquidation_psbt(loan, {**valuation, "price_rub_per_btc": "8000000"})
    return loan.loan_ref, automatic(world, loan, psbt, other_valuation["valuation_id"])


def _no_valuation(world: SignerWorld) -> tuple[str, Call]:
    loan, _, psbt = liquidatable(world)
    return loan.loan_ref, automatic(world, loan, psbt, None)


def _priced(**evidence: Any) -> Setup:
    """An automatic liquidation whose PSBT was computed on figures other than the
    signer's own valuation."""

    def setup(world: SignerWorld) -> tuple[str, Call]:
        loan, valuation, _ = liquidatable(world)
        forged = {**valuation, **evidence}
        if callable(evidence.get("debt_kopecks")):
            forged["debt_kopecks"] = evidence["debt_kopecks"](valuation["debt_kopecks"])
        psbt = world.liquidation_psbt(loan, forged)
        return loan.loan_ref, automatic(world, loan, psbt, valuation["valuation_id"])

    return setup


def _four_eyes_liquidation_without_valuation(world: SignerWorld) -> tuple[str, Call]:
    loan, _, psbt = liquidatable(world)
    return loan.loan_ref, lambda: world.prepare(loan, "liquidation", psbt)


def _four_eyes_partial_with_another_loans_valuation(world: SignerWorld) -> tuple[str, Call]:
    _, other = margin_called(world)
    loan, valuation = margin_called(world)
    psbt = world.partial_psbt(loan, valuation, change_index=3)
    return loan.loan_ref, lambda: world.prepare(
        loan, "partial_liquidation", psbt, other["valuation_id"]
    )


def _four_eyes_liquidation_of_a_repaid_loan(world: SignerWorld) -> tuple[str, Call]:
    loan = world.register_loan(principal_kopecks=5_000_000)
    world.fund(loan, 1_000_000)
    repayment = repayment_statement(loan, amount_kopecks=5_000_000)
    world.client.record_repayment(repayment, world.approvals(repayment))
    valuation = world.client.valuation(loan.loan_ref)
    assert valuation["debt_kopecks"] == 0, valuation
    psbt = world.psbt(
        loan,
        [PayTo(loan.bank_liquidation, 100_000, "bank"), PayTo(loan.miner_return, 898_000, "miner")],
    )
    return loan.loan_ref, lambda: world.prepare(
        loan, "liquidation", psbt, valuation["valuation_id"]
    )


def _repaid_after_valuation(world: SignerWorld) -> tuple[str, Call]:
    """The signer said liquidate; then two people record that the debt was repaid in
    full. The earlier valuation must not still pay the bank its debt a second time."""
    loan, valuation, psbt = liquidatable(world)
    repayment = repayment_statement(loan, amount_kopecks=int(valuation["debt_kopecks"]))
    world.client.record_repayment(repayment, world.approvals(repayment))
    return loan.loan_ref, automatic(world, loan, psbt, valuation["valuation_id"])


def _amended_after_valuation(world: SignerWorld) -> tuple[str, Call]:
    """The signer said liquidate (matured); then two people extend the maturity."""
    loan, valuation, psbt = liquidatable(world)
    terms = {**loan.terms, "maturity_at": at(days=365)()}
    amendment = amend_statement(loan, terms=terms, bank_liquidation_address=loan.bank_liquidation)
    world.client.amend_loan(amendment, world.approvals(amendment))
    return loan.loan_ref, automatic(world, loan, psbt, valuation["valuation_id"])


def _repaid_between_prepare_and_sign(world: SignerWorld) -> tuple[str, Call]:
    loan, valuation, psbt = liquidatable(world)
    prepared = world.prepare(loan, "liquidation", psbt, valuation["valuation_id"])
    repayment = repayment_statement(loan, amount_kopecks=1_000_00)
    world.client.record_repayment(repayment, world.approvals(repayment))
    return loan.loan_ref, approved(world, loan, "liquidation", psbt, prepared)


EVIDENCE_ATTACKS = [
    Attack("automatic_while_verdict_ok", _automatic_on(_healthy), "not_liquidatable", "verdict ok"),
    Attack(
        "automatic_while_verdict_margin_call",
        _automatic_on(margin_called),
        "not_liquidatable",
        "verdict margin_call",
    ),
    Attack(
        "automatic_while_collateral_unconfirmed",
        _automatic_on(_no_collateral_yet),
        "not_liquidatable",
    ),
    Attack("automatic_unknown_valuation_id", _unknown_valuation, "valuation_unknown"),
    Attack("automatic_valuation_of_another_loan", _valuation_of_another_loan, "valuation_unknown"),
    Attack("automatic_without_valuation", _no_valuation, "valuation_missing"),
    Attack("psbt_priced_at_a_lower_price", _priced(price_rub_per_btc="5000000"), "bank_overpaid"),
    Attack(
        "psbt_priced_at_a_higher_price", _priced(price_rub_per_btc="12000000"), "bank_underpaid"
    ),
    Attack("psbt_with_debt_inflated", _priced(debt_kopecks=lambda d: d * 3 // 2), "bank_overpaid"),
    Attack("psbt_with_debt_understated", _priced(debt_kopecks=lambda d: d // 2), "bank_underpaid"),
    Attack(
        "automatic_on_a_valuation_older_than_a_full_repayment",
        _repaid_after_valuation,
        "valuation_outdated",
    ),
    Attack(
        "automatic_on_a_valuation_older_than_an_amendment",
        _amended_after_valuation,
        "valuation_outdated",
    ),
    Attack(
        "four_eyes_liquidation_repaid_between_prepare_and_sign",
        _repaid_between_prepare_and_sign,
        "valuation_outdated",
    ),
    Attack(
        "four_eyes_liquidation_without_valuation",
        _four_eyes_liquidation_without_valuation,
        "valuation_missing",
    ),
    Attack(
        "four_eyes_partial_with_another_loans_valuation",
        _four_eyes_partial_with_another_loans_valuation,
        "valuation_unknown",
    ),
    Attack(
        "four_eyes_liquidation_of_a_repaid_loan",
        _four_eyes_liquidation_of_a_repaid_loan,
        "nothing_owed",
    ),
]


@pytest.mark.parametrize("attack", [a.param() for a in EVIDENCE_ATTACKS])
def test_wrong_evidence_is_refused(world: SignerWorld, attack: Attack) -> None:
    run(world, attack)


# --------------------------------------------------------------------------- prices


def _feed(price: str, shift: timedelta | None = None) -> Setup:
    def setup(world: SignerWorld) -> tuple[str, Call]:
        loan = matured(world)
        world.feed.set(price, None if shift is None else datetime.now(UTC) + shift)
        return loan.loan_ref, lambda: world.client.valuation(loan.loan_ref)

    return setup


PRICE_FEED_ATTACKS = [
    Attack("feed_quote_stale_1000s", _feed("8000000", timedelta(seconds=-1000)), "price_stale"),
    Attack("feed_quote_a_day_old", _feed("8000000", timedelta(days=-1)), "price_stale"),
    Attack("feed_quote_dated_10min_ahead", _feed("8000000", timedelta(minutes=10)), "price_future"),
    Attack("feed_price_nan", _feed("NaN"), "price_sources", "not a number"),
    Attack("feed_price_infinity", _feed("Infinity"), "price_sources", "not a number"),
    Attack("feed_price_1e1000000", _feed("1E+1000000"), "price_sources", "ceiling"),
    Attack("feed_price_negative", _feed("-1"), "price_sources", "positive"),
    Attack("feed_price_zero", _feed("0"), "price_sources", "positive"),
    Attack("feed_price_below_a_satoshi_of_rub", _feed("1E-20"), "price_sources"),
    Attack(
        "feed_price_too_many_decimals",
        _feed("8000000." + "0" * 18 + "1"),
        "price_sources",
        "decimal places",
    ),
    Attack("feed_price_not_a_number", _feed("eight million"), "price_sources"),
]


@pytest.mark.parametrize("attack", [a.param() for a in PRICE_FEED_ATTACKS])
def test_bad_prices_refuse_the_valuation(world: SignerWorld, attack: Attack) -> None:
    run(world, attack)


def desk_statement(**over: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    statement: dict[str, Any] = {
        "kind": "desk_quote",
        "source": "desk",
        "price_rub_per_btc": "8000000",
        "quoted_at": iso(now),
        "expires_at": iso(now + timedelta(minutes=10)),
    }
    statement.update(over)
    return statement


def _desk(approve: Approve = signed_by("operator", "approver"), **over: Any) -> Setup:
    def setup(world: SignerWorld) -> tuple[str, Call]:
        statement = desk_statement(**_resolved(over))
        approvals = approve(world, statement)
        return "-", lambda: world.client.desk_quote(statement, approvals)

    return setup


def _desk_edited_after_signing(world: SignerWorld) -> tuple[str, Call]:
    statement = desk_statement(price_rub_per_btc="8000000")
    approvals = world.approvals(statement)
    moved = {**statement, "price_rub_per_btc": "7900000"}
    return "-", lambda: world.client.desk_quote(moved, approvals)


def at(**delta: float) -> Callable[[], str]:
    """A statement time relative to when the attack is set up (not to import time)."""
    return lambda: iso(datetime.now(UTC) + timedelta(**delta))


def _resolved(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v() if callable(v) else v for k, v in values.items()}


DESK_QUOTE_ATTACKS = [
    Attack(
        "desk_signed_by_unknown_people",
        _desk(strangers("bank_operator", "bank_approver")),
        "approval_unknown_person",
    ),
    Attack("desk_signed_by_one_operator", _desk(signed_by("operator")), "approval_roles"),
    Attack(
        "desk_signed_by_two_operators", _desk(signed_by("operator", "operator2")), "approval_roles"
    ),
    Attack("desk_price_edited_after_signing", _desk_edited_after_signing, "approval_signature"),
    Attack("desk_extra_key", _desk(venue="moex"), "desk_quote", "unexpected keys"),
    Attack("desk_source_not_desk", _desk(source="feed"), "desk_quote"),
    Attack("desk_price_nan", _desk(price_rub_per_btc="NaN"), "desk_quote"),
    Attack(
        "desk_price_as_json_number",
        _desk(price_rub_per_btc=8000000),
        "desk_quote",
        "decimal string",
    ),
    Attack(
        "desk_quote_stale",
        _desk(quoted_at=at(hours=-1), expires_at=at(hours=1)),
        "desk_quote_stale",
    ),
    Attack(
        "desk_quote_dated_ahead",
        _desk(quoted_at=at(hours=1), expires_at=at(hours=2)),
        "desk_quote_future",
    ),
    Attack(
        "desk_quote_expired",
        _desk(quoted_at=at(minutes=-5), expires_at=at(minutes=-1)),
        "desk_quote_expired",
    ),
    Attack(
        "desk_quote_not_in_utc",
        _desk(
            quoted_at=lambda: (
                datetime.now(UTC)
                .astimezone(timezone(timedelta(hours=3)))
                .isoformat(timespec="seconds")
            )
        ),
        "desk_quote",
        "not in UTC",
    ),
]


@pytest.mark.parametrize("attack", [a.param() for a in DESK_QUOTE_ATTACKS])
def test_bad_desk_quotes_are_refused(world: SignerWorld, attack: Attack) -> None:
    run(world, attack)
    assert (
        world.client.valuation(matured(world).loan_ref)["price"]["quotes"][0]["source"] == "feed"
    ), "a refused desk quote is being used"


# --------------------------------------------------------------------------- collateral


def _collateral(
    change: Callable[[SignerWorld, Loan, PSBT], object],
    before: Callable[[SignerWorld, Loan], object] | None = None,
) -> Setup:
    """An automatic liquidation of a loan the signer itself says must be liquidated,
    with its inputs tampered."""

    def setup(world: SignerWorld) -> tuple[str, Call]:
        loan = matured(world)
        if before is not None:
            before(world, loan)
        valuation = world.client.valuation(loan.loan_ref)
        assert valuation["verdict"] == "liquidate", valuation
        honest = world.liquidation_psbt(loan, valuation)
        psbt = edit(honest, lambda p: change(world, loan, p))
        return loan.loan_ref, automatic(world, loan, psbt, valuation["valuation_id"])

    return setup


def _drop_second_coin(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    gone = psbt.inputs.pop()
    psbt.outputs[-1].value -= gone.witness_utxo.value


def _never_mined(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    add_input(psbt, secrets.token_hex(32), 0)


def _unconfirmed(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    coin = world.fund(loan, 200_000, index=1, confirmations=0)
    add_input(psbt, coin.txid, coin.vout)
    psbt.outputs[-1].value += 200_000


def _foreign(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    other = other_loans_psbt(world)
    psbt.inputs.append(other.inputs[0])
    psbt.outputs[-1].value += other.inputs[0].witness_utxo.value


def _random_address_coin(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    txid, vout = paid_elsewhere(world)
    add_input(psbt, txid, vout)


def _spent(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    txid, vout = spent_outpoint(world)
    add_input(psbt, txid, vout)


def _twice(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    psbt.inputs.append(copy.deepcopy(psbt.inputs[0]))


def _beyond_the_gap(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    coin = world.fund(loan, 100_000, index=60)  # the signer scans highest + 5
    add_input(psbt, coin.txid, coin.vout)


def _huge_vout(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    add_input(psbt, psbt.inputs[0].txid.hex(), 0xFFFFFFFF)


COLLATERAL_ATTACKS = [
    Attack(
        "spends_a_subset_of_the_coins",
        _collateral(_drop_second_coin, lambda w, loan: w.fund(loan, 300_000, index=1)),
        "collateral_not_spent",
    ),
    Attack("coin_never_mined", _collateral(_never_mined), "input_unknown"),
    Attack("unconfirmed_deposit", _collateral(_unconfirmed), "input_unconfirmed"),
    Attack("coin_of_another_loan", _collateral(_foreign), "foreign_input"),
    Attack("coin_paying_a_random_address", _collateral(_random_address_coin), "foreign_input"),
    Attack("spent_coin", _collateral(_spent), "input_unknown"),
    Attack("same_coin_twice", _collateral(_twice), "duplicate_input"),
    Attack("loan_coin_beyond_the_scan_gap", _collateral(_beyond_the_gap), "foreign_input"),
    Attack("outpoint_index_0xffffffff", _collateral(_huge_vout), "input_unknown"),
]


@pytest.mark.parametrize("attack", [a.param() for a in COLLATERAL_ATTACKS])
def test_wrong_collateral_is_refused(world: SignerWorld, attack: Attack) -> None:
    run(world, attack)


def test_spent_collateral_is_not_signed_again(world: SignerWorld) -> None:
    """A loan released and mined, then funded again: a PSBT that still names the
    spent coin is refused at prepare."""
    loan, psbt, prepared = released(world)
    old = loan.coins[0]
    signed: Any = approved(world, loan, "release", psbt, prepared)()
    world.broadcast(signed.psbt, loan, with_seat="miner")
    world.fund(loan, 300_000, index=1)
    again = world.release_psbt(loan, [old, loan.coins[1]])
    assert_refused(
        world,
        loan.loan_ref,
        "input_unknown",
        lambda: world.prepare(loan, "release", again),
        old.txid,
    )


# --------------------------------------------------------------------------- registration


def _register(
    edit_before: Callable[[SignerWorld, dict[str, Any]], object] | None = None,
    approve: Approve = signed_by("operator", "approver"),
    edit_after: Callable[[SignerWorld, dict[str, Any]], object] | None = None,
) -> Setup:
    def setup(world: SignerWorld) -> tuple[str, Call]:
        statement, _, _ = world.registration()
        if edit_before is not None:
            edit_before(world, statement)
        approvals = approve(world, statement)
        if edit_after is not None:
            edit_after(world, statement)
        ref = statement.get("loan_ref")
        return (ref if isinstance(ref, str) else "-")[:64], lambda: world.client.register_loan(
            statement, approvals
        )

    return setup


def put(**values: Any) -> Callable[[SignerWorld, dict[str, Any]], None]:
    return lambda world, st: st.update(_resolved(values))


def put_terms(**values: Any) -> Callable[[SignerWorld, dict[str, Any]], None]:
    return lambda world, st: st["terms"].update(_resolved(values))


def drop(key: str) -> Callable[[SignerWorld, dict[str, Any]], None]:
    return lambda world, st: st.pop(key)


def _same_keys(world: SignerWorld, st: dict[str, Any]) -> None:
    st["arbiter_key"] = st["miner_key"]


def _xprv(world: SignerWorld, st: dict[str, Any]) -> None:
    root = EmbitHDKey.from_seed(secrets.token_bytes(32), version=bytes.fromhex("04358394"))
    origin = st["miner_key"].split("]")[0] + "]"
    st["miner_key"] = origin + root.derive("m/48h/1h/0h/2h").to_base58()


def _mainnet_xpub(world: SignerWorld, st: dict[str, Any]) -> None:
    root = EmbitHDKey.from_seed(secrets.token_bytes(32))
    fp = root.my_fingerprint.hex()
    st["miner_key"] = f"[{fp}/48h/0h/0h/2h]" + root.derive("m/48h/0h/0h/2h").to_public().to_base58()


def _swap_bank_address(world: SignerWorld, st: dict[str, Any]) -> None:
    st["bank_liquidation_address"] = random_p2wpkh_address()


def _swap_miner_key(world: SignerWorld, st: dict[str, Any]) -> None:
    st["miner_key"] = software_party().account_key_text()


def _one_address(world: SignerWorld, st: dict[str, Any]) -> None:
    st["bank_liquidation_address"] = st["miner_return_address"]


REGISTRATION_ATTACKS = [
    Attack(
        "register_signed_by_unenrolled_people",
        _register(approve=strangers("bank_operator", "bank_approver")),
        "approval_unknown_person",
    ),
    Attack(
        "register_signed_by_one_person", _register(approve=signed_by("approver")), "approval_roles"
    ),
    Attack(
        "register_signed_by_two_operators",
        _register(approve=signed_by("operator", "operator2")),
        "approval_roles",
    ),
    Attack(
        "register_signed_by_two_approvers",
        _register(approve=signed_by("approver", "approver2")),
        "approval_roles",
    ),
    Attack(
        "register_signed_by_two_admins",
        _register(approve=signed_by("admin1", "admin2")),
        "approval_roles",
    ),
    Attack(
        "register_signed_by_one_person_twice",
        _register(approve=signed_by("approver", "approver")),
        "approval_duplicate",
    ),
    Attack(
        "register_bank_address_swapped_after_signing",
        _register(edit_after=_swap_bank_address),
        "approval_signature",
    ),
    Attack(
        "register_miner_key_swapped_after_signing",
        _register(edit_after=_swap_miner_key),
        "approval_signature",
    ),
    Attack(
        "register_principal_raised_after_signing",
        _register(edit_after=put_terms(principal_kopecks=900_000_00)),
        "approval_signature",
    ),
    Attack(
        "register_garbage_signature",
        _register(approve=with_signature("approver", "!!!!")),
        "approval_signature",
    ),
    Attack("register_expired", _register(put(expires_at=at(minutes=-5))), "approval_expired"),
    Attack(
        "register_valid_8_days", _register(put(expires_at=at(days=8))), "approval_expiry", "7 days"
    ),
    Attack(
        "register_mainnet_miner_address",
        _register(put(miner_return_address=MAINNET_ADDRESS)),
        "invalid_input",
        "mainnet",
    ),
    Attack(
        "register_testnet_bank_address",
        _register(put(bank_liquidation_address=TESTNET_ADDRESS)),
        "invalid_input",
    ),
    Attack("register_network_mainnet", _register(put(network="mainnet")), "network"),
    Attack("register_network_missing_value", _register(put(network=None)), "network"),
    Attack(
        "register_principal_as_string",
        _register(put_terms(principal_kopecks="40000000")),
        "statement_format",
        "principal_kopecks",
    ),
    Attack(
        "register_principal_as_float",
        _register(edit_after=put_terms(principal_kopecks=40_000_000.0)),
        "statement_format",
    ),
    Attack(
        "register_interest_as_float",
        _register(edit_after=put_terms(interest_rate_bps=0.5)),
        "statement_format",
    ),
    Attack(
        "register_principal_as_bool",
        _register(put_terms(principal_kopecks=True)),
        "statement_format",
    ),
    Attack(
        "register_principal_zero", _register(put_terms(principal_kopecks=0)), "statement_format"
    ),
    Attack(
        "register_principal_above_the_cap",
        _register(put_terms(principal_kopecks=10**16)),
        "statement_format",
    ),
    Attack(
        "register_negative_interest", _register(put_terms(interest_rate_bps=-1)), "statement_format"
    ),
    Attack(
        "register_zero_confirmations",
        _register(put_terms(required_confirmations=0)),
        "statement_format",
        "required_confirmations",
    ),
    Attack("register_missing_key", _register(drop("bank_liquidation_address")), "statement_format"),
    Attack(
        "register_extra_key", _register(put(bank_public_key="02" + "11" * 32)), "statement_format"
    ),
    # The caller names the bank key itself: the statement only chooses its kind.
    Attack("register_own_bank_key", _register(put(bank_key="02" + "11" * 32)), "invalid_input"),
    Attack("register_extra_terms_key", _register(put_terms(grace_days=30)), "statement_format"),
    Attack(
        "register_ltvs_do_not_rise",
        _register(put_terms(margin_call_ltv_bps=9_500, liquidation_ltv_bps=9_000)),
        "terms",
    ),
    Attack(
        "register_target_above_margin_call", _register(put_terms(target_ltv_bps=8_000)), "terms"
    ),
    Attack(
        "register_maturity_before_start", _register(put_terms(maturity_at=at(days=-30))), "terms"
    ),
    Attack(
        "register_time_without_zone",
        _register(put_terms(start_at="2025-01-01T00:00:00")),
        "statement_format",
    ),
    Attack("register_same_payout_addresses", _register(_one_address), "payout_addresses"),
    Attack("register_miner_private_key", _register(_xprv), "invalid_input", "private keys"),
    Attack("register_mainnet_xpub", _register(_mainnet_xpub), "invalid_input"),
    Attack("register_miner_key_as_arbiter_key", _register(_same_keys), "invalid_input", "same key"),
    Attack("register_wrong_kind", _register(put(kind="enroll")), "statement_kind"),
    Attack(
        "register_loan_ref_not_a_key_label",
        _register(put(loan_ref="../evil loan")),
        "invalid_input",
        "loan_ref",
    ),
]


@pytest.mark.parametrize("attack", [a.param() for a in REGISTRATION_ATTACKS])
def test_bad_registrations_are_refused(world: SignerWorld, attack: Attack) -> None:
    loan_ref, call = attack.setup(world)
    assert_refused(world, loan_ref, attack.check, call, attack.reason)
    with signer_registry(world) as registry:
        assert registry.loan(loan_ref) is None, "a refused registration recorded a loan"
    transport = world.client.transport
    if isinstance(transport, InProcessTransport):  # the serve process's token is its own
        with pytest.raises(SignerRefused):
            transport.core.hsm.key_info(key_ref_for_loan(loan_ref))  # no key was made


def test_registering_a_loan_twice_is_refused(world: SignerWorld) -> None:
    statement, _, _ = world.registration()
    world.client.register_loan(statement, world.approvals(statement))
    # the same statement again, with valid approvals
    assert_refused(
        world,
        statement["loan_ref"],
        "loan_registered",
        lambda: world.client.register_loan(statement, world.approvals(statement)),
    )
    # a new statement (new keys, new addresses) for the same loan_ref
    again, _, _ = world.registration(statement["loan_ref"])
    assert_refused(
        world,
        statement["loan_ref"],
        "loan_registered",
        lambda: world.client.register_loan(again, world.approvals(again)),
    )
    record = world.client.loan(statement["loan_ref"])
    assert record["miner_return_address"] == statement["miner_return_address"]


def test_reusing_another_loans_miner_and_arbiter_keys_is_accepted(world: SignerWorld) -> None:
    """FINDING (reported, not asserted as a refusal): the signer accepts a second loan
    with an existing loan's miner and arbiter keys. Its descriptor differs only by the
    new bank key, so neither loan's coins are spendable as the other's collateral."""
    first = world.register_loan()
    statement, _, _ = world.registration()
    statement["miner_key"] = first.miner.account_key_text()
    statement["arbiter_key"] = first.arbiter.account_key_text()
    record = world.client.register_loan(statement, world.approvals(statement))
    assert record["descriptor"] != first.record["descriptor"]
    assert record["public_key"] != first.record["public_key"]
    # the collateral of one is still foreign to the other
    world.fund(first, 200_000)
    second = Loan(
        record["loan_ref"], record, first.descriptor, first.miner, first.arbiter, statement["terms"]
    )
    psbt = world.release_psbt(first)
    assert_refused(
        world, second.loan_ref, "foreign_input", lambda: world.prepare(second, "release", psbt)
    )


# --------------------------------------------------------------------------- amendments


def amend_statement(loan: Loan, **over: Any) -> dict[str, Any]:
    statement: dict[str, Any] = {
        "kind": "amend_loan",
        "network": NETWORK,
        "loan_ref": loan.loan_ref,
        "terms": dict(loan.terms),
        "miner_return_address": loan.miner_return,
        "bank_liquidation_address": random_p2wpkh_address(),
        "expires_at": expires(),
    }
    statement.update(over)
    return statement


def _amend(
    approve: Approve = signed_by("operator", "approver"),
    edit_before: Callable[[dict[str, Any]], object] | None = None,
    edit_after: Callable[[dict[str, Any]], object] | None = None,
) -> Setup:
    def setup(world: SignerWorld) -> tuple[str, Call]:
        loan = world.register_loan()
        statement = amend_statement(loan)
        if edit_before is not None:
            edit_before(statement)
        approvals = approve(world, statement)
        if edit_after is not None:
            edit_after(statement)
        ref = statement["loan_ref"]
        return ref, lambda: world.client.amend_loan(statement, approvals)

    return setup


def _amend_with_registration_approvals(world: SignerWorld) -> tuple[str, Call]:
    registration, _, _ = world.registration()
    world.client.register_loan(registration, world.approvals(registration))
    statement = {
        k: v for k, v in registration.items() if k not in ("miner_key", "arbiter_key", "bank_key")
    }
    statement.update(kind="amend_loan", bank_liquidation_address=random_p2wpkh_address())
    return registration["loan_ref"], lambda: world.client.amend_loan(
        statement, world.approvals(registration)
    )


def _amend_replayed(older_first: bool) -> Setup:
    """Two amendments two people signed, then the older one sent again: the loan's
    payout address would revert to the one the newer amendment replaced."""

    def setup(world: SignerWorld) -> tuple[str, Call]:
        loan = world.register_loan()
        first = amend_statement(loan)
        first_approvals = world.approvals(first)
        world.client.amend_loan(first, first_approvals)
        if older_first:
            second = amend_statement(loan)
            world.client.amend_loan(second, world.approvals(second))

        def call() -> object:
            try:
                return world.client.amend_loan(first, first_approvals)
            finally:
                if older_first:
                    now = world.client.loan(loan.loan_ref)["bank_liquidation_address"]
                    assert now == second["bank_liquidation_address"], "an old amendment won"

        return loan.loan_ref, call

    return setup


AMENDMENT_ATTACKS = [
    Attack("amend_payout_without_approvals", _amend(approve=lambda w, st: []), "approval_roles"),
    Attack(
        "amend_payout_with_one_approval", _amend(approve=signed_by("operator")), "approval_roles"
    ),
    Attack(
        "amend_payout_signed_by_strangers",
        _amend(approve=strangers("bank_operator", "bank_approver")),
        "approval_unknown_person",
    ),
    Attack(
        "amend_payout_approvals_of_another_statement",
        _amend(edit_after=lambda st: st.update(bank_liquidation_address=random_p2wpkh_address())),
        "approval_signature",
    ),
    Attack(
        "amend_with_the_registrations_approvals",
        _amend_with_registration_approvals,
        "approval_signature",
    ),
    Attack(
        "amend_unknown_loan",
        _amend(edit_before=lambda st: st.update(loan_ref=f"ghost-{secrets.token_hex(4)}")),
        "unknown_loan",
    ),
    Attack(
        "amend_expired",
        _amend(edit_before=lambda st: st.update(expires_at=at(hours=-1)())),
        "approval_expired",
    ),
    Attack(
        "amend_ltvs_do_not_rise",
        _amend(
            edit_before=lambda st: st.update(terms={**st["terms"], "liquidation_ltv_bps": 7_000})
        ),
        "terms",
    ),
    Attack(
        "amend_to_a_mainnet_address",
        _amend(edit_before=lambda st: st.update(miner_return_address=MAINNET_ADDRESS)),
        "invalid_input",
        "mainnet",
    ),
    Attack(
        "amend_replay_of_the_same_amendment",
        _amend_replayed(older_first=False),
        "approval_replayed",
    ),
    Attack(
        "amend_replay_of_an_older_amendment", _amend_replayed(older_first=True), "approval_replayed"
    ),
]


@pytest.mark.parametrize("attack", [a.param() for a in AMENDMENT_ATTACKS])
def test_bad_amendments_are_refused(world: SignerWorld, attack: Attack) -> None:
    run(world, attack)


# --------------------------------------------------------------------------- repayments


def repayment_statement(loan: Loan, **over: Any) -> dict[str, Any]:
    statement: dict[str, Any] = {
        "kind": "repayment",
        "network": NETWORK,
        "loan_ref": loan.loan_ref,
        "repayment_id": f"rp-{secrets.token_hex(4)}",
        "amount_kopecks": 1_000_00,
        "paid_at": iso(datetime.now(UTC) - timedelta(minutes=5)),
        "expires_at": expires(),
    }
    statement.update(over)
    return statement


def _repay(
    approve: Approve = signed_by("operator", "approver"),
    edit_before: Callable[[dict[str, Any]], object] | None = None,
    edit_after: Callable[[dict[str, Any]], object] | None = None,
    first: bool = False,
) -> Setup:
    def setup(world: SignerWorld) -> tuple[str, Call]:
        loan = world.register_loan()
        statement = repayment_statement(loan)
        if first:
            world.client.record_repayment(statement, world.approvals(statement))
            statement = {**statement, "amount_kopecks": statement["amount_kopecks"] * 10}
        if edit_before is not None:
            edit_before(statement)
        approvals = approve(world, statement)
        if edit_after is not None:
            edit_after(statement)
        return statement["loan_ref"], lambda: world.client.record_repayment(statement, approvals)

    return setup


REPAYMENT_ATTACKS = [
    Attack(
        "repayment_signed_by_one_operator", _repay(approve=signed_by("operator")), "approval_roles"
    ),
    Attack(
        "repayment_signed_by_strangers",
        _repay(approve=strangers("bank_operator", "bank_approver")),
        "approval_unknown_person",
    ),
    Attack(
        "repayment_amount_raised_after_signing",
        _repay(edit_after=lambda st: st.update(amount_kopecks=st["amount_kopecks"] * 100)),
        "approval_signature",
    ),
    Attack(
        "repayment_dated_in_the_future",
        _repay(edit_before=lambda st: st.update(paid_at=at(days=1)())),
        "repayment_future",
    ),
    Attack(
        "repayment_amount_as_string",
        _repay(edit_before=lambda st: st.update(amount_kopecks="100000")),
        "statement_format",
    ),
    Attack(
        "repayment_amount_as_float",
        _repay(edit_after=lambda st: st.update(amount_kopecks=100000.0)),
        "statement_format",
    ),
    Attack("repayment_same_id_other_amount", _repay(first=True), "repayment_conflict"),
    Attack(
        "repayment_unknown_loan",
        _repay(edit_before=lambda st: st.update(loan_ref=f"ghost-{secrets.token_hex(4)}")),
        "unknown_loan",
    ),
]


@pytest.mark.parametrize("attack", [a.param() for a in REPAYMENT_ATTACKS])
def test_bad_repayments_are_refused(world: SignerWorld, attack: Attack) -> None:
    run(world, attack)


# --------------------------------------------------------------------------- people


def enrol_statement(**over: Any) -> dict[str, Any]:
    person = new_staff(f"new.{secrets.token_hex(4)}", "bank_approver")
    statement: dict[str, Any] = {
        "kind": "enroll",
        "name": person.name,
        "role": person.role,
        "algorithm": "ed25519",
        "public_key": person.public_hex,
        "expires_at": expires(),
    }
    statement.update(over)
    return statement


def _people(
    op: str,
    make: Callable[[SignerWorld], dict[str, Any]],
    approve: Approve = signed_by("admin1", "admin2"),
) -> Setup:
    def setup(world: SignerWorld) -> tuple[str, Call]:
        statement = make(world)
        approvals = approve(world, statement)
        call = world.client.enroll if op == "enroll" else world.client.remove
        return "-", lambda: call(statement, approvals)

    return setup


def _removal(name_of: Callable[[SignerWorld], str]) -> Callable[[SignerWorld], dict[str, Any]]:
    return lambda w: {"kind": "remove", "name": name_of(w), "expires_at": expires()}


PEOPLE_ATTACKS = [
    Attack(
        "enrol_signed_by_one_admin",
        _people("enroll", lambda w: enrol_statement(), signed_by("admin1")),
        "approval_roles",
    ),
    Attack(
        "enrol_signed_by_operator_and_approver",
        _people("enroll", lambda w: enrol_statement(), signed_by("operator", "approver")),
        "approval_roles",
    ),
    Attack(
        "enrol_signed_by_one_admin_twice",
        _people("enroll", lambda w: enrol_statement(), signed_by("admin1", "admin1")),
        "approval_duplicate",
    ),
    Attack(
        "enrol_signed_by_unknown_admins",
        _people("enroll", lambda w: enrol_statement(), strangers("admin", "admin")),
        "approval_unknown_person",
    ),
    Attack(
        "enrol_expired",
        _people(
            "enroll",
            lambda w: enrol_statement(expires_at=iso(datetime.now(UTC) - timedelta(seconds=1))),
        ),
        "approval_expired",
    ),
    Attack(
        "enrol_valid_8_days",
        _people(
            "enroll",
            lambda w: enrol_statement(expires_at=iso(datetime.now(UTC) + timedelta(days=8))),
        ),
        "approval_expiry",
    ),
    Attack(
        "enrol_an_enrolled_name_with_a_new_key",
        _people("enroll", lambda w: enrol_statement(name=w.staff["approver"].name)),
        "enrolment",
        "already enrolled",
    ),
    Attack(
        "enrol_an_enrolled_key_under_a_new_name",
        _people("enroll", lambda w: enrol_statement(public_key=w.staff["approver"].public_hex)),
        "enrolment",
        "already enrolled",
    ),
    Attack(
        "enrol_unknown_role",
        _people("enroll", lambda w: enrol_statement(role="root")),
        "enrolment",
        "unknown role",
    ),
    Attack(
        "enrol_invalid_public_key",
        _people("enroll", lambda w: enrol_statement(public_key="00" * 31)),
        "enrolment",
    ),
    Attack(
        "enrol_extra_key",
        _people("enroll", lambda w: enrol_statement(may_sign_alone=True)),
        "statement_format",
    ),
    Attack(
        "remove_an_admin_signed_by_that_admin",
        _people("remove", _removal(lambda w: w.staff["admin1"].name)),
        "enrolment",
        "own removal",
    ),
    Attack(
        "remove_signed_by_one_admin",
        _people("remove", _removal(lambda w: w.staff["approver2"].name), signed_by("admin2")),
        "approval_roles",
    ),
    Attack(
        "remove_signed_by_operator_and_approver",
        _people(
            "remove", _removal(lambda w: w.staff["admin2"].name), signed_by("operator", "approver")
        ),
        "approval_roles",
    ),
]


@pytest.mark.parametrize("attack", [a.param() for a in PEOPLE_ATTACKS])
def test_bad_enrolments_and_removals_are_refused(world: SignerWorld, attack: Attack) -> None:
    run(world, attack)
    names = {s.name for s in world.staff.values()}
    with signer_registry(world) as registry:
        active = {
            r["name"]
            for r in registry.read_all("SELECT name FROM person WHERE removed_at IS NULL", ())
        }
    assert names <= active, "an attack removed an enrolled person"


# --------------------------------------------------------------------------- shape


def _shape(change: Callable[[SignerWorld, Loan, str], str]) -> Setup:
    """An automatic liquidation the signer itself calls for, with the PSBT tampered."""

    def setup(world: SignerWorld) -> tuple[str, Call]:
        loan, valuation, honest = liquidatable(world)
        psbt = change(world, loan, honest)
        assert psbt != honest
        return loan.loan_ref, automatic(world, loan, psbt, valuation["valuation_id"])

    return setup


def on_psbt(change: Callable[[SignerWorld, Loan, PSBT], object]) -> Setup:
    return _shape(lambda world, loan, b64: edit(b64, lambda p: change(world, loan, p)))


def on_tx(change: Callable[[Transaction], object]) -> Setup:
    return _shape(lambda world, loan, b64: splice_unsigned_tx(b64, change))


def _set(attr: str, value: Any, index: int = 0, where: str = "inputs") -> Setup:
    return on_psbt(lambda w, loan, p: setattr(getattr(p, where)[index], attr, value))


def _locktime_above_tip(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    psbt.locktime = world.node.rpc.get_block_count() + 100


def _locktime_at_tip(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    psbt.locktime = world.node.rpc.get_block_count() + 1


def _move(sats: int, to: int, frm: int) -> Callable[[SignerWorld, Loan, PSBT], None]:
    def change(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
        psbt.outputs[to].value += sats
        psbt.outputs[frm].value -= sats

    return change


def _extra_output(
    script: Callable[[Loan], Script], sats: int = 10_000
) -> Callable[[SignerWorld, Loan, PSBT], None]:
    def change(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
        psbt.outputs[1].value -= sats
        add_output(psbt, sats, script(loan))

    return change


def _redirect(index: int) -> Callable[[SignerWorld, Loan, PSBT], None]:
    def change(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
        psbt.outputs[index].script_pubkey = attacker_spk()

    return change


def _bank_takes_all(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    miner = psbt.outputs.pop()
    psbt.outputs[0].value += miner.value


def _bank_dropped(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    bank = psbt.outputs.pop(0)
    psbt.outputs[0].value += bank.value


def _split_bank(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    psbt.outputs[0].value -= 100_000
    add_output(psbt, 100_000, Script(psbt.outputs[0].script_pubkey.data))


def _zero_miner(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    psbt.outputs[0].value += psbt.outputs[1].value
    psbt.outputs[1].value = 0


def _no_outputs(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    psbt.outputs.clear()


def _other_witness_script(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    psbt.inputs[0].witness_script = Script(loan.descriptor.witness_script(1, False))


def _witness_utxo_script(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    psbt.inputs[0].witness_utxo.script_pubkey = attacker_spk()


def _witness_utxo_inflated(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    psbt.inputs[0].witness_utxo.value += 500_000
    psbt.outputs[1].value += 500_000


def _non_witness_utxo_other(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    txid, _ = paid_elsewhere(world)
    psbt.inputs[0].non_witness_utxo = Transaction.parse(world.node.rpc.get_raw_transaction(txid))


def _finalized(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    psbt.inputs[0].final_scriptwitness = Witness([b"", b"\x01" * 71])


def _redeem_script(world: SignerWorld, loan: Loan, psbt: PSBT) -> None:
    psbt.inputs[0].redeem_script = Script(b"\x00\x20" + b"\x11" * 32)


def _script_sig(tx: Transaction) -> None:
    tx.vin[0].script_sig = Script(b"\x51")


def _zero_sequence(tx: Transaction) -> None:
    tx.vin[0].sequence = 0


def _op_return(loan: Loan) -> Script:
    return Script(b"\x6a\x04pwnd")


def _own_descriptor(loan: Loan) -> Script:
    return Script(loan.descriptor.script_pubkey(4, False))


SHAPE_ATTACKS = [
    Attack("locktime_above_the_tip", on_psbt(_locktime_above_tip), "locktime", "above"),
    Attack("locktime_next_block", on_psbt(_locktime_at_tip), "locktime"),
    Attack(
        "locktime_a_timestamp",
        on_psbt(lambda w, loan, p: setattr(p, "locktime", 1_700_000_000)),
        "locktime",
        "timestamp",
    ),
    Attack("tx_version_1", on_psbt(lambda w, loan, p: setattr(p, "tx_version", 1)), "tx_version"),
    Attack("tx_version_3", on_psbt(lambda w, loan, p: setattr(p, "tx_version", 3)), "tx_version"),
    Attack(
        "tx_version_0xffffffff",
        on_psbt(lambda w, loan, p: setattr(p, "tx_version", 0xFFFFFFFF)),
        "tx_version",
    ),
    Attack("sequence_relative_lock_10_blocks", _set("sequence", 10), "sequence"),
    Attack("sequence_relative_lock_by_time", _set("sequence", (1 << 22) | 100), "sequence"),
    Attack("sequence_0xfffffffe", _set("sequence", 0xFFFFFFFE), "sequence"),
    Attack("sequence_0", on_tx(_zero_sequence), "psbt_format", "re-serialisation"),
    Attack("script_sig_in_unsigned_tx", on_tx(_script_sig), "psbt_format"),
    Attack("sighash_none", _set("sighash_type", SIGHASH.NONE), "sighash", "SIGHASH_NONE"),
    Attack("sighash_single", _set("sighash_type", SIGHASH.SINGLE), "sighash", "SIGHASH_SINGLE"),
    Attack(
        "sighash_all_anyonecanpay",
        _set("sighash_type", SIGHASH.ALL | SIGHASH.ANYONECANPAY),
        "sighash",
        "ANYONECANPAY",
    ),
    Attack(
        "sighash_none_anyonecanpay",
        _set("sighash_type", SIGHASH.NONE | SIGHASH.ANYONECANPAY),
        "sighash",
    ),
    Attack("sighash_default_taproot_style", _set("sighash_type", SIGHASH.DEFAULT), "sighash"),
    Attack("witness_script_of_another_index", on_psbt(_other_witness_script), "witness_script"),
    Attack("witness_utxo_script_changed", on_psbt(_witness_utxo_script), "witness_utxo_script"),
    Attack("witness_utxo_amount_inflated", on_psbt(_witness_utxo_inflated), "witness_utxo_amount"),
    Attack("witness_utxo_missing", _set("witness_utxo", None), "witness_utxo"),
    Attack("non_witness_utxo_of_another_tx", on_psbt(_non_witness_utxo_other), "non_witness_utxo"),
    Attack("input_already_finalized", on_psbt(_finalized), "finalized_input"),
    Attack("input_with_a_redeem_script", on_psbt(_redeem_script), "input_script"),
    Attack(
        "extra_output_to_an_attacker",
        on_psbt(_extra_output(lambda loan: attacker_spk())),
        "foreign_output",
    ),
    Attack("extra_op_return_output", on_psbt(_extra_output(_op_return, 0)), "foreign_output"),
    Attack(
        "extra_output_back_to_the_loan", on_psbt(_extra_output(_own_descriptor)), "foreign_output"
    ),
    Attack("miner_output_redirected", on_psbt(_redirect(1)), "foreign_output"),
    Attack("bank_output_redirected", on_psbt(_redirect(0)), "foreign_output"),
    Attack("duplicate_bank_output", on_psbt(_split_bank), "duplicate_output"),
    Attack("bank_overpaid_by_1000", on_psbt(_move(1_000, to=0, frm=1)), "bank_overpaid"),
    Attack("bank_underpaid_by_1000", on_psbt(_move(1_000, to=1, frm=0)), "bank_underpaid"),
    Attack("bank_takes_everything", on_psbt(_bank_takes_all), "bank_overpaid"),
    Attack("nothing_to_the_bank", on_psbt(_bank_dropped), "missing_output"),
    Attack("zero_value_miner_output", on_psbt(_zero_miner), "output_amount"),
    Attack(
        "fee_above_the_cap",
        on_psbt(lambda w, loan, p: setattr(p.outputs[1], "value", p.outputs[1].value - 30_000)),
        "fee_cap",
    ),
    Attack(
        "outputs_above_inputs",
        on_psbt(lambda w, loan, p: setattr(p.outputs[1], "value", p.outputs[1].value + 10_000)),
        "fee",
    ),
    Attack("no_outputs", on_psbt(_no_outputs), "psbt_format"),
]


@pytest.mark.parametrize("attack", [a.param() for a in SHAPE_ATTACKS])
def test_bad_transaction_shapes_are_refused(world: SignerWorld, attack: Attack) -> None:
    run(world, attack)


def _release_outputs(outputs: Callable[[Loan, int], list[PayTo | PayToCollateral]]) -> Setup:
    def setup(world: SignerWorld) -> tuple[str, Call]:
        loan = world.register_loan()
        world.fund(loan, 500_000)
        psbt = world.psbt(loan, outputs(loan, 500_000 - 2_000))
        return loan.loan_ref, lambda: world.prepare(loan, "release", psbt)

    return setup


def _after_approval(change: Callable[[SignerWorld, Loan, PSBT], object]) -> Setup:
    """A release approved by two people, then the PSBT changed in a way that keeps its
    txid (so the statement still names it): the signer re-checks at signing."""

    def setup(world: SignerWorld) -> tuple[str, Call]:
        loan, psbt, prepared = released(world)
        tampered = edit(psbt, lambda p: change(world, loan, p))
        assert PSBT.from_string(tampered).tx.txid() == PSBT.from_string(psbt).tx.txid()
        return loan.loan_ref, approved(world, loan, "release", tampered, prepared)

    return setup


def _partial(change: Callable[[SignerWorld, Loan, dict[str, Any], str], str]) -> Setup:
    def setup(world: SignerWorld) -> tuple[str, Call]:
        loan, valuation = margin_called(world)
        psbt = change(world, loan, valuation, world.partial_psbt(loan, valuation, 3))
        return loan.loan_ref, lambda: world.prepare(
            loan, "partial_liquidation", psbt, valuation["valuation_id"]
        )

    return setup


def _partial_change_to_the_miner(
    world: SignerWorld, loan: Loan, valuation: dict[str, Any], psbt: str
) -> str:
    return edit(
        psbt,
        lambda p: setattr(
            p.outputs[1], "script_pubkey", address_to_scriptpubkey(loan.miner_return)
        ),
    )


def _partial_two_derivations(
    world: SignerWorld, loan: Loan, valuation: dict[str, Any], psbt: str
) -> str:
    other = PSBT.from_string(world.partial_psbt(loan, valuation, 4))
    return edit(
        psbt,
        lambda p: setattr(p.outputs[0], "bip32_derivations", other.outputs[1].bip32_derivations),
    )


RELEASE_SHAPE_ATTACKS = [
    Attack(
        "release_paying_the_bank",
        _release_outputs(lambda loan, v: [PayTo(loan.bank_liquidation, v, "bank")]),
        "foreign_output",
    ),
    Attack(
        "release_split_miner_and_bank",
        _release_outputs(
            lambda loan, v: [
                PayTo(loan.miner_return, v - 100_000, "m"),
                PayTo(loan.bank_liquidation, 100_000, "b"),
            ]
        ),
        "foreign_output",
    ),
    Attack(
        "release_sighash_none_after_approval",
        _after_approval(lambda w, loan, p: setattr(p.inputs[0], "sighash_type", SIGHASH.NONE)),
        "sighash",
    ),
    Attack(
        "release_witness_utxo_inflated_after_approval",
        _after_approval(
            lambda w, loan, p: setattr(
                p.inputs[0].witness_utxo, "value", p.inputs[0].witness_utxo.value + 1
            )
        ),
        "witness_utxo_amount",
    ),
    Attack(
        "partial_bank_overpaid",
        _partial(
            lambda w, loan, v, b64: edit(b64, lambda p: _move(1_000, to=0, frm=1)(w, loan, p))
        ),
        "bank_overpaid",
    ),
    Attack("partial_change_to_the_miner", _partial(_partial_change_to_the_miner), "foreign_output"),
    Attack(
        "partial_outputs_name_two_loan_addresses",
        _partial(_partial_two_derivations),
        "output_derivation",
    ),
    Attack(
        "partial_change_beyond_the_watched_addresses",
        _partial(lambda w, loan, v, b64: w.partial_psbt(loan, v, change_index=5_000)),
        "change_index",
    ),
]


@pytest.mark.parametrize("attack", [a.param() for a in RELEASE_SHAPE_ATTACKS])
def test_bad_release_and_partial_shapes_are_refused(world: SignerWorld, attack: Attack) -> None:
    run(world, attack)


# --------------------------------------------------------------------------- raw bytes


def raw(world: SignerWorld, op: str, body: bytes) -> tuple[int, Any]:
    """Bytes straight to the signer's one entry point, as each transport delivers them."""
    transport = world.client.transport
    if isinstance(transport, InProcessTransport):
        if len(body) > transport.max_body_bytes:
            return transport.core.refuse_oversized(len(body), transport.max_body_bytes)
        return transport.core.handle(op, body)
    token = transport._client.headers["Authorization"]  # type: ignore[attr-defined]
    response = httpx.post(
        f"{transport.url}/v1/{op}",  # type: ignore[attr-defined]
        content=body,
        headers={"Authorization": token, "Content-Type": "application/json"},
        timeout=60,
    )
    return response.status_code, response.json()


@dataclass(frozen=True)
class Raw:
    name: str
    op: str
    body: Callable[[SignerWorld, Loan, str], bytes]
    status: int
    check: str


def j(**fields: Any) -> Callable[[SignerWorld, Loan, str], bytes]:
    """A JSON body; a value that is a function of (loan, psbt) is filled in."""

    def body(world: SignerWorld, loan: Loan, psbt: str) -> bytes:
        filled = {k: v(loan, psbt) if callable(v) else v for k, v in fields.items()}
        return json.dumps(filled).encode()

    return body


def text(template: str) -> Callable[[SignerWorld, Loan, str], bytes]:
    """A body as literal text ({ref} and {psbt} filled in), for what JSON dumps cannot say."""
    return lambda world, loan, psbt: (
        template.replace("{ref}", loan.loan_ref).replace("{psbt}", psbt).encode()
    )


def REF(loan: Loan, psbt: str) -> str:
    return loan.loan_ref


def _truncated(loan: Loan, psbt: str) -> str:
    return base64.b64encode(base64.b64decode(psbt)[:60]).decode()


def _registration_with(literal: str) -> Callable[[SignerWorld, Loan, str], bytes]:
    def body(world: SignerWorld, loan: Loan, psbt: str) -> bytes:
        statement, _, _ = world.registration()
        statement["terms"]["principal_kopecks"] = "@@"
        approvals = world.approvals(
            {**statement, "terms": {**statement["terms"], "principal_kopecks": 1}}
        )
        payload = json.dumps({"statement": statement, "approvals": approvals})
        return payload.replace('"@@"', literal).encode()

    return body


def _repayment_amount_string(world: SignerWorld, loan: Loan, psbt: str) -> bytes:
    statement = repayment_statement(loan, amount_kopecks="1e5")
    return json.dumps({"statement": statement, "approvals": world.approvals(statement)}).encode()


def _deep_statement(world: SignerWorld, loan: Loan, psbt: str) -> bytes:
    return b'{"statement": {"kind": ' + b"[" * 5000 + b"]" * 5000 + b'}, "approvals": []}'


def _huge_integer(world: SignerWorld, loan: Loan, psbt: str) -> bytes:
    return b'{"statement": {"amount_kopecks": ' + b"9" * 5000 + b'}, "approvals": []}'


def _too_many_approvals(world: SignerWorld, loan: Loan, psbt: str) -> bytes:
    approvals = [{"person": "olga.operator", "signature": "AAAA"}] * 9
    return json.dumps(
        {
            "loan_ref": loan.loan_ref,
            "action": "release",
            "psbt": psbt,
            "nonce": "n" * 32,
            "approvals": approvals,
        }
    ).encode()


def _two_megabytes(world: SignerWorld, loan: Loan, psbt: str) -> bytes:
    return json.dumps(
        {"loan_ref": loan.loan_ref, "action": "release", "psbt": "A" * (2 * 1024 * 1024)}
    ).encode()


SIGN = {"action": "release", "nonce": "n" * 32}

RAW_ATTACKS = [
    Raw(
        "sign_psbt_bad_base64",
        "sign",
        j(loan_ref=REF, psbt="!!!not base64!!!", **SIGN),
        422,
        "psbt_format",
    ),
    Raw(
        "sign_psbt_truncated", "sign", j(loan_ref=REF, psbt=_truncated, **SIGN), 422, "psbt_format"
    ),
    Raw(
        "prepare_psbt_with_nul",
        "prepare",
        j(loan_ref=REF, action="release", psbt=lambda lo, p: p + "\x00"),
        422,
        "psbt_format",
    ),
    Raw("sign_psbt_empty", "sign", j(loan_ref=REF, psbt="", **SIGN), 400, "malformed_request"),
    Raw(
        "prepare_psbt_truncated",
        "prepare",
        j(loan_ref=REF, action="release", psbt=_truncated),
        422,
        "psbt_format",
    ),
    Raw(
        "repayment_amount_as_exponent_string",
        "repayment",
        _repayment_amount_string,
        422,
        "statement_format",
    ),
    Raw(
        "sign_automatic_nan_literal",
        "sign",
        text('{"loan_ref": "{ref}", "action": "liquidation", "psbt": "{psbt}", "automatic": NaN}'),
        400,
        "malformed_request",
    ),
    Raw(
        "register_principal_nan_literal",
        "register_loan",
        _registration_with("NaN"),
        422,
        "statement_format",
    ),
    Raw(
        "register_principal_1e1000000_literal",
        "register_loan",
        _registration_with("1E+1000000"),
        422,
        "statement_format",
    ),
    Raw(
        "register_principal_infinity_literal",
        "register_loan",
        _registration_with("-Infinity"),
        422,
        "statement_format",
    ),
    Raw(
        "sign_unknown_field_price",
        "sign",
        j(loan_ref=REF, psbt=lambda lo, p: p, price_rub_per_btc="1", **SIGN),
        400,
        "malformed_request",
    ),
    Raw(
        "sign_unknown_field_debt",
        "sign",
        j(loan_ref=REF, psbt=lambda lo, p: p, debt_kopecks=1, automatic=True, action="liquidation"),
        400,
        "malformed_request",
    ),
    Raw(
        "valuation_unknown_field", "valuation", j(loan_ref=REF, price="1"), 400, "malformed_request"
    ),
    Raw(
        "sign_loan_ref_as_integer",
        "sign",
        j(loan_ref=12345, psbt=lambda lo, p: p, **SIGN),
        400,
        "malformed_request",
    ),
    Raw(
        "sign_automatic_as_string",
        "sign",
        j(loan_ref=REF, psbt=lambda lo, p: p, action="liquidation", automatic="true"),
        400,
        "malformed_request",
    ),
    Raw(
        "sign_action_not_a_bank_action",
        "sign",
        j(loan_ref=REF, psbt=lambda lo, p: p, action="dispute_release", nonce="n" * 32),
        400,
        "malformed_request",
    ),
    Raw(
        "sign_loan_ref_path_traversal",
        "sign",
        j(loan_ref="../../etc/passwd", psbt=lambda lo, p: p, **SIGN),
        400,
        "malformed_request",
    ),
    Raw(
        "sign_nonce_too_short",
        "sign",
        j(loan_ref=REF, psbt=lambda lo, p: p, action="release", nonce="abc"),
        400,
        "malformed_request",
    ),
    Raw("sign_nine_approvals", "sign", _too_many_approvals, 400, "malformed_request"),
    Raw(
        "statement_is_a_list",
        "register_loan",
        j(statement=[1, 2], approvals=[]),
        400,
        "malformed_request",
    ),
    Raw("statement_nested_5000_deep", "register_loan", _deep_statement, 400, "malformed_request"),
    Raw("integer_of_5000_digits", "repayment", _huge_integer, 400, "malformed_request"),
    Raw("unknown_operation", "export_key", j(loan_ref=REF), 422, "unknown_operation"),
    Raw("body_of_2_megabytes", "sign", _two_megabytes, 413, "body_too_large"),
    Raw("invalid_json", "sign", text('{"loan_ref": "{ref}", "action": '), 400, "malformed_request"),
    Raw("json_array_body", "sign", text('["{ref}", "release"]'), 400, "malformed_request"),
    Raw("not_utf8", "sign", lambda w, lo, p: b'{"loan_ref": "\xff\xfe"}', 400, "malformed_request"),
]


@pytest.mark.parametrize("attack", [pytest.param(a, id=a.name) for a in RAW_ATTACKS])
def test_hostile_bytes_are_refused_never_500(world: SignerWorld, attack: Raw) -> None:
    loan, psbt, _ = released(world)
    body = attack.body(world, loan, psbt)
    logged = refusals(world, None, attack.check)
    before = world.bank_signatures()
    status, answer = raw(world, attack.op, body)
    assert world.bank_signatures() == before, "the token signed during an attack"
    assert 400 <= status < 500, (status, answer)
    assert status == attack.status, (status, answer)
    assert isinstance(answer, dict) and answer["error"] == "refused_by_signer", answer
    assert answer["check"] == attack.check, answer
    assert answer["message"]
    assert refusals(world, None, attack.check) == logged + 1, "the refusal is not in the log"


# --------------------------------------------------------------------------- the count


TABLES: dict[str, list[Any]] = {
    "APPROVAL_FORGERIES": APPROVAL_FORGERIES,
    "REQUEST_ATTACKS": REQUEST_ATTACKS,
    "EVIDENCE_ATTACKS": EVIDENCE_ATTACKS,
    "PRICE_FEED_ATTACKS": PRICE_FEED_ATTACKS,
    "DESK_QUOTE_ATTACKS": DESK_QUOTE_ATTACKS,
    "COLLATERAL_ATTACKS": COLLATERAL_ATTACKS,
    "REGISTRATION_ATTACKS": REGISTRATION_ATTACKS,
    "AMENDMENT_ATTACKS": AMENDMENT_ATTACKS,
    "REPAYMENT_ATTACKS": REPAYMENT_ATTACKS,
    "PEOPLE_ATTACKS": PEOPLE_ATTACKS,
    "SHAPE_ATTACKS": SHAPE_ATTACKS,
    "RELEASE_SHAPE_ATTACKS": RELEASE_SHAPE_ATTACKS,
    "RAW_ATTACKS": RAW_ATTACKS,
}


def test_the_corpus_is_what_the_docstring_says() -> None:
    names = [a.name for table in TABLES.values() for a in table]
    assert len(names) == len(set(names)), "attack names must be distinct"
    doc = __doc__ or ""
    for table, attacks in TABLES.items():
        assert re.search(rf"^ +{table} +{len(attacks)} ", doc, re.MULTILINE), (table, len(attacks))
    assert re.search(rf"^ +{len(names)}  distinct attacks", doc, re.MULTILINE), len(names)
    assert len(names) >= 80
