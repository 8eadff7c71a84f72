"""The signer's own policy: what a PSBT must look like before the bank's key signs it.

Why this lives in `hsm/` and not in the API: the API builds PSBTs, and a compromised
or buggy API must not be able to get the bank's signature on a transaction that pays
someone else, overpays the bank, burns the collateral in fees or leaves a door open
(SIGHASH_NONE/SINGLE/ANYONECANPAY). So the signer looks at the PSBT with nothing but
the loan's own records (`LoanContext`) and the action the bank approved
(`ApprovedAction`), and recomputes every amount itself from those: no amount, script
or fee is trusted because the PSBT says so.

The check is deliberately strict (it refuses what it does not understand): only PSBT
v0, only native P2WSH inputs of this loan's descriptor, and every one of the loan's
recorded collateral outpoints must be spent, because the split rules in
`pledge.amounts` are defined on the whole collateral.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field, replace
from decimal import Decimal
from io import BytesIO
from typing import Final

from embit.psbt import PSBT, InputScope, read_string
from embit.script import Script
from embit.transaction import SIGHASH, Transaction, TransactionOutput

from hsm.signer import PolicyViolation
from pledge.actions import ACTIONS, LIQUIDATIONS, RELEASES, ActionName
from pledge.addresses import address_script_pubkey
from pledge.amounts import partial_liquidation_split, sats_for_kopecks
from pledge.descriptors import CollateralDescriptor, parse_collateral_descriptor
from pledge.errors import CustodyError
from pledge.network import NetworkName, check_network, embit_network
from pledge.proof import COMMITMENT_UTXO_SCRIPT, CONTROL_OUTPUT_SCRIPT, bip127_commitment

__all__ = [
    "ActionName",
    "ApprovedAction",
    "CheckedPsbt",
    "LoanContext",
    "PolicyReport",
    "PolicyViolation",
    "check_psbt",
    "evaluate_proof_of_reserves",
    "evaluate_psbt",
]

_RELEASES: Final = RELEASES
_LIQUIDATIONS: Final = LIQUIDATIONS

MAX_PSBT_BASE64_CHARS: Final = 4_000_000
LOCKTIME_THRESHOLD: Final = 500_000_000  # below: a block height; at or above: a timestamp
# Final, or RBF-signalling with the BIP-68 disable bit set: no relative timelock either way.
ALLOWED_SEQUENCES: Final = frozenset({0xFFFFFFFF, 0xFFFFFFFD})
# Worst case witness of one 2-of-3 P2WSH input: item count, the CHECKMULTISIG dummy,
# two (72-byte DER + sighash byte) signatures with their length bytes, then the
# witness script with its length byte (added per input from the real script).
_WITNESS_FIXED_BYTES: Final = 1 + 1 + 2 * (1 + 73) + 1
_SEGWIT_MARKER_FLAG_WEIGHT: Final = 2


@dataclass(frozen=True)
class LoanContext:
    """What the signer knows from the loan's own records (never from the PSBT)."""

    network: NetworkName
    descriptor: str
    bank_key_ref: str | None
    collateral: dict[tuple[str, int], tuple[int, int, bool]]
    miner_return_address: str
    bank_liquidation_address: str
    tip_height: int | None = None  # the signer's node's tip; None: only locktime 0 is signed


@dataclass(frozen=True)
class ApprovedAction:
    """The action the bank approved (4-eyes) with the evidence its amounts come from.

    `change_address_change` picks the descriptor branch of a partial liquidation's
    collateral output (False: receive branch `/0/*`, the default)."""

    action: ActionName
    debt_kopecks: int | None = None
    price_rub_per_btc: Decimal | None = None
    target_ltv_bps: int | None = None
    change_address_index: int | None = None
    max_fee_sats: int = 1_000_000
    max_fee_rate_sat_vb: Decimal = Decimal(500)
    tolerance_sats: int = 0
    change_address_change: bool = False


@dataclass(frozen=True)
class PolicyReport:
    """What was checked, for the audit log: the decision's evidence."""

    action: str
    inputs: tuple[tuple[str, int, int], ...]  # (txid, vout, amount_sats) from the records
    outputs: tuple[tuple[str, int], ...]  # (role, amount_sats) in PSBT order
    total_in_sats: int
    fee_sats: int
    vsize_estimate: int
    expected_bank_sats: int | None
    checks: tuple[str, ...]


@dataclass(frozen=True)
class CheckedPsbt:
    """A PSBT that passed the policy, with what the signing step needs from the check."""

    psbt: PSBT
    tx: Transaction
    descriptor: CollateralDescriptor
    input_paths: tuple[tuple[int, bool], ...]  # (address_index, change) per input
    input_amounts: tuple[int, ...]
    report: PolicyReport


def proven_prev_output(inp: InputScope, where: str) -> TransactionOutput:
    """The output an input spends, taken from its non_witness_utxo only after that
    transaction hashes to the outpoint's txid: an amount that cannot be lied about."""
    prev = inp.non_witness_utxo
    if prev is None:
        raise PolicyViolation("non_witness_utxo", f"{where} carries no previous transaction")
    if prev.txid() != inp.txid:
        raise PolicyViolation(
            "non_witness_utxo", f"{where}'s non_witness_utxo hashes to another txid"
        )
    if inp.vout >= len(prev.vout):
        raise PolicyViolation(
            "non_witness_utxo", f"{where}'s non_witness_utxo has no output {inp.vout}"
        )
    return prev.vout[inp.vout]


def _raw_unsigned_tx(psbt_b64: str) -> bytes | None:
    """The PSBT v0 global unsigned transaction, as bytes, exactly as sent."""
    try:
        stream = BytesIO(base64.b64decode("".join(psbt_b64.split()), validate=True))
        if stream.read(len(PSBT.MAGIC)) != PSBT.MAGIC:
            return None
        while key := read_string(stream):
            value: bytes = read_string(stream)
            if key == b"\x00":
                return value
    except Exception:
        return None
    return None


def _sighash_name(value: int) -> str:
    base = value & ~SIGHASH.ANYONECANPAY
    names = {SIGHASH.DEFAULT: "DEFAULT", SIGHASH.ALL: "ALL", SIGHASH.NONE: "NONE"}
    names[SIGHASH.SINGLE] = "SINGLE"
    name = names.get(base, f"0x{base:02x}")
    if value & SIGHASH.ANYONECANPAY:
        name += "|ANYONECANPAY"
    return f"SIGHASH_{name} (0x{value:02x})"


@dataclass
class _Checker:
    ctx: LoanContext
    approved: ApprovedAction
    checks: list[str] = field(default_factory=list)

    def ok(self, text: str) -> None:
        self.checks.append(text)

    # -- context and evidence ------------------------------------------------------

    def context(self) -> tuple[CollateralDescriptor, bytes, bytes]:
        ctx = self.ctx
        try:
            network = check_network(ctx.network)
            descriptor = parse_collateral_descriptor(ctx.descriptor, network)
            miner = address_script_pubkey(ctx.miner_return_address, network)
            bank = address_script_pubkey(ctx.bank_liquidation_address, network)
        except CustodyError as exc:
            raise PolicyViolation(
                "loan_context", f"the loan's records are unusable: {exc}"
            ) from None
        if "#" not in ctx.descriptor.strip():
            raise PolicyViolation("loan_context", "the loan's descriptor must carry its checksum")
        if miner == bank:
            raise PolicyViolation(
                "loan_context",
                "the miner's return address and the bank's liquidation address are the same",
            )
        if not ctx.collateral:
            raise PolicyViolation("loan_context", "the loan has no recorded collateral")
        for (txid, vout), (amount, index, _change) in ctx.collateral.items():
            if len(txid) != 64 or vout < 0 or amount <= 0 or index < 0:
                raise PolicyViolation(
                    "loan_context", f"recorded collateral {txid}:{vout} is malformed"
                )
        self.ok(f"loan context: descriptor parsed for {network}, payout addresses valid")
        return descriptor, miner, bank

    def evidence(self) -> None:
        a = self.approved
        if a.action not in ACTIONS:
            raise PolicyViolation("approved_action", f"unknown action {a.action!r}")
        if a.max_fee_sats < 0 or a.max_fee_rate_sat_vb <= 0 or a.tolerance_sats < 0:
            raise PolicyViolation(
                "approved_action", "fee caps must be positive and the tolerance not negative"
            )
        if a.action not in _RELEASES:
            if a.debt_kopecks is None or a.price_rub_per_btc is None:
                raise PolicyViolation(
                    "approved_action", f"a {a.action} needs the debt and the price as evidence"
                )
            if a.debt_kopecks <= 0 or a.price_rub_per_btc <= 0:
                raise PolicyViolation("approved_action", "the debt and the price must be positive")
        if a.action == "partial_liquidation" and (
            a.target_ltv_bps is None or a.change_address_index is None
        ):
            raise PolicyViolation(
                "approved_action",
                "a partial liquidation needs the target LTV and the new collateral address index",
            )
        self.ok(f"approved action: {a.action} with its evidence")

    # -- transaction ----------------------------------------------------------------

    def parse(self, psbt_b64: str) -> tuple[PSBT, Transaction]:
        if not isinstance(psbt_b64, str) or not psbt_b64.strip():
            raise PolicyViolation("psbt_format", "the PSBT is empty")
        if len(psbt_b64) > MAX_PSBT_BASE64_CHARS:
            raise PolicyViolation("psbt_format", "the PSBT is too large")
        try:
            psbt = PSBT.from_string(psbt_b64.strip())
        except Exception as exc:
            raise PolicyViolation(
                "psbt_format", f"the PSBT cannot be parsed ({type(exc).__name__})"
            ) from None
        if psbt.version not in (None, 0):
            raise PolicyViolation(
                "psbt_format", f"only PSBT version 0 is signed, not {psbt.version}"
            )
        if psbt.tx_version != 2:
            raise PolicyViolation(
                "tx_version", f"transaction version {psbt.tx_version} (only version 2 is signed)"
            )
        locktime = int(psbt.locktime or 0)
        if locktime >= LOCKTIME_THRESHOLD:
            raise PolicyViolation(
                "locktime",
                f"locktime {locktime} is a timestamp; only 0 or a past block height is signed",
            )
        tip = self.ctx.tip_height
        if locktime and (tip is None or locktime > tip):
            raise PolicyViolation(
                "locktime",
                f"locktime {locktime} is above the chain tip ({tip}): a post-dated "
                "transaction is not signed",
            )
        for n, inp in enumerate(psbt.tx.vin):
            if int(inp.sequence) not in ALLOWED_SEQUENCES:
                raise PolicyViolation(
                    "sequence",
                    f"input {n} has nSequence {int(inp.sequence):#010x}; only final "
                    "(0xffffffff) or 0xfffffffd (RBF, no relative timelock) is signed",
                )
        # embit's parser normalises the unsigned transaction (a zero input sequence
        # becomes 0xffffffff, a scriptSig is dropped) and writes the normalised form
        # back: a signature over it would not be a signature over what the API sent.
        # So the global transaction is read raw and must be exactly what embit sees.
        tx: Transaction = psbt.tx
        if _raw_unsigned_tx(psbt_b64) != tx.serialize():
            raise PolicyViolation(
                "psbt_format",
                "the unsigned transaction does not survive a re-serialisation (an input "
                "sequence of 0 or a scriptSig?): refusing rather than signing something else",
            )
        if not psbt.inputs or not psbt.outputs:
            raise PolicyViolation("psbt_format", "the transaction has no inputs or no outputs")
        self.ok(
            f"PSBT v0, tx version 2, locktime {locktime} (not after the tip), no relative timelocks"
        )
        return psbt, tx

    def inputs(
        self, psbt: PSBT, descriptor: CollateralDescriptor
    ) -> tuple[tuple[tuple[int, bool], ...], tuple[int, ...]]:
        seen: set[tuple[str, int]] = set()
        paths: list[tuple[int, bool]] = []
        amounts: list[int] = []
        for n, inp in enumerate(psbt.inputs):
            outpoint = (inp.txid.hex(), int(inp.vout))
            where = f"input {n} ({outpoint[0]}:{outpoint[1]})"
            if outpoint in seen:
                raise PolicyViolation("duplicate_input", f"{where} is spent twice")
            seen.add(outpoint)
            record = self.ctx.collateral.get(outpoint)
            if record is None:
                raise PolicyViolation(
                    "foreign_input",
                    f"{where} is not this loan's collateral (another loan's coins, or unknown)",
                )
            amount, index, change = record
            if inp.sighash_type is not None and inp.sighash_type != SIGHASH.ALL:
                raise PolicyViolation(
                    "sighash",
                    f"{where} asks for {_sighash_name(inp.sighash_type)}; "
                    "only SIGHASH_ALL is signed",
                )
            if inp.final_scriptwitness is not None or inp.final_scriptsig is not None:
                raise PolicyViolation("finalized_input", f"{where} is already finalized")
            if inp.redeem_script is not None:
                raise PolicyViolation(
                    "input_script", f"{where} has a redeem script; collateral is native P2WSH"
                )
            if inp.witness_utxo is None:
                raise PolicyViolation("witness_utxo", f"{where} has no witness_utxo")
            if int(inp.witness_utxo.value) != amount:
                raise PolicyViolation(
                    "witness_utxo_amount",
                    f"{where} claims {inp.witness_utxo.value} sats; the loan records {amount}",
                )
            expected_spk = descriptor.script_pubkey(index, change)
            if inp.witness_utxo.script_pubkey.data != expected_spk:
                raise PolicyViolation(
                    "witness_utxo_script",
                    f"{where}'s witness_utxo script is not the loan's address at index {index}",
                )
            expected_ws = descriptor.witness_script(index, change)
            if inp.witness_script is None or inp.witness_script.data != expected_ws:
                raise PolicyViolation(
                    "witness_script",
                    f"{where}'s witness_script is not the loan's 2-of-3 script at index {index}",
                )
            if inp.non_witness_utxo is not None:
                spent = proven_prev_output(inp, where)
                if int(spent.value) != amount or spent.script_pubkey.data != expected_spk:
                    raise PolicyViolation(
                        "non_witness_utxo",
                        f"{where}'s non_witness_utxo disagrees with the recorded collateral",
                    )
            paths.append((index, change))
            amounts.append(amount)
        missing = sorted(set(self.ctx.collateral) - seen)
        if missing:
            listed = ", ".join(f"{t}:{v}" for t, v in missing)
            raise PolicyViolation(
                "collateral_not_spent",
                f"the PSBT leaves recorded collateral unspent ({listed}); "
                "the approved action moves all of the loan's collateral",
            )
        self.ok(
            f"{len(paths)} input(s): exactly the loan's recorded collateral, amounts, scripts "
            "and witness scripts match, sighash ALL"
        )
        return tuple(paths), tuple(amounts)

    def fee(self, psbt: PSBT, tx: Transaction, total_in: int) -> tuple[int, int]:
        total_out = sum(int(o.value) for o in tx.vout)
        fee = total_in - total_out
        if fee < 0:
            raise PolicyViolation(
                "fee", f"outputs ({total_out} sats) exceed the recorded inputs ({total_in} sats)"
            )
        base = len(tx.serialize())  # no witnesses yet: the stripped size
        witness = sum(_WITNESS_FIXED_BYTES + len(inp.witness_script.data) for inp in psbt.inputs)
        vsize = math.ceil((4 * base + _SEGWIT_MARKER_FLAG_WEIGHT + witness) / 4)
        a = self.approved
        if fee > a.max_fee_sats:
            raise PolicyViolation(
                "fee_cap", f"the fee of {fee} sats is above the cap of {a.max_fee_sats} sats"
            )
        if Decimal(fee) > a.max_fee_rate_sat_vb * vsize:
            rate = (Decimal(fee) / vsize).quantize(Decimal("0.01"))
            raise PolicyViolation(
                "fee_rate",
                f"the fee rate of {rate} sat/vB (fee {fee} sats, ~{vsize} vB) is above the cap "
                f"of {a.max_fee_rate_sat_vb} sat/vB",
            )
        self.ok(f"fee {fee} sats for ~{vsize} vB is under both caps")
        return fee, vsize

    def outputs(
        self,
        tx: Transaction,
        descriptor: CollateralDescriptor,
        miner_spk: bytes,
        bank_spk: bytes,
        total_in: int,
        fee: int,
    ) -> tuple[tuple[tuple[str, int], ...], int | None]:
        a = self.approved
        allowed: dict[bytes, str] = {miner_spk: "miner_return"}
        if a.action not in _RELEASES:
            allowed[bank_spk] = "bank_liquidation"
        if a.action == "partial_liquidation":
            assert a.change_address_index is not None  # evidence() checked
            try:
                change_spk = descriptor.script_pubkey(
                    a.change_address_index, a.change_address_change
                )
            except CustodyError as exc:
                raise PolicyViolation("approved_action", str(exc)) from None
            del allowed[miner_spk]  # a partial liquidation pays nothing out to the miner
            allowed[change_spk] = "collateral_change"
        roles: list[tuple[str, int]] = []
        seen: set[bytes] = set()
        for n, out in enumerate(tx.vout):
            spk = out.script_pubkey.data
            value = int(out.value)
            if spk in seen:
                raise PolicyViolation(
                    "duplicate_output", f"output {n} pays {self._where(spk)} a second time"
                )
            seen.add(spk)
            role = allowed.get(spk)
            if role is None:
                raise PolicyViolation(
                    "foreign_output",
                    f"output {n} pays {self._where(spk)}, which the approved {a.action} "
                    "does not allow",
                )
            if value <= 0:
                raise PolicyViolation("output_amount", f"output {n} ({role}) carries no value")
            roles.append((role, value))
        by_role = dict(roles)
        expected_bank: int | None = None
        if a.action in _RELEASES:
            if len(roles) != 1:
                raise PolicyViolation(
                    "output_count", "a release has exactly one output, to the miner"
                )
        elif a.action in _LIQUIDATIONS:
            assert a.debt_kopecks is not None and a.price_rub_per_btc is not None
            if "bank_liquidation" not in by_role:
                raise PolicyViolation(
                    "missing_output", "the liquidation pays nothing to the bank's address"
                )
            owed = sats_for_kopecks(a.debt_kopecks, a.price_rub_per_btc)
            expected_bank = min(owed, total_in - fee)
            self._bank_amount(by_role["bank_liquidation"], expected_bank, owed)
        else:
            assert a.debt_kopecks is not None and a.price_rub_per_btc is not None
            assert a.target_ltv_bps is not None
            if set(by_role) != {"bank_liquidation", "collateral_change"}:
                raise PolicyViolation(
                    "missing_output",
                    "a partial liquidation has one output to the bank and one back to the "
                    "loan's new collateral address",
                )
            try:
                split = partial_liquidation_split(
                    total_in,
                    fee,
                    a.debt_kopecks,
                    a.price_rub_per_btc,
                    a.target_ltv_bps,
                    bank_dust=1,
                    change_dust=1,
                )
            except CustodyError as exc:
                raise PolicyViolation("partial_split", exc.message) from None
            expected_bank = split.outputs["bank_liquidation"]
            self._bank_amount(by_role["bank_liquidation"], expected_bank, expected_bank)
        self.ok(
            "outputs: only the addresses the approved action names, no duplicates, "
            "amounts recomputed from the evidence and the recorded inputs"
        )
        return tuple(roles), expected_bank

    def _bank_amount(self, got: int, expected: int, owed: int) -> None:
        tol = self.approved.tolerance_sats
        if got > expected + tol:
            raise PolicyViolation(
                "bank_overpaid",
                f"the bank would receive {got} sats; the evidence gives {expected} sats "
                f"(+{tol} tolerance)",
            )
        if got < expected - tol:
            raise PolicyViolation(
                "bank_underpaid",
                f"the bank would receive {got} sats; it is owed {owed} sats and the "
                f"collateral covers {expected} (-{tol} tolerance)",
            )

    def _where(self, spk: bytes) -> str:
        try:
            address: str = Script(spk).address(embit_network(self.ctx.network))
            return address
        except Exception:
            return f"script {spk.hex()}"


def evaluate_psbt(psbt_b64: str, ctx: LoanContext, approved: ApprovedAction) -> CheckedPsbt:
    """Run every check; return the parsed PSBT with the report, or raise PolicyViolation."""
    checker = _Checker(ctx, approved)
    descriptor, miner_spk, bank_spk = checker.context()
    checker.evidence()
    psbt, tx = checker.parse(psbt_b64)
    paths, amounts = checker.inputs(psbt, descriptor)
    total_in = sum(amounts)
    fee, vsize = checker.fee(psbt, tx, total_in)
    roles, expected_bank = checker.outputs(tx, descriptor, miner_spk, bank_spk, total_in, fee)
    report = PolicyReport(
        action=approved.action,
        inputs=tuple(
            (i.txid.hex(), int(i.vout), amt) for i, amt in zip(psbt.inputs, amounts, strict=True)
        ),
        outputs=roles,
        total_in_sats=total_in,
        fee_sats=fee,
        vsize_estimate=vsize,
        expected_bank_sats=expected_bank,
        checks=tuple(checker.checks),
    )
    return CheckedPsbt(psbt, tx, descriptor, paths, amounts, report)


def check_psbt(psbt_b64: str, ctx: LoanContext, approved: ApprovedAction) -> PolicyReport:
    """The policy decision alone: a report of what was checked, or PolicyViolation."""
    return evaluate_psbt(psbt_b64, ctx, approved).report


# -- the control proof: a BIP-127 proof-of-reserves transaction ---------------------------

PROOF_OF_RESERVES: Final = "proof_of_reserves"


def evaluate_proof_of_reserves(psbt_b64: str, ctx: LoanContext, challenge: str) -> CheckedPsbt:
    """A proof-of-reserves PSBT over some of the loan's coins, or PolicyViolation.

    The bank signs it only when its FIRST input is exactly the commitment to `challenge`
    (`pledge.proof.bip127_commitment`: an outpoint that cannot exist, so the transaction
    can never be mined), every other input is the loan's confirmed collateral with the
    loan's scripts, SIGHASH_ALL (a signature that commits to the commitment input too),
    and the one output is the inputs' exact sum to a bare OP_RETURN: no fee and no other
    output. A "proof" whose first input is a real outpoint is a spend and is refused.
    `input_paths`/`input_amounts` of the result are those of inputs 1.. (the ones signed)."""
    checker = _Checker(ctx, ApprovedAction(action="release"))
    descriptor, _, _ = checker.context()
    psbt, tx = checker.parse(psbt_b64)
    if int(psbt.locktime or 0) != 0:
        raise PolicyViolation("locktime", "a proof of reserves has locktime 0")
    try:
        commitment = bip127_commitment(challenge)
    except CustodyError as exc:
        raise PolicyViolation("proof_challenge", exc.message, field="challenge") from None
    first = psbt.inputs[0]
    where = f"{first.txid.hex()}:{int(first.vout)}"
    if first.txid[::-1] != commitment or int(first.vout) != 0:
        raise PolicyViolation(
            "proof_commitment",
            f"the first input ({where}) is not the commitment to the challenge (BIP-127): "
            "a proof whose first input is a real outpoint could move coins",
            field="psbt",
        )
    assumed = first.witness_utxo
    if (
        assumed is not None
        and (int(assumed.value) != 0 or assumed.script_pubkey.data != COMMITMENT_UTXO_SCRIPT)
    ) or (
        first.non_witness_utxo is not None
        or first.witness_script is not None
        or first.partial_sigs
        or first.final_scriptwitness is not None
        or first.final_scriptsig is not None
    ):
        raise PolicyViolation(
            "proof_commitment", "the commitment input carries spending data", field="psbt"
        )
    checker.ok(f"first input: the commitment to the challenge ({commitment.hex()})")
    if len(psbt.inputs) < 2:
        raise PolicyViolation("proof_inputs", "the proof spends none of the loan's coins")
    named = {(i.txid.hex(), int(i.vout)) for i in psbt.inputs[1:]}
    coins = {k: v for k, v in ctx.collateral.items() if k in named}
    if not coins:
        raise PolicyViolation("foreign_input", "no input after the commitment is this loan's")
    rest = PSBT(Transaction(version=tx.version, vin=tx.vin[1:], vout=tx.vout, locktime=0))
    rest.inputs = psbt.inputs[1:]
    sub = _Checker(replace(ctx, collateral=coins), checker.approved, checker.checks)
    paths, amounts = sub.inputs(rest, descriptor)
    total = sum(amounts)
    if len(tx.vout) != 1:
        raise PolicyViolation(
            "proof_outputs", f"a proof of reserves has one output, not {len(tx.vout)}"
        )
    out = tx.vout[0]
    if out.script_pubkey.data != CONTROL_OUTPUT_SCRIPT:
        raise PolicyViolation(
            "proof_outputs", "the proof's output is not a bare OP_RETURN: it would pay someone"
        )
    if int(out.value) != total:
        raise PolicyViolation(
            "proof_outputs",
            f"the proof's output is {out.value} sats, not the inputs' {total} (BIP-127: no fee)",
        )
    checker.ok(f"one OP_RETURN output of exactly the inputs' {total} sats")
    report = PolicyReport(
        action=PROOF_OF_RESERVES,
        inputs=tuple(
            (i.txid.hex(), int(i.vout), a) for i, a in zip(psbt.inputs[1:], amounts, strict=True)
        ),
        outputs=(("op_return", total),),
        total_in_sats=total,
        fee_sats=0,
        vsize_estimate=0,
        expected_bank_sats=None,
        checks=tuple(checker.checks),
    )
    return CheckedPsbt(psbt, tx, descriptor, paths, amounts, report)
