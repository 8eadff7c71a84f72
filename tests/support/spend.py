"""Spending collateral the way a party acting outside the service would: two
hardware-wallet keys (played by embit HD roots) sign a PSBT the test builds itself."""

from __future__ import annotations

import bdkpython as bdk
from embit import bip32
from embit.ec import PublicKey
from embit.psbt import PSBT, DerivationPath
from embit.script import Script, address_to_scriptpubkey
from embit.transaction import Transaction, TransactionInput, TransactionOutput

from pledge.descriptors import CollateralDescriptor


def spend_outside_the_service(
    descriptor: CollateralDescriptor,
    index: int,
    roots: list[bip32.HDKey],
    outpoint: tuple[str, int],
    amount_sats: int,
    to_address: str,
    fee_sats: int = 2_000,
) -> str:
    """A fully signed transaction (hex) moving one collateral output to `to_address`."""
    txid, vout = outpoint
    tx = Transaction(
        vin=[TransactionInput(bytes.fromhex(txid), vout, sequence=0xFFFFFFFD)],
        vout=[TransactionOutput(amount_sats - fee_sats, address_to_scriptpubkey(to_address))],
    )
    psbt = PSBT(tx)
    psbt_in = psbt.inputs[0]
    psbt_in.witness_utxo = TransactionOutput(amount_sats, Script(descriptor.script_pubkey(index)))
    psbt_in.witness_script = Script(descriptor.witness_script(index))
    for key in descriptor.hd_keys:
        fingerprint, path = key.derivation(0, index)
        psbt_in.bip32_derivations[PublicKey.parse(key.public_key(0, index))] = DerivationPath(
            fingerprint, path
        )
    for root in roots:
        assert psbt.sign_with(root) == 1, "the root did not recognise its key in the PSBT"
    result = bdk.Psbt(psbt.to_string()).finalize()
    assert result.could_finalize, result.errors
    raw: bytes = result.psbt.extract_tx().serialize()
    return raw.hex()
