"""The bank seed's protection and backup, attacked and exercised once (in process; the
ceremony and the signers that matter here are processes anyway): a changed seal signs
nothing; no HD key before a backup exists; SLIP-39 shares restore the seed into a fresh
SoftHSM2 token, which signs for a loan made before. Positive HD flows on both transports
are in test_bank_seed.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.signer_world import (
    OFFICERS,
    Loan,
    SignerWorld,
    bank_hd_key,
    bank_hd_signatures,
    bootstrap_admins,
    enroll_staff,
    hsm_cli,
    in_process_world,
    seed_ceremony,
    signer_env,
)

from hsm.client import BankSigner, HttpTransport
from hsm.factory import build_core
from hsm.pkcs11_backend import Pkcs11Signer
from hsm.settings import SignerSettings
from hsm.signer import PolicyViolation
from pledge.descriptors import parse_collateral_descriptor
from regtest.hsm_serve import serve_process
from regtest.node import RegtestNode
from regtest.price_feed import PriceFeed
from regtest.softhsm import SoftHsmToken, create_token

pytestmark = [pytest.mark.node, pytest.mark.hsm]


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    regtest_node: RegtestNode,
    softhsm_token: SoftHsmToken,
    module_feed: PriceFeed,
) -> Iterator[SignerWorld]:
    base = tmp_path_factory.mktemp("seed-world")
    with in_process_world(base, regtest_node, module_feed, softhsm_token) as sw:
        yield sw


def test_no_hd_bank_key_before_the_seed_has_a_backup(
    tmp_path: Path, regtest_node: RegtestNode, softhsm_token: SoftHsmToken, world: SignerWorld
) -> None:
    """A seed that only the token holds would die with it: HD registrations wait for a
    share set on record (and, before that, for a seed at all)."""
    settings = SignerSettings(
        network="regtest",
        module=softhsm_token.module_path,
        token_label=softhsm_token.label,
        pin=softhsm_token.pin,
        state_db=tmp_path / "fresh.db",
        node_rpc_url=regtest_node.rpc_url,
        node_rpc_user=regtest_node.rpc_user,
        node_rpc_password=regtest_node.rpc_password,
    )
    admins = [world.staff["admin1"], world.staff["admin2"]]
    bootstrap_admins(settings.state_db, admins)
    hsm = Pkcs11Signer(softhsm_token.module_path, softhsm_token.label, softhsm_token.pin)
    core = build_core(settings, hsm=hsm)
    try:
        from hsm.client import InProcessTransport

        client = BankSigner(InProcessTransport(core))
        enroll_staff(client, admins, [world.staff["operator"], world.staff["approver"]])
        statement, _, _ = world.registration(bank_key="hd")
        with pytest.raises(PolicyViolation) as no_seed:
            client.register_loan(statement, world.approvals(statement))
        assert no_seed.value.check == "seed_missing"
        assert core.seed is not None
        core.seed.create()
        statement, _, _ = world.registration(bank_key="hd")
        with pytest.raises(PolicyViolation) as no_backup:
            client.register_loan(statement, world.approvals(statement))
        assert no_backup.value.check == "seed_not_backed_up"
        assert core.registry.loan_count() == 0
    finally:
        core.close()


def test_a_changed_seal_signs_nothing(world: SignerWorld) -> None:
    """An attacker with the registry file swaps one byte of the sealed seed: the GCM tag
    fails in the token and nothing is signed."""
    loan = world.register_loan(bank_key="hd")
    world.fund(loan, 300_000)
    registry = world.registry()
    sealed = registry.seed()
    assert sealed is not None
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    with registry.tx() as db:
        db.execute("UPDATE bank_seed SET ciphertext = ?", (flipped.hex(),))
    try:
        with pytest.raises(Exception) as failed:
            world.approved_sign(loan, "release", world.release_psbt(loan))
        assert "does not decrypt" in str(failed.value)
    finally:
        with registry.tx() as db:
            db.execute("UPDATE bank_seed SET ciphertext = ?", (sealed.ciphertext.hex(),))


def test_restore_from_shares_into_a_fresh_token_signs_for_an_existing_loan(
    tmp_path: Path, regtest_node: RegtestNode, module_feed: PriceFeed, world: SignerWorld
) -> None:
    """The ceremony as the officers run it (`hsm seed init`, `hsm seed restore`, CLI
    processes) around two `hsm serve` processes: the first token is lost; three of five
    shares restore the seed into a new token, whose signer then signs a release of a loan
    made on the old one. Two shares, or shares of another bank, restore nothing."""
    base = tmp_path / "old"
    base.mkdir()
    old_token = create_token(tmp_path / "old-hsm", "bank-old", set_env=False)
    env = signer_env(base, regtest_node, module_feed, old_token)
    env["SOFTHSM2_CONF"] = str(old_token.conf_path)
    admins = [world.staff["admin1"], world.staff["admin2"]]
    staff = [world.staff[k] for k in ("operator", "approver")]
    bootstrap_admins(Path(env["HSM_STATE_DB"]), admins)
    shares = seed_ceremony(base, env)
    assert len(shares) == len(OFFICERS)
    for share in shares:
        assert share.stat().st_mode & 0o077 == 0  # only its officer's account may read it
    statement, miner, arbiter = world.registration(bank_key="hd")
    with (
        serve_process(base, env) as old,
        BankSigner(HttpTransport(old.url, old.token, timeout=60)) as client,
    ):
        enroll_staff(client, admins, staff)
        record = client.register_loan(statement, world.approvals(statement))
    loan = Loan(
        loan_ref=record["loan_ref"],
        record=record,
        descriptor=parse_collateral_descriptor(record["descriptor"], "regtest"),
        miner=miner,
        arbiter=arbiter,
        terms=statement["terms"],
    )
    world.fund(loan, 700_000, index=1)

    # The token is lost. A fresh one; the registry is kept (it holds ciphertext only).
    new_token = create_token(tmp_path / "new-hsm", "bank-new", set_env=False)
    new_env = {
        **env,
        "HSM_TOKEN_LABEL": new_token.label,
        "HSM_PIN": new_token.pin.get_secret_value(),
        "SOFTHSM2_CONF": str(new_token.conf_path),
    }
    too_few = hsm_cli(new_env, "seed", "restore", *map(str, shares[:2]))
    assert too_few.returncode != 0 and "do not restore a seed" in too_few.stderr
    other = tmp_path / "other"
    other.mkdir()
    other_shares = seed_ceremony(other, {**new_env, "HSM_STATE_DB": str(other / "state.db")})
    foreign = hsm_cli(new_env, "seed", "restore", *map(str, other_shares[:3]))
    assert foreign.returncode != 0 and "not this bank's shares" in foreign.stderr
    restored = hsm_cli(new_env, "seed", "restore", *map(str, [shares[4], shares[0], shares[2]]))
    assert restored.returncode == 0, restored.stderr
    shown = hsm_cli(new_env, "seed", "show")
    assert "never_extractable=True" in shown.stdout and "3 of 5" in shown.stdout, shown.stdout

    with (
        serve_process(base, new_env) as new,
        BankSigner(HttpTransport(new.url, new.token, timeout=60)) as client,
    ):
        psbt = world.release_psbt(loan)
        prepared = client.prepare(loan.loan_ref, "release", psbt, None)
        signed = client.sign(
            loan.loan_ref,
            "release",
            psbt,
            nonce=prepared["nonce"],
            approvals=world.approvals(prepared["statement"]),
        )
    assert bank_hd_signatures(signed.psbt, bank_hd_key(loan.record)) == 1
    txid = world.broadcast(signed.psbt, loan, with_seat="miner")
    assert world.node.rpc.call("getrawtransaction", txid, 1)["confirmations"] >= 1


def test_a_bank_account_taken_by_another_signer_process_is_not_reused(
    world: SignerWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two signer processes on one registry both read the same next account: the one that
    writes second finds it taken in its write transaction and takes the next, so no two
    loans ever share a bank key."""
    first = world.register_loan(bank_key="hd")
    taken = int(first.record["key_ref"].split("/")[3][:-1])
    registry = world.registry()
    real = registry.next_bank_account
    answers: list[int] = []

    def stale_first() -> int:
        answers.append(taken if not answers else real())
        return answers[-1]

    monkeypatch.setattr(registry, "next_bank_account", stale_first)
    second = world.register_loan(bank_key="hd")
    assert answers == [taken, taken + 1]  # the stale answer was tried, and refused
    assert int(second.record["key_ref"].split("/")[3][:-1]) == taken + 1
    assert bank_hd_key(second.record).xpub != bank_hd_key(first.record).xpub
