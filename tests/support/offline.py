"""A service with no node and no HSM behind it, for the tests of who may do what: a
bank's signer that records what it is asked and answers as a real one would, and a chain
that serves the transactions the test paid. The rules under test are in the service, so
neither needs to be real; the lifecycle and signer tests use btcd and SoftHSM2."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import Engine
from support.world import World, build_world

from hsm.client import BankSigner
from regtest.people import new_staff


class RecordingSigner:
    """The authorization tests check who may open, read and sign statements, not the bank's
    signer (tested against SoftHSM2 elsewhere): registering a loan answers a fresh random key
    and the descriptor built from it, a repayment is recorded; nothing is checked."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def call(self, op: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        from embit.ec import PrivateKey

        from pledge.descriptors import CollateralDescriptor
        from pledge.keys import parse_fixed_key, parse_hd_key

        self.calls.append(op)
        statement = payload["statement"]
        if op == "register_loan":
            public = PrivateKey(os.urandom(32)).get_public_key().sec().hex()
            descriptor = CollateralDescriptor(
                (
                    parse_hd_key(statement["miner_key"], "regtest", field="miner_key"),
                    parse_fixed_key(public, field="public_key"),
                    parse_hd_key(statement["arbiter_key"], "regtest", field="arbiter_key"),
                ),
                "regtest",
            )
            return {
                "key_ref": f"pledge-loan:{statement['loan_ref']}",
                "public_key": public,
                "descriptor": descriptor.descriptor,
                "registered_by": ["olga.operator", "anton.approver"],
                "local": True,
                "never_extractable": True,
            }
        if op == "repayment":
            return {"recorded": True, "repaid_kopecks": statement["amount_kopecks"]}
        raise AssertionError(f"the matrix does not call the signer's {op!r}")

    def close(self) -> None:
        pass


class OfflineChain:
    """Real transactions paying the loan's addresses, served as a node would: the
    authorization tests check who may do what, the lifecycle tests use a real btcd."""

    def __init__(self) -> None:
        self.txs: dict[str, bytes] = {}

    def pay(self, script_pubkey: bytes, amount: int) -> str:
        from embit.script import Script
        from embit.transaction import Transaction, TransactionInput, TransactionOutput

        tx = Transaction(
            vin=[TransactionInput(os.urandom(32), 0)],
            vout=[TransactionOutput(amount, Script(script_pubkey))],
        )
        txid: str = tx.txid().hex()
        self.txs[txid] = tx.serialize()
        return txid

    def get_raw_transaction(self, txid: str, block_hash: str | None = None) -> bytes:
        return self.txs[txid]

    def estimate_fee_rate_sat_vb(self, conf_target: int) -> float | None:
        return None

    def test_mempool_accept(self, tx_hex: str, max_fee_rate_btc_kvb: float = 0.1) -> dict[str, Any]:
        return {"allowed": True}

    def send_raw_transaction(self, tx_hex: str) -> str:
        return "00" * 32

    # What a report asks (custody.reports.service.ChainClock): one block, mined at epoch 0.
    def get_block_count(self) -> int:
        return 1

    def get_block_hash(self, height: int) -> str:
        return f"{height:064x}"

    def get_block_header(self, block_hash: str) -> dict[str, Any]:
        return {"hash": block_hash, "height": int(block_hash, 16), "time": 0}


def funded_loan(world: World) -> int:
    """An active loan with one confirmed deposit, recorded as the watcher would."""
    from sqlmodel import Session, select

    from custody.db.models import CollateralAddress

    loan_id: int = world.funded_ready_loan()["id"]
    chain: OfflineChain = world.client.app.state.chain
    with Session(world.engine) as s:
        addr = s.exec(select(CollateralAddress).where(CollateralAddress.loan_id == loan_id)).one()
        txid = chain.pay(bytes.fromhex(addr.script_pubkey_hex), 50_000_000)
    return record_confirmed_deposit(world, loan_id, txid)


def record_confirmed_deposit(world: World, loan_id: int, txid: str) -> int:
    """0.5 BTC confirmed at address 0 of the loan and the loan active, written as the
    watcher would (no node: the deposit's transaction is `txid`)."""
    from sqlmodel import Session, select

    from custody.db.models import CollateralAddress, Deposit, DepositState, Loan, LoanState

    with Session(world.engine) as s:
        addr = s.exec(select(CollateralAddress).where(CollateralAddress.loan_id == loan_id)).one()
        s.add(
            Deposit(
                loan_id=loan_id,
                address_id=addr.id or 0,
                txid=txid,
                vout=0,
                amount_sats=50_000_000,
                state=DepositState.confirmed,
                block_height=1,
                block_hash="00" * 32,
                required_confirmations=1,
            )
        )
        loan = s.get(Loan, loan_id)
        assert loan is not None
        loan.state = LoanState.active
        s.add(loan)
        s.commit()
    return loan_id


def keyed_draft(world: World) -> int:
    """A draft loan with the miner's and the arbiter's keys: ready for the bank's signer."""
    loan_id: int = world.create_loan()["id"]
    for seat in ("miner", "arbiter"):
        r = world.register(loan_id, seat)
        assert r.status_code == 200, r.text
    return loan_id


def offline_world(engine: Engine) -> World:
    """The API over a migrated database, with the recording signer, the offline chain and
    two bank people enrolled (an operator and an approver) to sign statements."""
    staff = {
        "operator": new_staff("olga.operator", "bank_operator"),
        "approver": new_staff("anton.approver", "bank_approver"),
    }
    return build_world(
        engine, signer=BankSigner(RecordingSigner()), chain=OfflineChain(), staff=staff
    )
