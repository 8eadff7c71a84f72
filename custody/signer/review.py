"""What an approver checks on their own machine before signing a transaction statement.

The statement came through the service, which may be in an attacker's hands; so the
approver's tool decodes the PSBT itself and refuses to sign unless the statement says
exactly what the transaction does (txid, every input and output, the fee). The signer
checks the same again; this check is so a person is never shown one thing and asked to
sign another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from embit.psbt import PSBT
from embit.script import Script

from pledge.network import check_network, embit_network

__all__ = ["Decoded", "decode_psbt", "describe", "mismatches"]


@dataclass(frozen=True)
class Decoded:
    txid: str
    inputs: list[str]  # "txid:vout:amount"
    outputs: list[str]  # "address:amount"
    fee_sats: int
    total_in_sats: int


def decode_psbt(psbt_b64: str, network: str) -> Decoded:
    psbt = PSBT.from_string(psbt_b64.strip())
    params = embit_network(check_network(network))
    inputs: list[str] = []
    total = 0
    for inp in psbt.inputs:
        if inp.witness_utxo is None:
            raise ValueError("an input carries no amount (witness_utxo): refusing to review it")
        amount = int(inp.witness_utxo.value)
        total += amount
        inputs.append(f"{inp.txid.hex()}:{int(inp.vout)}:{amount}")
    outputs = [
        f"{Script(o.script_pubkey.data).address(params)}:{int(o.value)}" for o in psbt.tx.vout
    ]
    fee = total - sum(int(o.value) for o in psbt.tx.vout)
    return Decoded(psbt.tx.txid().hex(), inputs, outputs, fee, total)


def mismatches(statement: dict[str, Any], decoded: Decoded) -> list[str]:
    """Every way the statement differs from the decoded PSBT (empty: they agree)."""
    problems: list[str] = []
    if statement.get("kind") != "transaction":
        problems.append(f"the statement is a {statement.get('kind')!r}, not a transaction")
    if statement.get("unsigned_txid") != decoded.txid:
        problems.append(
            f"the statement names transaction {statement.get('unsigned_txid')}, "
            f"the PSBT is {decoded.txid}"
        )
    if statement.get("inputs") != decoded.inputs:
        problems.append("the statement's inputs are not the PSBT's")
    if statement.get("outputs") != decoded.outputs:
        problems.append("the statement's outputs are not the PSBT's")
    if statement.get("fee_sats") != decoded.fee_sats:
        problems.append(
            f"the statement's fee is {statement.get('fee_sats')} sats, "
            f"the PSBT pays {decoded.fee_sats}"
        )
    return problems


def _btc(sats: int) -> str:
    return f"{sats / 100_000_000:.8f} BTC"


def describe(statement: dict[str, Any], decoded: Decoded, roles: dict[str, str]) -> list[str]:
    """The transaction as a person reads it; `roles` names known addresses."""
    lines = [
        f"loan {statement.get('loan_ref')}: {statement.get('action')} "
        f"on {statement.get('network')}",
        f"transaction {decoded.txid}",
        f"spends {len(decoded.inputs)} collateral output(s), {_btc(decoded.total_in_sats)}:",
    ]
    for item in decoded.inputs:
        txid, vout, amount = item.rsplit(":", 2)
        lines.append(f"  {txid}:{vout}  {_btc(int(amount))}")
    lines.append("pays:")
    for item in decoded.outputs:
        address, amount = item.rsplit(":", 1)
        lines.append(f"  {_btc(int(amount))}  to {address}  ({roles.get(address, 'UNKNOWN')})")
    lines.append(f"fee {decoded.fee_sats} sats")
    lines.append(f"approval valid until {statement.get('expires_at')}")
    return lines
