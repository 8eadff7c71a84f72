"""Release and liquidation PSBTs for a loan's 2-of-3 collateral.

The service builds one BIP-174 v0 PSBT per signing request, hands it to the
parties (hardware wallets, the bank's HSM, air-gapped devices via files), and
takes signed copies back. An uploaded copy is untrusted input from a device or a
person: it is kept only if its unsigned transaction is byte-for-byte the request's
and every new signature verifies against the BIP-143 sighash (computed by embit)
for one of the loan's own keys. Finalisation is left to bdkpython (Rust
miniscript), which satisfies the script and checks the signatures a second time,
so a bug in one library is not enough to broadcast something wrong.

Fee estimates use bdk's `max_weight_to_satisfy()` for the witness and embit's
serialisation for everything else, so they are an upper bound that tracks the
libraries rather than remembered constants.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from typing import Any, Final

from embit import bip32, compact
from embit.ec import PublicKey, Signature
from embit.psbt import PSBT, DerivationPath, read_string
from embit.script import Script, Witness
from embit.transaction import SIGHASH, Transaction, TransactionInput, TransactionOutput
from embit.util import secp256k1

from custody.errors import BadSignature, NoNewSignature, PsbtMismatch
from pledge import psbts
from pledge.addresses import address_script_pubkey
from pledge.bdk_ffi import bdk
from pledge.descriptors import PARTIES, CollateralDescriptor
from pledge.errors import Conflict, InvalidInput
from pledge.keys import FixedKey, HDKey
from pledge.network import NetworkName, bdk_network_kind, check_network, embit_network

TX_VERSION: Final = 2
RBF_SEQUENCE: Final = 0xFFFFFFFD
MAX_PSBT_BYTES: Final = 1_000_000
# base64 grows 4/3; allow line breaks too (76-column wrapping adds ~1/76).
_MAX_PSBT_TEXT: Final = MAX_PSBT_BYTES * 4 // 3 + MAX_PSBT_BYTES // 50 + 64
PSBT_MAGIC: Final = b"psbt\xff"
# BIP-141: the segwit marker and flag bytes, counted at witness weight (1 WU each).
_SEGWIT_MARKER_FLAG_WU: Final = 2
_WITNESS_SCALE: Final = 4
# Bitcoin Core's DUST_RELAY_TX_FEE (sat per 1000 vB) and GetDustThreshold's
# assumed spend sizes: a P2PKH-like input (107-byte scriptSig) or a witness input.
_DUST_RELAY_FEE_PER_KVB: Final = 3_000
_SPEND_INPUT_NON_WITNESS: Final = 32 + 4 + 1 + 4
_SPEND_SCRIPTSIG: Final = 107
_MAX_STANDARD_SCRIPT: Final = 10_000
_OP_RETURN: Final = 0x6A
_OP_0: Final = 0x00
_OP_1: Final = 0x51
_OP_16: Final = 0x60
_SIGHASH_NAMES: Final = {SIGHASH.ALL: "ALL", SIGHASH.NONE: "NONE", SIGHASH.SINGLE: "SINGLE"}


class CannotFinalize(Conflict):
    """The PSBT cannot be turned into a valid transaction yet (missing or bad
    signatures): the request stays open until the quorum is really met."""

    code = "cannot_finalize"


@dataclass(frozen=True)
class CollateralInput:
    """One confirmed collateral UTXO, with the full previous transaction
    (hardware wallets verify it to rule out the segwit fee attack)."""

    txid: str
    vout: int
    amount_sats: int
    address_index: int
    change: bool
    prev_tx: bytes


@dataclass(frozen=True)
class PayTo:
    """An output to an outside address (miner's return, bank's liquidation)."""

    address: str
    amount_sats: int
    role: str


@dataclass(frozen=True)
class PayToCollateral:
    """An output back to the loan's own descriptor (partial liquidation)."""

    address_index: int
    change: bool
    amount_sats: int


# -- sizes and dust ----------------------------------------------------------


@lru_cache(maxsize=256)
def _max_satisfaction_weight(descriptor_text: str, network: NetworkName) -> int:
    """bdk's upper bound on the witness weight of one spend of this descriptor."""
    parsed = bdk.Descriptor(descriptor_text, bdk_network_kind(network))
    return int(parsed.max_weight_to_satisfy())


def _input_weight(descriptor: CollateralDescriptor) -> int:
    """Worst-case weight of one satisfied collateral input, in weight units.

    Non-witness part (outpoint, empty scriptSig, sequence) at 4 WU per byte, the
    empty witness's item count that `max_weight_to_satisfy` takes as its baseline,
    then bdk's maximum satisfaction weight (item count growth, signatures, script)."""
    non_witness = len(TransactionInput(bytes(32), 0, sequence=RBF_SEQUENCE).serialize())
    empty_witness = len(Witness([]).serialize())
    witness = _max_satisfaction_weight(descriptor.receive_descriptor, descriptor.network)
    return _WITNESS_SCALE * non_witness + empty_witness + witness


def input_vbytes(descriptor: CollateralDescriptor) -> float:
    """Worst-case virtual size of one collateral input (fractional: weight / 4)."""
    return _input_weight(descriptor) / _WITNESS_SCALE


def output_vbytes(script_pubkey: bytes) -> int:
    """Serialized size of an output paying `script_pubkey`: 8 + varint + script."""
    return len(TransactionOutput(0, Script(script_pubkey)).serialize())


def estimate_vsize(
    descriptor: CollateralDescriptor, n_inputs: int, output_scripts: Sequence[bytes]
) -> int:
    """Upper bound on the vsize of a transaction spending `n_inputs` collateral
    inputs to `output_scripts`, rounded up (fees are paid on whole vbytes)."""
    if n_inputs < 1:
        raise ValueError("a transaction needs at least one input")
    empty = Transaction(version=TX_VERSION, vin=[], vout=[], locktime=0).serialize()
    # The empty serialisation already holds one-byte input and output counts.
    base = (
        len(empty)
        - 2
        + len(compact.to_bytes(n_inputs))
        + len(compact.to_bytes(len(output_scripts)))
    )
    weight = _WITNESS_SCALE * base + _SEGWIT_MARKER_FLAG_WU
    weight += n_inputs * _input_weight(descriptor)
    weight += sum(_WITNESS_SCALE * output_vbytes(spk) for spk in output_scripts)
    return math.ceil(weight / _WITNESS_SCALE)


def _is_witness_program(spk: bytes) -> bool:
    """Core's CScript::IsWitnessProgram: OP_0..OP_16 then one 2..40-byte push."""
    if not 4 <= len(spk) <= 42:
        return False
    if spk[0] != _OP_0 and not _OP_1 <= spk[0] <= _OP_16:
        return False
    return spk[1] + 2 == len(spk)


def dust_limit(script_pubkey: bytes) -> int:
    """Bitcoin Core's GetDustThreshold at the default dust relay fee (3 sat/vB):
    an output worth less than spending it costs is non-standard."""
    if (script_pubkey and script_pubkey[0] == _OP_RETURN) or len(
        script_pubkey
    ) > _MAX_STANDARD_SCRIPT:
        return 0  # unspendable: no dust threshold
    size = output_vbytes(script_pubkey)
    if _is_witness_program(script_pubkey):
        size += _SPEND_INPUT_NON_WITNESS + _SPEND_SCRIPTSIG // _WITNESS_SCALE
    else:
        size += _SPEND_INPUT_NON_WITNESS + _SPEND_SCRIPTSIG
    return _DUST_RELAY_FEE_PER_KVB * size // 1000


# -- building ------------------------------------------------------------------


def _hd_derivations(descriptor: CollateralDescriptor, index: int, change: bool) -> dict[Any, Any]:
    """BIP-32 derivation fields for every HD key: how a wallet finds its key."""
    out: dict[Any, Any] = {}
    for key in descriptor.hd_keys:
        fingerprint, path = key.derivation(int(change), index)
        out[PublicKey.parse(key.public_key(int(change), index))] = DerivationPath(fingerprint, path)
    return out


def _parse_prev_tx(item: CollateralInput, descriptor: CollateralDescriptor) -> Any:
    """The previous transaction, checked against the outpoint, amount and script."""
    try:
        prev = Transaction.parse(bytes(item.prev_tx))
    except Exception:
        raise ValueError(
            f"the previous transaction of {item.txid}:{item.vout} does not parse"
        ) from None
    if prev.txid().hex() != item.txid:
        raise ValueError(
            f"the previous transaction given for {item.txid}:{item.vout} has txid "
            f"{prev.txid().hex()}"
        )
    if item.vout >= len(prev.vout):
        raise ValueError(f"{item.txid} has no output {item.vout}")
    out = prev.vout[item.vout]
    if out.value != item.amount_sats:
        raise ValueError(f"{item.txid}:{item.vout} holds {out.value} sats, not {item.amount_sats}")
    if out.script_pubkey.data != descriptor.script_pubkey(item.address_index, item.change):
        raise ValueError(
            f"{item.txid}:{item.vout} does not pay this loan's address at index "
            f"{item.address_index} (change={item.change})"
        )
    return prev


def _check_input(item: CollateralInput) -> None:
    if len(item.txid) != 64 or any(c not in "0123456789abcdef" for c in item.txid):
        raise ValueError(f"txid must be 64 lower-case hex characters, got {item.txid!r}")
    if not 0 <= item.vout < 2**32:
        raise ValueError(f"vout out of range: {item.vout}")
    if item.amount_sats <= 0:
        raise ValueError(f"input amount must be positive: {item.amount_sats}")


def _output_script(
    descriptor: CollateralDescriptor, network: NetworkName, out: PayTo | PayToCollateral
) -> bytes:
    if isinstance(out, PayTo):
        return address_script_pubkey(out.address, network)
    return descriptor.script_pubkey(out.address_index, out.change)


def build_psbt(
    descriptor: CollateralDescriptor,
    network: NetworkName,
    inputs: Sequence[CollateralInput],
    outputs: Sequence[PayTo | PayToCollateral],
    *,
    locktime: int = 0,
) -> str:
    """An unsigned v0 PSBT (base64) carrying everything hardware wallets need.

    Inputs and outputs keep the caller's order. Raises ValueError for a caller
    mistake (dust output, outputs above inputs, a previous transaction that does
    not match its outpoint): these are bugs upstream, not user input."""
    network = check_network(network)
    if network != descriptor.network:
        raise ValueError(f"the descriptor is for {descriptor.network}, not {network}")
    if not inputs:
        raise ValueError("a PSBT needs at least one input")
    if not outputs:
        raise ValueError("a PSBT needs at least one output")
    if not 0 <= locktime < 2**32:
        raise ValueError(f"locktime out of range: {locktime}")
    outpoints = [(i.txid, i.vout) for i in inputs]
    if len(set(outpoints)) != len(outpoints):
        raise ValueError("the same outpoint is spent twice")

    prev_txs = []
    for item in inputs:
        _check_input(item)
        prev_txs.append(_parse_prev_tx(item, descriptor))

    scripts = [_output_script(descriptor, network, out) for out in outputs]
    for n, (out, spk) in enumerate(zip(outputs, scripts, strict=True)):
        limit = dust_limit(spk)
        if out.amount_sats < max(limit, 1):
            raise ValueError(
                f"output {n} ({getattr(out, 'role', 'collateral')}) pays {out.amount_sats} sats, "
                f"below its dust limit of {limit}: fold it into the fee"
            )
    total_in = sum(i.amount_sats for i in inputs)
    total_out = sum(o.amount_sats for o in outputs)
    if total_out > total_in:
        raise ValueError(f"outputs ({total_out} sats) exceed inputs ({total_in} sats)")

    tx = Transaction(
        version=TX_VERSION,
        locktime=locktime,
        vin=[
            TransactionInput(bytes.fromhex(i.txid), i.vout, sequence=RBF_SEQUENCE) for i in inputs
        ],
        vout=[
            TransactionOutput(o.amount_sats, Script(spk))
            for o, spk in zip(outputs, scripts, strict=True)
        ],
    )
    psbt = PSBT(tx)
    for psbt_in, item, prev in zip(psbt.inputs, inputs, prev_txs, strict=True):
        psbt_in.non_witness_utxo = prev
        psbt_in.witness_utxo = prev.vout[item.vout]
        psbt_in.witness_script = Script(descriptor.witness_script(item.address_index, item.change))
        psbt_in.sighash_type = SIGHASH.ALL
        psbt_in.bip32_derivations.update(
            _hd_derivations(descriptor, item.address_index, item.change)
        )
    for psbt_out, out in zip(psbt.outputs, outputs, strict=True):
        if isinstance(out, PayToCollateral):
            psbt_out.witness_script = Script(
                descriptor.witness_script(out.address_index, out.change)
            )
            psbt_out.bip32_derivations.update(
                _hd_derivations(descriptor, out.address_index, out.change)
            )
    if not descriptor.has_fixed_key:
        for key in descriptor.hd_keys:
            psbt.xpubs[bip32.HDKey.from_base58(key.xpub)] = DerivationPath(
                bytes.fromhex(key.fingerprint), key.path
            )
    text: str = psbt.to_base64()
    try:  # the second library must read what the first wrote
        bdk.Psbt(text)
    except Exception as exc:
        raise ValueError(f"bdkpython cannot parse the PSBT embit built: {exc}") from None
    return text


# -- parsing -------------------------------------------------------------------


def _decode(data: bytes | str, field: str) -> bytes:
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        if raw.startswith(PSBT_MAGIC):
            if len(raw) > MAX_PSBT_BYTES:
                raise InvalidInput("the PSBT is larger than 1 MB", field=field)
            return raw
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidInput(
                "not a PSBT: neither a binary PSBT (it does not start with the PSBT magic "
                "bytes) nor base64 text",
                field=field,
            ) from None
    elif isinstance(data, str):
        text = data
    else:
        raise InvalidInput("not a PSBT: expected base64 text or a binary .psbt file", field=field)
    if len(text) > _MAX_PSBT_TEXT:
        raise InvalidInput("the PSBT is larger than 1 MB", field=field)
    compact_text = "".join(text.split())
    if not compact_text:
        raise InvalidInput("not a PSBT: the upload is empty", field=field)
    try:
        raw = base64.b64decode(compact_text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(
            "not a PSBT: the text is not valid base64 (truncated or corrupted?)", field=field
        ) from None
    if len(raw) > MAX_PSBT_BYTES:
        raise InvalidInput("the PSBT is larger than 1 MB", field=field)
    if not raw.startswith(PSBT_MAGIC):
        raise InvalidInput(
            "not a PSBT: the decoded data does not start with the PSBT magic bytes", field=field
        )
    return raw


def _parse_embit(data: bytes | str, field: str) -> tuple[Any, bytes]:
    raw = _decode(data, field)
    stream = BytesIO(raw)
    try:
        psbt = PSBT.read_from(stream)
    except Exception as exc:
        raise InvalidInput(f"not a PSBT: {exc or type(exc).__name__}", field=field) from None
    if stream.read(1):
        raise InvalidInput("not a PSBT: unexpected bytes after the end of the PSBT", field=field)
    if psbt.version not in (None, 0):
        raise InvalidInput(
            f"PSBT version {psbt.version} is not supported: export it as version 0",
            field=field,
        )
    return psbt, raw


def _parse_bdk(raw: bytes, field: str) -> None:
    """The second parser: rust-bitcoin is stricter than embit in places (scriptSigs
    in the unsigned transaction, malformed signatures), so both must accept."""
    try:
        bdk.Psbt(base64.b64encode(raw).decode("ascii"))
    except Exception as exc:
        raise InvalidInput(f"not a valid PSBT: {exc}", field=field) from None


def parse_psbt(data: bytes | str, *, field: str = "psbt") -> Any:
    """Parse an uploaded PSBT (base64 text or binary) into an `embit.psbt.PSBT`.

    Both embit and bdkpython must accept it, with nothing trailing, and it must
    be version 0 (what this service issues); every failure is an InvalidInput
    that says what is wrong rather than a library traceback."""
    psbt, raw = _parse_embit(data, field)
    _parse_bdk(raw, field)
    return psbt


def _own_psbt(psbt_b64: str) -> Any:
    """Parse a PSBT this service built and stored: failure is a bug, not user input."""
    try:
        return PSBT.from_base64(psbt_b64)
    except Exception as exc:
        raise ValueError(f"the stored PSBT does not parse: {exc}") from None


def unsigned_txid(psbt_b64: str) -> str:
    """The txid of the unsigned transaction (final for segwit: signing cannot change it)."""
    try:
        return psbts.unsigned_txid(psbt_b64)
    except ValueError as exc:
        raise ValueError(f"the stored PSBT does not parse: {exc}") from None


# -- checking an upload --------------------------------------------------------


def _describe_script(spk: bytes, network: NetworkName) -> str:
    try:
        address: str = Script(spk).address(embit_network(network))
        return address
    except Exception:
        return f"script {spk.hex()[:40]}"


def _global_tx(raw: bytes) -> Any:
    """The v0 PSBT's unsigned transaction exactly as serialized. embit's
    `PSBT.tx` substitutes defaults for falsy fields (version 0 -> 2, sequence
    0 -> 0xFFFFFFFF), which would hide differences an upload must be refused for."""
    stream = BytesIO(raw[len(PSBT_MAGIC) :])
    while key := read_string(stream):
        value = read_string(stream)
        if key == b"\x00":
            return Transaction.parse(value)
    raise InvalidInput("not a PSBT: it has no unsigned transaction", field="psbt")


def _tx_difference(ours: Any, theirs: Any, network: NetworkName) -> str | None:
    """The first way `theirs` differs from `ours`, in words, or None if identical."""
    if theirs.version != ours.version:
        return f"the transaction version is {theirs.version}, the request has {ours.version}"
    if theirs.locktime != ours.locktime:
        return f"the locktime is {theirs.locktime}, the request has {ours.locktime}"
    if len(theirs.vin) != len(ours.vin):
        return f"it has {len(theirs.vin)} input(s), the request has {len(ours.vin)}"
    for n, (a, b) in enumerate(zip(ours.vin, theirs.vin, strict=True)):
        if (a.txid, a.vout) != (b.txid, b.vout):
            return (
                f"input {n} spends {b.txid.hex()}:{b.vout}, the request spends "
                f"{a.txid.hex()}:{a.vout}"
            )
        if a.sequence != b.sequence:
            return f"input {n} has sequence {b.sequence:#010x}, the request has {a.sequence:#010x}"
    if len(theirs.vout) != len(ours.vout):
        return f"it has {len(theirs.vout)} output(s), the request has {len(ours.vout)}"
    for n, (a, b) in enumerate(zip(ours.vout, theirs.vout, strict=True)):
        if a.script_pubkey.data != b.script_pubkey.data:
            return (
                f"output {n} pays {_describe_script(b.script_pubkey.data, network)}, the "
                f"request pays {_describe_script(a.script_pubkey.data, network)}"
            )
        if a.value != b.value:
            return f"output {n} pays {b.value} sats, the request pays {a.value} sats"
    if theirs.serialize() != ours.serialize():  # nothing named above may differ, but be sure
        return "the serialized transaction differs"
    return None


def sighash_name(value: int) -> str:
    """`ALL`, `NONE|ANYONECANPAY`... for messages a person can act on."""
    base = _SIGHASH_NAMES.get(value & ~SIGHASH.ANYONECANPAY)
    if base is None:
        return f"unknown ({value:#04x})"
    return base + ("|ANYONECANPAY" if value & SIGHASH.ANYONECANPAY else "")


@dataclass(frozen=True)
class _InputContext:
    index: int
    keys: dict[bytes, str]  # pubkey33 -> party
    witness_script: bytes
    witness_utxo: bytes
    non_witness_utxo: bytes
    sighash: bytes  # BIP-143 digest for SIGHASH_ALL


def _loan_keys(descriptor: CollateralDescriptor, index: int, change: bool) -> dict[bytes, str]:
    out: dict[bytes, str] = {}
    for party, key in zip(PARTIES, descriptor.keys, strict=True):
        if isinstance(key, HDKey):
            out[key.public_key(int(change), index)] = party
        elif isinstance(key, FixedKey):
            out[key.public_key] = party
    return out


def _signature_problem(sig: bytes, pub: bytes, digest: bytes) -> str | None:
    """Why a partial signature is unacceptable, or None when it is good.

    Checked in an order that names the most useful reason: sighash type first
    (a valid NONE signature is still refused, and the person must learn why),
    then strict DER (round trip through libsecp256k1), then low-S, then the
    signature itself."""
    if len(sig) < 2:
        return "is empty or truncated"
    hash_type = sig[-1]
    if hash_type != SIGHASH.ALL:
        return f"uses sighash {sighash_name(hash_type)}; only SIGHASH_ALL is accepted"
    der = sig[:-1]
    try:
        compact_sig = secp256k1.ecdsa_signature_parse_der(der)
        canonical = secp256k1.ecdsa_signature_serialize_der(compact_sig)
    except Exception:
        return "is not a strict DER signature"
    if canonical != der:
        return "is not a strict DER signature"
    if secp256k1.ecdsa_signature_normalize(compact_sig) != compact_sig:
        return "has a high S value (not standard: low-S is required)"
    try:
        ok = PublicKey.parse(pub).verify(Signature(compact_sig), digest)
    except Exception:
        ok = False
    if not ok:
        return "does not verify against this transaction's sighash"
    return None


def _fail(message: str, kind: type[InvalidInput] = BadSignature) -> InvalidInput:
    """A refused upload, named for what is wrong with it (field `psbt`)."""
    return kind(message, field="psbt")


def _check_partial(ctx: _InputContext, pub: bytes, sig: bytes) -> None:
    party = ctx.keys.get(pub)
    if party is None:
        raise _fail(
            f"input {ctx.index}: a signature from key {pub.hex()}, which is not one of "
            "this input's three keys (key not in this loan)"
        )
    problem = _signature_problem(sig, pub, ctx.sighash)
    if problem is not None:
        raise _fail(f"input {ctx.index}: the {party}'s signature {problem}")


def _final_witness_sigs(ctx: _InputContext, psbt_in: Any) -> dict[bytes, bytes]:
    """Signatures out of an input some wallet already finalised (Coldcard and
    Sparrow do when they complete the quorum): `[<empty>, sig.., witness_script]`.
    Each is attributed to the loan key it verifies under."""
    if psbt_in.final_scriptsig is not None and psbt_in.final_scriptsig.data:
        raise _fail(f"input {ctx.index}: a segwit input must not carry a scriptSig")
    items: list[bytes] = list(psbt_in.final_scriptwitness.items)
    if len(items) < 2 or items[0] != b"" or items[-1] != ctx.witness_script:
        raise _fail(
            f"input {ctx.index}: its final witness is not a spend of this loan's 2-of-3 script"
        )
    found: dict[bytes, bytes] = {}
    for sig in items[1:-1]:
        problems: list[str] = []
        for pub in ctx.keys:
            problem = _signature_problem(sig, pub, ctx.sighash)
            if problem is None:
                found[pub] = sig
                break
            problems.append(problem)
        else:
            reason = problems[0] if len(set(problems)) == 1 else "verifies for none of its keys"
            raise _fail(f"input {ctx.index}: a signature in the final witness {reason}")
    return found


def _input_contexts(
    request: Any, descriptor: CollateralDescriptor, inputs: Sequence[CollateralInput]
) -> list[_InputContext]:
    tx = request.tx
    if [(i.txid, i.vout) for i in inputs] != [(v.txid.hex(), v.vout) for v in tx.vin]:
        raise ValueError("`inputs` do not match the request PSBT's inputs (same order)")
    out = []
    for n, item in enumerate(inputs):
        witness_script = descriptor.witness_script(item.address_index, item.change)
        spk = descriptor.script_pubkey(item.address_index, item.change)
        prev = _parse_prev_tx(item, descriptor)
        out.append(
            _InputContext(
                index=n,
                keys=_loan_keys(descriptor, item.address_index, item.change),
                witness_script=witness_script,
                witness_utxo=TransactionOutput(item.amount_sats, Script(spk)).serialize(),
                non_witness_utxo=prev.serialize(),
                sighash=tx.sighash_segwit(
                    n, Script(witness_script), item.amount_sats, sighash=SIGHASH.ALL
                ),
            )
        )
    return out


def check_upload(
    request_psbt_b64: str,
    uploaded: bytes | str,
    descriptor: CollateralDescriptor,
    inputs: Sequence[CollateralInput],
) -> dict[int, dict[bytes, bytes]]:
    """The new, valid partial signatures in an uploaded PSBT, by input index
    (`{input: {pubkey33: der_sig + sighash byte}}`, inputs without new ones left out).

    All or nothing: any problem anywhere raises InvalidInput(field="psbt") naming
    it, and nothing from the upload is kept. A signature for a key that already
    signed in the request is checked but not returned (the request's stays)."""
    return _check_upload(
        _own_psbt(request_psbt_b64), request_psbt_b64, uploaded, descriptor, inputs
    )


@dataclass(frozen=True)
class CheckedUpload:
    """`check_upload`'s new signatures, and the request's PSBT with them merged in."""

    new: dict[int, dict[bytes, bytes]]
    merged: str
    signers: list[set[bytes]]  # each input's signing public keys, after the merge


def check_and_merge(
    request_psbt_b64: str,
    uploaded: bytes | str,
    descriptor: CollateralDescriptor,
    inputs: Sequence[CollateralInput],
) -> CheckedUpload:
    """`check_upload`, then `merge_signatures` and `signers_per_input` of the result, all
    on one parse of the request's PSBT (a liquidation's carries its funding transaction
    whole: each parse of it was about a millisecond)."""
    request = _own_psbt(request_psbt_b64)
    new = _check_upload(request, request_psbt_b64, uploaded, descriptor, inputs)
    merged, signers = _merge_into(request, new)
    return CheckedUpload(new, merged, signers)


def _check_upload(
    request: Any,
    request_psbt_b64: str,
    uploaded: bytes | str,
    descriptor: CollateralDescriptor,
    inputs: Sequence[CollateralInput],
) -> dict[int, dict[bytes, bytes]]:
    # embit first so that our own checks below name the precise problem; bdk's
    # stricter parse runs last, before anything is returned.
    upload, raw_upload = _parse_embit(uploaded, "psbt")
    request_tx = _global_tx(base64.b64decode(request_psbt_b64))
    difference = _tx_difference(request_tx, _global_tx(raw_upload), descriptor.network)
    if difference is not None:
        raise _fail(f"this PSBT is not the requested transaction: {difference}", PsbtMismatch)
    contexts = _input_contexts(request, descriptor, inputs)

    new: dict[int, dict[bytes, bytes]] = {}
    for ctx, ours, theirs in zip(contexts, request.inputs, upload.inputs, strict=True):
        n = ctx.index
        if theirs.sighash_type is not None and theirs.sighash_type != SIGHASH.ALL:
            raise _fail(
                f"input {n} asks for sighash {sighash_name(theirs.sighash_type)}; "
                "only SIGHASH_ALL is accepted"
            )
        if theirs.witness_utxo is not None and theirs.witness_utxo.serialize() != ctx.witness_utxo:
            raise _fail(
                f"input {n} carries a different witness_utxo (amount or script)", PsbtMismatch
            )
        if theirs.witness_script is not None and theirs.witness_script.data != ctx.witness_script:
            raise _fail(f"input {n} carries a different witness_script", PsbtMismatch)
        if (
            theirs.non_witness_utxo is not None
            and theirs.non_witness_utxo.serialize() != ctx.non_witness_utxo
        ):
            raise _fail(f"input {n} carries a different previous transaction", PsbtMismatch)
        if theirs.redeem_script is not None:
            raise _fail(
                f"input {n} carries a redeem script: the collateral is native segwit", PsbtMismatch
            )

        sigs: dict[bytes, bytes] = {
            pub.sec(): bytes(sig) for pub, sig in theirs.partial_sigs.items()
        }
        for pub, sig in sigs.items():
            _check_partial(ctx, pub, sig)
        if theirs.final_scriptwitness is not None:
            for pub, sig in _final_witness_sigs(ctx, theirs).items():
                sigs.setdefault(pub, sig)

        already = {pub.sec() for pub in ours.partial_sigs}
        fresh = {pub: sig for pub, sig in sigs.items() if pub not in already}
        if fresh:
            new[n] = fresh
    if not new:
        raise _fail(
            "no new signature: the upload carries no signature the request lacks", NoNewSignature
        )
    _parse_bdk(raw_upload, "psbt")
    return new


# -- merging and finalising ----------------------------------------------------


def merge_signatures(psbt_b64: str, new_sigs: dict[int, dict[bytes, bytes]]) -> str:
    """The request PSBT with `new_sigs` (from `check_upload`) added as partial
    signatures. Existing signatures are never replaced."""
    return _merge_into(_own_psbt(psbt_b64), new_sigs)[0]


def _merge_into(psbt: Any, new_sigs: dict[int, dict[bytes, bytes]]) -> tuple[str, list[set[bytes]]]:
    """`new_sigs` added to the parsed `psbt` (changed in place): its base64, and each
    input's signing public keys."""
    for n, sigs in new_sigs.items():
        if not 0 <= n < len(psbt.inputs):
            raise ValueError(f"the PSBT has no input {n}")
        partial = psbt.inputs[n].partial_sigs
        for pub_bytes, sig in sigs.items():
            pub = PublicKey.parse(pub_bytes)
            if pub in partial and bytes(partial[pub]) != sig:
                raise ValueError(f"input {n} already has a different signature from this key")
            partial[pub] = sig
    merged: str = psbt.to_base64()
    return merged, _signers(psbt)


def signers_per_input(psbt_b64: str) -> list[set[bytes]]:
    """For each input, the public keys (33 bytes) that have a partial signature."""
    return _signers(_own_psbt(psbt_b64))


def _signers(psbt: Any) -> list[set[bytes]]:
    return [{pub.sec() for pub in inp.partial_sigs} for inp in psbt.inputs]


def finalize(psbt_b64: str) -> bytes:
    """The signed raw transaction. bdkpython satisfies the miniscript from the
    partial signatures (checking them) and extracts the transaction; anything it
    refuses becomes CannotFinalize with its reasons."""
    try:
        psbt = bdk.Psbt(psbt_b64)
    except Exception as exc:
        raise CannotFinalize(f"the PSBT cannot be read: {exc}") from None
    result = psbt.finalize()
    if not result.could_finalize:
        reasons = "; ".join(str(err) for err in (result.errors or [])) or "no reason given"
        raise CannotFinalize(f"the PSBT cannot be finalized: {reasons}")
    try:
        tx = result.psbt.extract_tx()
    except Exception as exc:
        raise CannotFinalize(f"the finalized PSBT does not yield a transaction: {exc}") from None
    raw: bytes = bytes(tx.serialize())
    return raw
