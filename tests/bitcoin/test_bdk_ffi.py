"""bdkpython's arguments still reach Rust byte for byte with the faster copy (pledge.bdk_ffi):
a PSBT carrying a 200-output previous transaction, a raw transaction, and a buffer that
has to grow, each read back by bdk exactly as given."""

from __future__ import annotations

import base64
import os

import pytest
from embit.psbt import PSBT
from embit.script import Script
from embit.transaction import Transaction, TransactionInput, TransactionOutput

import pledge.bdk_ffi as bdk_ffi
from pledge.bdk_ffi import bdk


def _big_psbt() -> tuple[str, bytes]:
    prev = Transaction(
        vin=[TransactionInput(os.urandom(32), 0)],
        vout=[
            TransactionOutput(50_000_000 + n, Script(b"\x00\x20" + os.urandom(32)))
            for n in range(200)
        ],
    )
    spend = Transaction(
        vin=[TransactionInput(prev.txid(), 7)],
        vout=[TransactionOutput(49_000_000, Script(b"\x00\x14" + os.urandom(20)))],
    )
    psbt = PSBT(spend)
    psbt.inputs[0].non_witness_utxo = prev
    return psbt.to_base64(), prev.serialize()


@pytest.mark.unit
def test_the_copy_is_installed_in_the_generated_glue() -> None:
    from bdkpython import bdk as generated

    assert generated._UniffiRustBufferBuilder.write is bdk_ffi._write


@pytest.mark.unit
def test_a_large_psbt_and_a_raw_transaction_reach_bdk_byte_for_byte() -> None:
    text, prev_raw = _big_psbt()
    assert len(text) > 10_000  # far past the builder's first 16 bytes: it grows
    parsed = bdk.Psbt(text)
    assert base64.b64decode(parsed.serialize()) == base64.b64decode(text)
    assert bdk.Transaction(prev_raw).serialize() == prev_raw
    # one byte changed is another PSBT for bdk too: nothing is copied from elsewhere
    raw = bytearray(base64.b64decode(text))
    raw[-40] ^= 0x01
    changed = base64.b64encode(bytes(raw)).decode()
    assert base64.b64decode(bdk.Psbt(changed).serialize()) == bytes(raw)
