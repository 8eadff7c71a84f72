"""The bank's signer with everything real around it, for the signer's tests.

A SoftHSM2 token, btcd on regtest (the signer's own node connection), a local price feed,
the signer's own registry, enrolled people with Ed25519 keys, and loans registered the way
the service does it: a statement an operator and an approver signed. Either transport:
`in-process` (SignerCore in this process) or `hsm-serve` (a real `hsm serve` process).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from embit.bip32 import HDKey as EmbitHDKey
from embit.psbt import PSBT

from custody.signing.psbt import CollateralInput, PayTo, PayToCollateral, build_psbt
from hsm.approvals import People
from hsm.backup import make_share_set
from hsm.client import BankSigner, HttpTransport, InProcessTransport
from hsm.factory import build_core
from hsm.pkcs11_backend import Pkcs11Signer
from hsm.registry import Registry
from hsm.settings import SignerSettings
from pledge.amounts import liquidation_split, partial_liquidation_split
from pledge.descriptors import CollateralDescriptor, parse_collateral_descriptor
from pledge.keys import HDKey
from pledge.network import NetworkName
from pledge.statements import iso
from regtest.faucet import random_p2wpkh_address
from regtest.hsm_serve import serve_process
from regtest.node import RegtestNode
from regtest.people import Staff, new_staff
from regtest.price_feed import PriceFeed
from regtest.softhsm import SoftHsmToken, create_token
from regtest.software_signer import SoftwareHDSigner

NETWORK: NetworkName = "regtest"
FEE_SATS = 2_000
MAX_FEE_SATS = 20_000


def expires(minutes: float = 60) -> str:
    return iso(datetime.now(UTC) + timedelta(minutes=minutes))


@dataclass
class Loan:
    loan_ref: str
    record: dict[str, Any]
    descriptor: CollateralDescriptor
    miner: SoftwareHDSigner
    arbiter: SoftwareHDSigner
    terms: dict[str, Any]
    coins: list[CollateralInput] = field(default_factory=list)

    @property
    def miner_return(self) -> str:
        return str(self.record["miner_return_address"])

    @property
    def bank_liquidation(self) -> str:
        return str(self.record["bank_liquidation_address"])


def software_party() -> SoftwareHDSigner:
    root = EmbitHDKey.from_seed(os.urandom(32), version=bytes.fromhex("04358394"))
    return SoftwareHDSigner(root, NETWORK)


class SignerWorld:
    # `hsm serve` worlds: where it listens and its bearer token (to reach it another way,
    # e.g. through regtest.slow_proxy).
    serve_url: str | None = None
    serve_token: str | None = None
    serve_log: Path | None = None  # hsm serve's output (one JSON object per log line)
    core: Any = None  # in-process worlds: the SignerCore itself (hsm.core), to watch it work

    def __init__(
        self,
        transport: str,
        client: BankSigner,
        node: RegtestNode,
        feed: PriceFeed,
        staff: dict[str, Staff],
        sign_calls: Callable[[], int],
        registry: Callable[[], Registry],
    ) -> None:
        self.transport = transport
        self.client = client
        self.node = node
        self.feed = feed
        self.staff = staff
        self._sign_calls = sign_calls
        self.registry = registry
        self.shares: list[Path] = []  # the bank seed's SLIP-39 share files (3 of 5)
        self.bank_key: str | None = None  # the kind `registration` asks for when not told

    # -- counting -------------------------------------------------------------------------

    def bank_signatures(self) -> int:
        """Signatures the bank key made so far: C_Sign calls in the token (fixed keys)
        plus signatures by the sealed seed (HD keys), each counted where it is made (in
        process: the counters; hsm serve: its /health). "Nothing was signed" holds for
        both kinds of key only when this did not move."""
        return self._sign_calls()

    # -- statements -----------------------------------------------------------------------

    def approvals(self, statement: dict[str, Any], *who: str) -> list[dict[str, str]]:
        return [self.staff[w].endorse(statement) for w in (who or ("operator", "approver"))]

    def terms(self, **overrides: Any) -> dict[str, Any]:
        now = datetime.now(UTC)
        terms: dict[str, Any] = {
            "principal_kopecks": 400_000_00,  # 400,000 RUB
            "interest_rate_bps": 0,
            "start_at": iso(now - timedelta(days=1)),
            "maturity_at": iso(now + timedelta(days=365)),
            "margin_call_ltv_bps": 7_500,
            "liquidation_ltv_bps": 9_000,
            "cure_window_hours": 48,
            "required_confirmations": 1,
            "target_ltv_bps": 6_000,
        }
        terms.update(overrides)
        return terms

    def registration(
        self,
        loan_ref: str | None = None,
        *,
        bank_key: str | None = None,
        legacy: bool = False,
        **terms: Any,
    ) -> tuple[dict[str, Any], SoftwareHDSigner, SoftwareHDSigner]:
        """A registration statement; `bank_key` "hd"/"fixed" (None: the world's default);
        `legacy`: a statement from before the choice existed (the signer reads it as fixed)."""
        miner, arbiter = software_party(), software_party()
        bank_key = None if legacy else bank_key or self.bank_key
        statement = {
            **({"bank_key": bank_key} if bank_key else {}),
            "kind": "register_loan",
            "network": NETWORK,
            "loan_ref": loan_ref or f"loan-{secrets.token_hex(6)}",
            "miner_key": miner.account_key_text(),
            "arbiter_key": arbiter.account_key_text(),
            "terms": self.terms(**terms),
            "miner_return_address": random_p2wpkh_address(),
            "bank_liquidation_address": random_p2wpkh_address(),
            "expires_at": expires(),
        }
        return statement, miner, arbiter

    def register_loan(
        self,
        loan_ref: str | None = None,
        *,
        bank_key: str | None = None,
        legacy: bool = False,
        **terms: Any,
    ) -> Loan:
        statement, miner, arbiter = self.registration(
            loan_ref, bank_key=bank_key, legacy=legacy, **terms
        )
        record = self.client.register_loan(statement, self.approvals(statement))
        return Loan(
            loan_ref=record["loan_ref"],
            record=record,
            descriptor=parse_collateral_descriptor(record["descriptor"], NETWORK),
            miner=miner,
            arbiter=arbiter,
            terms=statement["terms"],
        )

    # -- coins ----------------------------------------------------------------------------

    def fund(
        self, loan: Loan, sats: int, *, index: int = 0, change: bool = False, confirmations: int = 1
    ) -> CollateralInput:
        address = loan.descriptor.address(index, change)
        txid, vout = self.node.faucet.pay(address, sats)
        if confirmations:
            self.node.mine(confirmations)
        coin = CollateralInput(
            txid=txid,
            vout=vout,
            amount_sats=sats,
            address_index=index,
            change=change,
            prev_tx=self.node.rpc.get_raw_transaction(txid),
        )
        loan.coins.append(coin)
        return coin

    # -- PSBTs ----------------------------------------------------------------------------

    def psbt(
        self,
        loan: Loan,
        outputs: Sequence[PayTo | PayToCollateral],
        inputs: Sequence[CollateralInput] | None = None,
        *,
        locktime: int = 0,
    ) -> str:
        return build_psbt(
            loan.descriptor, NETWORK, list(inputs or loan.coins), list(outputs), locktime=locktime
        )

    def release_psbt(self, loan: Loan, inputs: Sequence[CollateralInput] | None = None) -> str:
        coins = list(inputs or loan.coins)
        total = sum(c.amount_sats for c in coins)
        return self.psbt(loan, [PayTo(loan.miner_return, total - FEE_SATS, "miner_return")], coins)

    def liquidation_psbt(self, loan: Loan, valuation: dict[str, Any]) -> str:
        from decimal import Decimal

        total = sum(c.amount_sats for c in loan.coins)
        split = liquidation_split(
            total,
            FEE_SATS,
            int(valuation["debt_kopecks"]),
            Decimal(valuation["price_rub_per_btc"]),
            bank_dust=294,
            miner_dust=294,
        )
        outputs: list[PayTo | PayToCollateral] = [
            PayTo(loan.bank_liquidation, split.outputs["bank_liquidation"], "bank_liquidation")
        ]
        if "miner_return" in split.outputs:
            outputs.append(PayTo(loan.miner_return, split.outputs["miner_return"], "miner_return"))
        return self.psbt(loan, outputs)

    def partial_psbt(self, loan: Loan, valuation: dict[str, Any], change_index: int = 1) -> str:
        from decimal import Decimal

        total = sum(c.amount_sats for c in loan.coins)
        split = partial_liquidation_split(
            total,
            FEE_SATS,
            int(valuation["debt_kopecks"]),
            Decimal(valuation["price_rub_per_btc"]),
            int(loan.terms["target_ltv_bps"]),
            bank_dust=294,
            change_dust=294,
        )
        return self.psbt(
            loan,
            [
                PayTo(loan.bank_liquidation, split.outputs["bank_liquidation"], "bank_liquidation"),
                PayToCollateral(change_index, False, split.outputs["collateral_change"]),
            ],
        )

    # -- the 4-eyes path --------------------------------------------------------------------

    def prepare(
        self, loan: Loan, action: str, psbt: str, valuation_id: str | None = None
    ) -> dict[str, Any]:
        return self.client.prepare(loan.loan_ref, action, psbt, valuation_id)

    def approved_sign(
        self, loan: Loan, action: str, psbt: str, valuation_id: str | None = None
    ) -> Any:
        prepared = self.prepare(loan, action, psbt, valuation_id)
        statement = prepared["statement"]
        return self.client.sign(
            loan.loan_ref,
            action,
            psbt,
            nonce=prepared["nonce"],
            approvals=self.approvals(statement),
        )

    def broadcast(self, signed_psbt: str, loan: Loan, *, with_seat: str) -> str:
        """Add the other seat's signature, finalize (bdk), check and broadcast; mine it."""
        from custody.signing.psbt import finalize

        other = loan.miner if with_seat == "miner" else loan.arbiter
        both = other.sign_psbt(signed_psbt)
        tx_hex = finalize(both).hex()
        accepted = self.node.rpc.test_mempool_accept(tx_hex)
        assert accepted.get("allowed"), accepted
        txid = self.node.rpc.send_raw_transaction(tx_hex)
        self.node.mine(1)
        return txid


# --------------------------------------------------------------------------- building


def matured(world: SignerWorld, sats: int = 1_000_000) -> Loan:
    """A loan past its maturity with 50,000 RUB owed: the signer's verdict is liquidate."""
    now = datetime.now(UTC)
    loan = world.register_loan(
        principal_kopecks=5_000_000,
        start_at=iso(now - timedelta(days=2)),
        maturity_at=iso(now - timedelta(days=1)),
    )
    world.fund(loan, sats)
    return loan


def bank_hd_key(record: dict[str, Any]) -> HDKey:
    """The bank key of an HD loan as the signer recorded it."""
    key = parse_collateral_descriptor(str(record["descriptor"]), "regtest").keys[1]
    assert isinstance(key, HDKey)
    return key


def bank_hd_signatures(psbt_b64: str, key: HDKey) -> int:
    """Partial signatures by the bank's HD key (any child of its account)."""
    children = {key.public_key(c, i) for c in (0, 1) for i in range(10)}
    return sum(
        1
        for inp in PSBT.from_string(psbt_b64).inputs
        for pub in inp.partial_sigs
        if pub.sec() in children
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def signer_env(
    base: Path, node: RegtestNode, feed: PriceFeed, token: SoftHsmToken, **extra: str
) -> dict[str, str]:
    import json

    return {
        "HSM_NETWORK": NETWORK,
        "HSM_MODULE": token.module_path,
        "HSM_TOKEN_LABEL": token.label,
        "HSM_PIN": token.pin.get_secret_value(),
        "HSM_STATE_DB": str(base / "hsm-state.db"),
        "HSM_NODE_RPC_URL": node.rpc_url,
        "HSM_NODE_RPC_USER": node.rpc_user,
        "HSM_NODE_RPC_PASSWORD": node.rpc_password,
        "HSM_PRICE_SOURCES": json.dumps([feed.source_config()]),
        "HSM_MAX_FEE_SATS": str(MAX_FEE_SATS),
        "HSM_DAILY_LIMIT_SATS": str(50 * 100_000_000),
        "HSM_ADDRESS_GAP": "5",
        **extra,
    }


def enroll_staff(client: BankSigner, admins: Sequence[Staff], staff: Sequence[Staff]) -> None:
    for person in staff:
        statement = {
            "kind": "enroll",
            "name": person.name,
            "role": person.role,
            "algorithm": "ed25519",
            "public_key": person.public_hex,
            "expires_at": expires(),
        }
        client.enroll(statement, [a.endorse(statement) for a in admins])


OFFICERS = ("ivanova", "petrov", "sidorova", "kuznetsov", "smirnova")


def hsm_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`hsm ARGS` in a child with exactly this signer environment (and no other HSM_*)."""
    child = {k: v for k, v in os.environ.items() if not k.startswith(("HSM_", "SOFTHSM2_CONF"))}
    child.update(env)
    return subprocess.run(
        [sys.executable, "-m", "hsm.cli", *args],
        env=child,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def seed_ceremony(base: Path, env: dict[str, str]) -> list[Path]:
    """`hsm seed init`: the bank seed made in the token and split 3 of 5 for the officers."""
    out = base / "shares"
    args = [a for officer in OFFICERS for a in ("--officer", officer)]
    done = hsm_cli(env, "seed", "init", *args, "--threshold", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr + done.stdout
    return sorted(out.glob("*.slip39.txt"))


def new_people() -> dict[str, Staff]:
    return {
        "admin1": new_staff("admin1", "admin"),
        "admin2": new_staff("admin2", "admin"),
        "operator": new_staff("olga.operator", "bank_operator"),
        "approver": new_staff("anton.approver", "bank_approver"),
        "operator2": new_staff("oleg.operator", "bank_operator"),
        "approver2": new_staff("alla.approver", "bank_approver"),
    }


def bootstrap_admins(state_db: Path, admins: Sequence[Staff]) -> None:
    registry = Registry(state_db)
    try:
        People(registry).bootstrap(
            [(a.name, "ed25519", bytes.fromhex(a.public_hex)) for a in admins], datetime.now(UTC)
        )
    finally:
        registry.close()


@contextmanager
def in_process_world(
    base: Path, node: RegtestNode, feed: PriceFeed, token: SoftHsmToken, **extra: str
) -> Iterator[SignerWorld]:
    base.mkdir(parents=True, exist_ok=True)
    env = signer_env(base, node, feed, token, **extra)
    import json

    options: dict[str, Any] = {k[4:].lower(): v for k, v in env.items()}
    options["price_sources"] = json.loads(options["price_sources"])
    settings = SignerSettings(**options)
    people = new_people()
    bootstrap_admins(settings.state_db, [people["admin1"], people["admin2"]])
    hsm = Pkcs11Signer(token.module_path, token.label, token.pin)
    core = build_core(settings, hsm=hsm)
    client = BankSigner(InProcessTransport(core, max_body_bytes=settings.max_body_bytes))
    try:
        enroll_staff(
            client,
            [people["admin1"], people["admin2"]],
            [people[k] for k in ("operator", "approver", "operator2", "approver2")],
        )
        assert core.seed is not None
        core.seed.create()
        sw = SignerWorld(
            "in-process",
            client,
            node,
            feed,
            people,
            sign_calls=lambda: hsm.c_sign_calls + (core.seed.signatures if core.seed else 0),
            registry=lambda: core.registry,
        )
        sw.shares = make_share_set(core.seed, core.registry, OFFICERS, 3, base / "shares")
        sw.core = core
        yield sw
    finally:
        core.close()


@contextmanager
def serve_world(
    base: Path, node: RegtestNode, feed: PriceFeed, **extra: str
) -> Iterator[SignerWorld]:
    """A world whose signer is a real `hsm serve` with its own SoftHSM2 token."""
    base.mkdir(parents=True, exist_ok=True)
    token = create_token(base / "softhsm", "hsm-serve", set_env=False)
    env = signer_env(base, node, feed, token, **extra)
    env["SOFTHSM2_CONF"] = str(token.conf_path)
    people = new_people()
    bootstrap_admins(Path(env["HSM_STATE_DB"]), [people["admin1"], people["admin2"]])
    shares = seed_ceremony(base, env)
    with serve_process(base, env) as server:
        client = BankSigner(HttpTransport(server.url, server.token, timeout=60))
        try:
            enroll_staff(
                client,
                [people["admin1"], people["admin2"]],
                [people[k] for k in ("operator", "approver", "operator2", "approver2")],
            )
            sw = SignerWorld(
                "hsm-serve",
                client,
                node,
                feed,
                people,
                sign_calls=lambda: int(client.health()["signatures"]),
                registry=lambda: Registry(server.state_db),
            )
            sw.serve_url, sw.serve_token = server.url, server.token
            sw.serve_log = server.log_path
            sw.shares = shares
            yield sw
        finally:
            client.close()
