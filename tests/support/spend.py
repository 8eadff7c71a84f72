"""Spending collateral the way a party acting outside the service would: two
hardware-wallet keys (played by embit HD roots) sign a PSBT the test builds itself."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import bdkpython as bdk
from embit import bip32
from embit.ec import PublicKey
from embit.psbt import PSBT, DerivationPath
from embit.script import Script, address_to_scriptpubkey
from embit.transaction import Transaction, TransactionInput, TransactionOutput
from support.world import World, hd_key

from pledge.descriptors import CollateralDescriptor, parse_collateral_descriptor
from regtest.faucet import random_p2wpkh_address


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


@dataclass(frozen=True)
class HeldLoan:
    """A loan whose three keys the test holds, as the parties' hardware wallets would:
    any two of them can move its collateral without the service."""

    loan: dict[str, Any]
    seeds: dict[str, bytes]

    def moved_out(self, outpoint: tuple[str, int], amount_sats: int, index: int = 0) -> str:
        """The miner and the arbiter move one collateral output away (a signed tx, hex)."""
        return spend_outside_the_service(
            parse_collateral_descriptor(self.loan["descriptor"], "regtest"),
            index,
            [
                bip32.HDKey.from_seed(self.seeds["miner"]),
                bip32.HDKey.from_seed(self.seeds["arbiter"]),
            ],
            outpoint,
            amount_sats,
            random_p2wpkh_address(),
        )


def held_loan(world: World, **terms: Any) -> HeldLoan:
    """A loan awaiting its deposit, its miner, bank and arbiter keys made by the test."""
    seeds = {seat: os.urandom(32) for seat in ("miner", "bank", "arbiter")}
    loan = world.create_loan(**terms)
    for seat, seed in seeds.items():
        assert world.register(loan["id"], seat, hd_key(seed=seed)).status_code == 200
    return HeldLoan(world.call("miner", "GET", f"/v1/loans/{loan['id']}").json(), seeds)
