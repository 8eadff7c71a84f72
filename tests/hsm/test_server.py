"""`hsm serve` as a real subprocess on loopback, with its own SoftHSM2 token and registry.

The custody side talks to it only through `hsm.remote.RemoteSigner`. What is shown:
the bearer token guards every path; key generation returns the HSM's evidence;
terms and descriptor are recorded once; a valid release is signed and finalizes with
bdkpython after an embit co-signature; the signer refuses a foreign payout (whatever
the request claims), a fee over ITS cap, and a day's volume over ITS limit, and logs
every decision in its own registry; it will not listen outside 127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from embit import bip32
from embit.ec import PublicKey, Signature
from embit.psbt import PSBT
from embit.script import Script
from embit.transaction import SIGHASH, Transaction, TransactionInput, TransactionOutput
from fastapi.testclient import TestClient
from support.hsm_serve import MAX_FEE, Server, _free_port, _run_cli, _serve_env, _start

from custody.bitcoin.testkeys import make_fixed_test_key, make_test_key
from custody.signing.psbt import CollateralInput, PayTo, build_psbt, finalize
from hsm.pkcs11_backend import Pkcs11Signer
from hsm.policy import PolicyViolation
from hsm.registry import Registry
from hsm.remote import RemoteSigner, SignerConflict
from hsm.server import create_signer_app
from hsm.signer import SignerBusy, SignerKeyNotFound, SignerRefused, SignerUnavailable
from hsm.software import SoftwareHDSigner
from pledge.descriptors import CollateralDescriptor
from pledge.keys import parse_fixed_key, parse_hd_key

pytestmark = pytest.mark.hsm

MINER_RETURN = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
BANK_LIQUIDATION = "bcrt1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3qzf4jry"
STRANGER = "bcrt1q6rhpng9evdsfnn833a4f4vej0asu6dk5srld6x"
FEE = 3_000
RELEASE = {"action": "release"}


def approved(psbt_b64: str) -> dict[str, Any]:
    """An operator asked for this exact transaction and a different approver approved it."""
    return {
        "requested_by": "bank_operator:olga",
        "requester_role": "bank_operator",
        "approvals": [
            {
                "principal": "bank_approver:ann",
                "role": "bank_approver",
                "unsigned_txid": _txid(psbt_b64),
            }
        ],
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with _start(tmp_path_factory.mktemp("hsm-serve")) as running:
        yield running


# -- a loan whose bank key lives in the server's HSM -------------------------------------


@dataclass
class Loan:
    ref: str
    descriptor: CollateralDescriptor
    inputs: list[CollateralInput]
    miner: SoftwareHDSigner
    bank_pub: bytes
    miner_key_text: str
    arbiter_key_text: str

    @property
    def total(self) -> int:
        return sum(i.amount_sats for i in self.inputs)


def _hd_key() -> tuple[bip32.HDKey, str]:
    root, origin, xpub = make_test_key(os.urandom(32), "regtest")
    return root, origin + xpub


def _descriptor(miner: str, bank_pub_hex: str, arbiter: str) -> CollateralDescriptor:
    return CollateralDescriptor(
        (
            parse_hd_key(miner, "regtest", field="k"),
            parse_fixed_key(bank_pub_hex, field="k"),
            parse_hd_key(arbiter, "regtest", field="k"),
        ),
        "regtest",
    )


def _deposit(descriptor: CollateralDescriptor, amount: int, index: int) -> CollateralInput:
    """A previous transaction built with embit paying the collateral script at `index`."""
    prev = Transaction(
        vin=[TransactionInput(os.urandom(32), 0)],
        vout=[TransactionOutput(amount, Script(descriptor.script_pubkey(index)))],
    )
    return CollateralInput(prev.txid().hex(), 0, amount, index, False, prev.serialize())


def make_loan(
    remote: RemoteSigner,
    amounts: tuple[int, ...] = (3_000_000, 2_000_000),
    *,
    register: bool = True,
) -> Loan:
    ref = f"loan-{uuid.uuid4().hex[:12]}"
    evidence = remote.generate_loan_key(
        ref,
        network="regtest",
        miner_return_address=MINER_RETURN,
        bank_liquidation_address=BANK_LIQUIDATION,
    )
    miner_root, miner_text = _hd_key()
    _, arbiter_text = _hd_key()
    descriptor = _descriptor(miner_text, evidence.public_key.hex(), arbiter_text)
    if register:
        assert remote.register_descriptor(ref, descriptor.descriptor) == descriptor.descriptor
    inputs = [_deposit(descriptor, amount, index) for index, amount in enumerate(amounts)]
    return Loan(
        ref,
        descriptor,
        inputs,
        SoftwareHDSigner(miner_root, "regtest"),
        evidence.public_key,
        miner_text,
        arbiter_text,
    )


def release_psbt(loan: Loan, fee: int = FEE, to: str = MINER_RETURN) -> str:
    return build_psbt(loan.descriptor, "regtest", loan.inputs, [PayTo(to, loan.total - fee, "m")])


def _bank_sigs(loan: Loan, signed_b64: str) -> int:
    """Verify the bank's signatures with embit's own sighash (not the server's code)."""
    psbt = PSBT.from_string(signed_b64)
    pub = PublicKey.parse(loan.bank_pub)
    for i, inp in enumerate(psbt.inputs):
        sig = inp.partial_sigs[pub]
        assert sig[-1] == SIGHASH.ALL
        assert pub.verify(Signature.parse(sig[:-1]), psbt.sighash(i, SIGHASH.ALL))
    return len(psbt.inputs)


def _txid(psbt_b64: str) -> str:
    txid: str = PSBT.from_string(psbt_b64).tx.txid().hex()
    return txid


# -- authentication ------------------------------------------------------------------------


def test_every_request_needs_the_bearer_token(server: Server) -> None:
    url = server.url
    for headers in ({}, {"Authorization": "Bearer " + "x" * 43}, {"Authorization": server.token}):
        for method, path in (("GET", "/health"), ("POST", "/sign"), ("GET", "/nowhere")):
            r = httpx.request(method, url + path, headers=headers, content=b"{not json", timeout=5)
            assert r.status_code == 401, (method, path, headers)
            assert r.headers["www-authenticate"] == "Bearer"
            assert server.token not in r.text
    good = httpx.get(url + "/health", headers={"Authorization": f"Bearer {server.token}"})
    assert good.status_code == 200
    assert good.json()["status"] == "ok" and good.json()["token_label"] == "hsm-serve"
    with pytest.raises(SignerUnavailable, match="refused our credentials"):
        server.client("y" * 40).health()
    with server.client() as remote:
        assert remote.health()["status"] == "ok"


def test_remote_signer_only_talks_loopback_or_https_and_reports_a_dead_signer() -> None:
    for bad in ("http://10.0.0.1:8790", "http://example.com", "ftp://127.0.0.1"):
        with pytest.raises(ValueError, match="loopback"):
            RemoteSigner(bad, "t" * 40)
    RemoteSigner("https://signer.bank.internal", "t" * 40).close()
    with (
        RemoteSigner(f"http://127.0.0.1:{_free_port()}", "t" * 40, timeout=2) as dead,
        pytest.raises(SignerUnavailable, match="cannot reach"),
    ):
        dead.health()


# -- keys and the once-only records -------------------------------------------------------


def test_key_generation_returns_hsm_evidence_and_terms_are_recorded_once(server: Server) -> None:
    with server.client() as remote:
        ref = f"loan-{uuid.uuid4().hex[:12]}"
        terms = {
            "network": "regtest",
            "miner_return_address": MINER_RETURN,
            "bank_liquidation_address": BANK_LIQUIDATION,
        }
        evidence = remote.generate_loan_key(ref, **terms)
        assert evidence.local is True
        assert evidence.never_extractable is True
        assert evidence.always_sensitive is True
        assert len(evidence.public_key) == 33 and evidence.public_key[0] in (2, 3)
        assert evidence.label == evidence.key_ref and ref in evidence.key_ref
        # a retry with the same terms gets the same key, not a second one
        assert remote.generate_loan_key(ref, **terms).public_key == evidence.public_key
        # a compromised API cannot re-point the loan's payouts
        with pytest.raises(SignerConflict, match="already has recorded terms"):
            remote.generate_loan_key(ref, **{**terms, "miner_return_address": STRANGER})
        with pytest.raises(SignerRefused, match="must differ"):
            remote.generate_loan_key(
                f"{ref}-b", **{**terms, "bank_liquidation_address": MINER_RETURN}
            )
        with pytest.raises(SignerRefused):  # a mainnet address for a regtest loan
            remote.generate_loan_key(
                f"{ref}-c",
                **{**terms, "miner_return_address": "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4"},
            )
    record = server.registry().loan(ref)
    assert record is not None
    assert record.miner_return_address == MINER_RETURN
    assert record.public_key == evidence.public_key
    assert record.descriptor is None


def test_descriptor_must_hold_the_signers_key_and_is_recorded_once(server: Server) -> None:
    with server.client() as remote:
        loan = make_loan(remote, register=False)
        _, other_pub = make_fixed_test_key(os.urandom(16), "regtest")
        foreign = _descriptor(loan.miner_key_text, other_pub, loan.arbiter_key_text)
        with pytest.raises(SignerRefused, match="not this loan's HSM key"):
            remote.register_descriptor(loan.ref, foreign.descriptor)
        with pytest.raises(SignerRefused, match="checksum"):
            remote.register_descriptor(loan.ref, loan.descriptor.descriptor.split("#")[0])
        with pytest.raises(SignerKeyNotFound):
            remote.register_descriptor("loan-unknown", loan.descriptor.descriptor)
        # signing before the descriptor is registered is refused
        with pytest.raises(PolicyViolation) as early:
            psbt = release_psbt(loan)
            remote.sign(loan.ref, psbt, RELEASE, approved(psbt))
        assert early.value.check == "descriptor_missing"

        assert remote.register_descriptor(loan.ref, loan.descriptor.descriptor)
        assert remote.register_descriptor(loan.ref, loan.descriptor.descriptor)  # same: fine
        _, new_arbiter = _hd_key()
        repointed = _descriptor(loan.miner_key_text, loan.bank_pub.hex(), new_arbiter)
        with pytest.raises(SignerConflict, match="different descriptor"):
            remote.register_descriptor(loan.ref, repointed.descriptor)
    record = server.registry().loan(loan.ref)
    assert record is not None and record.descriptor == loan.descriptor.descriptor


# -- signing ------------------------------------------------------------------------------


def test_a_valid_release_is_signed_and_finalizes_with_a_second_signature(server: Server) -> None:
    with server.client() as remote:
        loan = make_loan(remote)
        request = release_psbt(loan)
        signed, report = remote.sign(loan.ref, request, RELEASE, approved(request))
    assert report["action"] == "release"
    assert report["fee_sats"] == FEE
    assert report["total_in_sats"] == loan.total
    assert report["checks"]
    assert _bank_sigs(loan, signed) == 2
    both = loan.miner.sign_psbt(signed)
    tx = Transaction.parse(finalize(both))  # bdkpython satisfies the 2-of-3 and extracts
    assert tx.txid().hex() == _txid(request)
    assert [o.value for o in tx.vout] == [loan.total - FEE]
    for vin in tx.vin:
        assert len(vin.witness.items) == 4  # dummy, two signatures, witness script
    decisions = server.registry().decisions(loan.ref)
    assert [(d.decision, d.txid) for d in decisions] == [("signed", _txid(request))]
    assert decisions[0].detail["authorization"] == {**approved(request), "risk_evidence": None}
    assert "approved by bank_approver:ann" in decisions[0].detail["authorized"]


def _edit(psbt_b64: str, edit: Callable[[PSBT], None]) -> str:
    psbt = PSBT.from_string(psbt_b64)
    edit(psbt)
    out: str = psbt.to_string()
    return out


def _drop_prev_tx(p: PSBT) -> None:
    p.inputs[0].non_witness_utxo = None


def _foreign_loan_input(p: PSBT) -> None:
    p.inputs[0].bip32_derivations.clear()


@pytest.mark.parametrize(
    ("build", "check"),
    [
        (lambda loan: release_psbt(loan, to=STRANGER), "foreign_output"),
        (lambda loan: release_psbt(loan, fee=MAX_FEE + 1_000), "fee_cap"),
        (lambda loan: _edit(release_psbt(loan), _drop_prev_tx), "non_witness_utxo"),
        (lambda loan: _edit(release_psbt(loan), _foreign_loan_input), "input_derivation"),
    ],
    ids=["foreign_output", "fee_over_the_signers_cap", "no_prev_tx", "no_derivation"],
)
def test_refusals_come_back_as_policy_violations_and_are_logged(
    server: Server, build: Callable[[Loan], str], check: str
) -> None:
    with server.client() as remote:
        loan = make_loan(remote)
        request = build(loan)
        with pytest.raises(PolicyViolation) as refused:
            remote.sign(loan.ref, request, RELEASE, approved(request))
    assert refused.value.check == check
    decisions = server.registry().decisions(loan.ref)
    assert [(d.decision, d.check, d.txid) for d in decisions] == [
        ("refused", check, _txid(request))
    ]
    assert decisions[0].reason == refused.value.reason


def test_the_request_cannot_name_the_payout_address(server: Server) -> None:
    """The API may not even SAY where the money goes: addresses come from the registry."""
    with server.client() as remote:
        loan = make_loan(remote)
    request = release_psbt(loan, to=STRANGER)
    claims = {"action": "release", "miner_return_address": STRANGER}
    raw = httpx.post(
        server.url + "/sign",
        headers={"Authorization": f"Bearer {server.token}"},
        json={
            "loan_ref": loan.ref,
            "psbt": request,
            "action": claims,
            "authorization": approved(request),
        },
        timeout=20,
    )
    assert raw.status_code == 400 and raw.json()["error"] == "invalid_request"
    honest = httpx.post(
        server.url + "/sign",
        headers={"Authorization": f"Bearer {server.token}"},
        json={
            "loan_ref": loan.ref,
            "psbt": request,
            "action": RELEASE,
            "authorization": approved(request),
        },
        timeout=20,
    )
    assert honest.status_code == 422
    assert honest.json()["error"] == "refused_by_signer"
    assert honest.json()["check"] == "foreign_output"
    assert STRANGER in honest.json()["message"]
    assert [d.check for d in server.registry().decisions(loan.ref)] == ["foreign_output"]


def test_velocity_limit_refuses_what_would_exceed_the_day(tmp_path: Path) -> None:
    with _start(tmp_path / "velocity", HSM_DAILY_LIMIT_SATS="4000000") as server:
        with server.client() as remote:
            first = make_loan(remote, (3_000_000,))
            first_psbt = release_psbt(first)
            remote.sign(first.ref, first_psbt, RELEASE, approved(first_psbt))
            # the same transaction again is not new volume (a retry, an added signature)
            again, _ = remote.sign(first.ref, first_psbt, RELEASE, approved(first_psbt))
            assert _bank_sigs(first, again) == 1
            second = make_loan(remote, (1_500_000,))
            with pytest.raises(PolicyViolation) as refused:
                second_psbt = release_psbt(second)
                remote.sign(second.ref, second_psbt, RELEASE, approved(second_psbt))
            assert refused.value.check == "velocity"
            assert "4000000" in refused.value.reason
            assert remote.health()["used_last_24h_sats"] == 3_000_000
        logged = server.registry().decisions()
        assert [(d.loan_ref, d.decision, d.check) for d in logged] == [
            (first.ref, "signed", None),
            (first.ref, "signed", None),
            (second.ref, "refused", "velocity"),
        ]


# -- the process itself -------------------------------------------------------------------


def test_serve_listens_on_loopback_only_and_needs_a_strong_token(tmp_path: Path) -> None:
    env = _serve_env(tmp_path)
    wide = _run_cli(env, "--host", "0.0.0.0", "--port", str(_free_port()))
    assert wide.returncode == 2
    assert "127.0.0.1 only" in wide.stderr
    short = _run_cli({**env, "HSM_SERVE_TOKEN": "too-short"}, "--port", str(_free_port()))
    assert short.returncode == 2 and "at least 32" in short.stderr
    missing = {k: v for k, v in env.items() if k != "HSM_SERVE_TOKEN"}
    none = _run_cli(missing, "--port", str(_free_port()))
    assert none.returncode == 2 and "HSM_SERVE_TOKEN is required" in none.stderr
    wrong_pin = _run_cli({**env, "HSM_PIN": "wrong-pin-4821"}, "--port", str(_free_port()))
    assert wrong_pin.returncode == 2 and "cannot open the HSM token" in wrong_pin.stderr
    assert "wrong-pin-4821" not in wrong_pin.stderr + wrong_pin.stdout


class _DownSigner:
    """Stands in for a token that went away (SoftHSM cannot be unplugged on demand)."""

    name = "pkcs11:gone"

    def __init__(self, error: Exception) -> None:
        self.error = error

    def generate_loan_key(self, loan_ref: str) -> object:
        raise self.error


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (
            SignerUnavailable("PKCS#11 key generation failed: TokenNotPresent"),
            "upstream_unavailable",
        ),
        (SignerBusy("PKCS#11 module busy for more than 30s"), "signer_busy"),
    ],
)
def test_an_unavailable_or_busy_hsm_is_a_503_with_a_clear_message(
    tmp_path: Path, error: Exception, code: str
) -> None:
    token = secrets.token_urlsafe(32)
    app = create_signer_app(
        cast(Pkcs11Signer, _DownSigner(error)), Registry(tmp_path / "s.db"), token, 10**9
    )
    with TestClient(app) as client:
        r = client.post(
            "/keys",
            headers={"Authorization": f"Bearer {token}"},
            json={
                "loan_ref": "loan-1",
                "network": "regtest",
                "miner_return_address": MINER_RETURN,
                "bank_liquidation_address": BANK_LIQUIDATION,
            },
        )
    assert r.status_code == 503
    assert r.json()["error"] == code
    assert r.json()["message"].startswith("the HSM cannot sign right now")
    assert token not in r.text
    with pytest.raises(ValueError, match="at least 32"):
        create_signer_app(cast(Pkcs11Signer, _DownSigner(error)), Registry(":memory:"), "x", 1)


def test_the_signer_itself_requires_a_second_person(server: Server) -> None:
    """Even with a valid PSBT, the separate signer refuses without a different approver
    of this exact transaction: the API's word that someone approved is not enough."""
    with server.client() as remote:
        loan = make_loan(remote)
        remote.register_descriptor(loan.ref, loan.descriptor.descriptor)
        request = release_psbt(loan)
        self_approved = approved(request)
        self_approved["approvals"][0]["principal"] = "bank_operator:olga"
        for auth, why in (
            ({**approved(request), "approvals": []}, "no bank approver"),
            (self_approved, "cannot approve their own"),
        ):
            with pytest.raises(PolicyViolation, match=why) as refused:
                remote.sign(loan.ref, request, RELEASE, auth)
            assert refused.value.check == "approvals"
