"""A regtest faucet: one P2WPKH key that the node mines to, spent by signing in Python.

btcd has no wallet, so the harness needs its own: the node's ``--miningaddr`` is
this key's address, the faucet learns its coinbase outputs by walking the chain
(``getblock hash 1``: coinbase txid, output 0) and its own change, and asks the
node (``gettxout`` with mempool) before spending any coin, because a reorg may
have removed it. Signing uses embit's BIP-143 sighash (no hand-rolled crypto).

Faucet transactions signal RBF (nSequence 0xfffffffd) so that ``double_spend``
can replace a payment that sits in the mempool - which is how a test gets "a
deposit replaced in a reorg by a conflicting transaction" on btcd: invalidate the
block (the payment returns to the mempool), ``double_spend`` it (the conflict
replaces it by BIP-125), mine.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from embit import ec, script
from embit.descriptor import Descriptor
from embit.networks import NETWORKS
from embit.transaction import SIGHASH, Transaction, TransactionInput, TransactionOutput

from custody.chain.rpc import NodeRpc

__all__ = [
    "COINBASE_MATURITY",
    "Coin",
    "Faucet",
    "FaucetError",
    "Payment",
    "random_p2wpkh_address",
    "random_p2wsh_multisig",
]

REGTEST = NETWORKS["regtest"]
COINBASE_MATURITY = 100
RBF_SEQUENCE = 0xFFFFFFFD
DUST_SAT = 1_000
DEFAULT_FEE_RATE_SAT_VB = 2.0
# A low-S DER signature is at most 72 bytes (+1 sighash byte); sizing with the
# maximum keeps the fee at or above the target rate whatever the signature length.
_DUMMY_SIG = b"\x30" + b"\x00" * 71 + bytes([SIGHASH.ALL])


class FaucetError(RuntimeError):
    """The faucet cannot pay (not enough mature coins, unknown payment...)."""


@dataclass(frozen=True)
class Coin:
    """An output paying the faucet's key."""

    txid: str
    vout: int
    value_sat: int


@dataclass(frozen=True)
class Payment:
    """A faucet transaction: what it spent (for ``double_spend``) and its fee."""

    txid: str
    tx_hex: str
    inputs: tuple[Coin, ...]
    outputs: tuple[tuple[str, int], ...]
    fee_sat: int
    vsize: int
    change_vout: int | None


def random_p2wpkh_address() -> str:
    """A fresh regtest P2WPKH address nobody keeps the key of (a sink for payments)."""
    key = ec.PrivateKey(secrets.token_bytes(32))
    return str(script.p2wpkh(key.get_public_key()).address(REGTEST))


def random_p2wsh_multisig(m: int = 2, n: int = 3) -> tuple[str, str, list[ec.PrivateKey]]:
    """A fresh ``wsh(sortedmulti(m, ...))`` of random keys: (address, descriptor, keys)."""
    keys = [ec.PrivateKey(secrets.token_bytes(32)) for _ in range(n)]
    pubs = ",".join(k.get_public_key().sec().hex() for k in keys)
    desc = Descriptor.from_string(f"wsh(sortedmulti({m},{pubs}))")
    return str(desc.address(REGTEST)), str(desc), keys


def _vsize(tx: Transaction) -> int:
    total = len(tx.serialize())
    witness = 2 + sum(len(inp.witness.serialize()) for inp in tx.vin)
    return math.ceil(((total - witness) * 4 + witness) / 4)


class Faucet:
    """Pays regtest addresses from coins mined to its own key.

    Not thread-safe across processes; within one process calls are serialised by
    a lock, which also matches btcd's "one miner per node" rule.
    """

    def __init__(self, rpc: NodeRpc | None = None, *, secret: bytes | None = None) -> None:
        self._key = ec.PrivateKey(secret if secret is not None else secrets.token_bytes(32))
        self._pub = self._key.get_public_key()
        self.script_pubkey = script.p2wpkh(self._pub)
        self.address: str = str(self.script_pubkey.address(REGTEST))
        self._script_code = script.p2pkh(self._pub)  # BIP-143 scriptCode for P2WPKH
        self._rpc = rpc
        self._lock = threading.RLock()
        # (txid, vout) -> coinbase height, or None for change. Insertion order = oldest first.
        self._coins: dict[tuple[str, int], int | None] = {}
        self._scanned: dict[int, str] = {}  # height -> block hash already walked
        self.payments: dict[str, Payment] = {}
        self._confirmable_at = ""
        self._confirmable_txids: set[str] = set()

    # -- wiring --------------------------------------------------------------------

    def attach(self, rpc: NodeRpc) -> None:
        """Give the faucet its node (the node needs the address before it starts)."""
        self._rpc = rpc

    @property
    def rpc(self) -> NodeRpc:
        if self._rpc is None:
            raise FaucetError("faucet is not attached to a node")
        return self._rpc

    @property
    def known_outpoints(self) -> set[tuple[str, int]]:
        """Coins the faucet currently believes in (before checking them with the node)."""
        with self._lock:
            self.sync()
            return set(self._coins)

    # -- chain walk ----------------------------------------------------------------

    def sync(self) -> None:
        """Walk new blocks for our coinbases; on a reorg, forget coinbases of orphaned blocks."""
        with self._lock:
            tip = self.rpc.get_block_count()
            fork = min(max(self._scanned, default=0), tip)
            while fork > 0 and self._scanned.get(fork) != self.rpc.get_block_hash(fork):
                fork -= 1
            for height in [h for h in self._scanned if h > fork]:
                del self._scanned[height]
            for outpoint, mined_at in list(self._coins.items()):
                if mined_at is not None and mined_at > fork:
                    del self._coins[outpoint]
            for height in range(fork + 1, tip + 1):
                block_hash = self.rpc.get_block_hash(height)
                block = self.rpc.call("getblock", block_hash, 1)
                self._coins[(str(block["tx"][0]), 0)] = height
                self._scanned[height] = block_hash

    def _spendable(self, outpoint: tuple[str, int]) -> Coin | None:
        """Ask the node; drop the coin if it is gone (spent, or removed by a reorg)."""
        info = self.rpc.get_tx_out(outpoint[0], outpoint[1], True)
        if info is None or info["scriptPubKey"]["hex"] != self.script_pubkey.data.hex():
            self._coins.pop(outpoint, None)
            return None
        if info.get("coinbase") and int(info["confirmations"]) < COINBASE_MATURITY:
            return None
        if int(info["confirmations"]) == 0 and not self._confirmable(outpoint[0]):
            self._coins.pop(outpoint, None)
            return None
        return Coin(outpoint[0], outpoint[1], int(info["value_sat"]))

    def _confirmable(self, txid: str) -> bool:
        """Can our unconfirmed payment ``txid`` still be mined?

        btcd does not evict mempool transactions whose inputs a reorg removed (an
        orphaned coinbase): they stay in the mempool, and in ``gettxout``, forever
        and are never mined. So an unconfirmed change coin is used only if every
        input of its transaction is in the chain's UTXO set or is itself confirmable.
        Memoised per tip, since only a new tip or a reorg changes the answer.
        """
        tip = self.rpc.get_best_block_hash()
        if tip != self._confirmable_at:
            self._confirmable_at, self._confirmable_txids = tip, set()
        if txid in self._confirmable_txids:
            return True
        payment = self.payments.get(txid)
        if payment is None:
            return False
        for coin in payment.inputs:
            in_chain = self.rpc.get_tx_out(coin.txid, coin.vout, False) is not None
            if not in_chain and not self._confirmable(coin.txid):
                return False
        self._confirmable_txids.add(txid)
        return True

    def _select(self, amount_sat: int) -> list[Coin]:
        chosen: list[Coin] = []
        for outpoint in list(self._coins):
            coin = self._spendable(outpoint)
            if coin is None:
                continue
            chosen.append(coin)
            # Generous slack for the fee so selection never comes up a few sats short.
            if sum(c.value_sat for c in chosen) >= amount_sat + 100_000:
                return chosen
        raise FaucetError(
            f"faucet cannot pay {amount_sat} sat: mature coins total "
            f"{sum(c.value_sat for c in chosen)} (mine at least {COINBASE_MATURITY + 1} blocks)"
        )

    # -- building ------------------------------------------------------------------

    def _sign(self, inputs: Sequence[Coin], outputs: Sequence[tuple[bytes, int]]) -> Transaction:
        vin = [
            TransactionInput(bytes.fromhex(c.txid), c.vout, sequence=RBF_SEQUENCE) for c in inputs
        ]
        vout = [TransactionOutput(value, script.Script(spk)) for spk, value in outputs]
        tx = Transaction(version=2, vin=vin, vout=vout, locktime=0)
        for i, coin in enumerate(inputs):
            digest = tx.sighash_segwit(i, self._script_code, coin.value_sat, SIGHASH.ALL)
            sig = self._key.sign(digest)
            tx.vin[i].witness = script.witness_p2wpkh(sig, self._pub, SIGHASH.ALL)
        return tx

    def build_tx(
        self,
        outputs: Sequence[tuple[str, int]],
        *,
        spend: Sequence[Coin] | None = None,
        fee_rate_sat_vb: float = DEFAULT_FEE_RATE_SAT_VB,
        min_fee_sat: int = 0,
    ) -> Payment:
        """Build and sign (not broadcast) a tx paying ``outputs`` in order, change last.

        ``spend`` forces the inputs (e.g. the coins of an earlier payment, for a
        conflict); otherwise mature coins are selected. The fee is ``fee_rate`` x
        vsize, at least ``min_fee_sat``.
        """
        with self._lock:
            if not outputs:
                raise FaucetError("no outputs")
            for address, sats in outputs:
                if sats < DUST_SAT:
                    raise FaucetError(f"{sats} sat to {address} is below the dust limit")
            total = sum(sats for _, sats in outputs)
            if spend is None:
                self.sync()
                inputs = self._select(total + min_fee_sat)
            else:
                inputs = list(spend)
            in_total = sum(c.value_sat for c in inputs)
            targets = [
                (script.address_to_scriptpubkey(address).data, sats) for address, sats in outputs
            ]
            own = self.script_pubkey.data

            # Size with a change output and maximum-length signatures, then fix the fee.
            sized = self._sign(inputs, [*targets, (own, 0)])
            for inp in sized.vin:
                inp.witness = script.Witness([_DUMMY_SIG, self._pub.sec()])
            fee = max(math.ceil(_vsize(sized) * fee_rate_sat_vb), min_fee_sat)
            change = in_total - total - fee
            if change < 0:
                raise FaucetError(f"inputs {in_total} sat < outputs {total} + fee {fee}")
            final = [*targets, (own, change)] if change >= DUST_SAT else targets
            if change < DUST_SAT:
                fee += change
            tx = self._sign(inputs, final)
            outs = tuple((addr, sats) for addr, sats in outputs)
            return Payment(
                txid=tx.txid().hex(),
                tx_hex=tx.serialize().hex(),
                inputs=tuple(inputs),
                outputs=outs,
                fee_sat=fee,
                vsize=_vsize(tx),
                change_vout=len(targets) if len(final) > len(targets) else None,
            )

    def _broadcast(self, payment: Payment) -> str:
        txid = self.rpc.send_raw_transaction(payment.tx_hex)
        if txid != payment.txid:
            raise FaucetError(f"node reports txid {txid}, built {payment.txid}")
        for coin in payment.inputs:
            self._coins.pop((coin.txid, coin.vout), None)
        if payment.change_vout is not None:
            # Our change: spendable at once (unconfirmed); gettxout tells if it vanishes.
            self._coins[(txid, payment.change_vout)] = None
        self.payments[txid] = payment
        return txid

    def broadcast(self, payment: Payment) -> str:
        """Send a payment built with `build_tx` and forget the coins it spends: btcd's
        gettxout still shows a mined output that only a mempool transaction spends, so a
        coin spent behind the faucet's back would be picked again (a conflict)."""
        with self._lock:
            return self._broadcast(payment)

    # -- paying --------------------------------------------------------------------

    def pay(self, address: str, sats: int) -> tuple[str, int]:
        """Pay ``sats`` to ``address`` (broadcast, unconfirmed); returns (txid, vout)."""
        with self._lock:
            return self._broadcast(self.build_tx([(address, sats)])), 0

    def pay_many(self, outputs: Sequence[tuple[str, int]]) -> str:
        """One transaction with one output per (address, sats), in order; returns the txid."""
        with self._lock:
            return self._broadcast(self.build_tx(outputs))

    def double_spend(self, txid: str, address: str, sats: int) -> str:
        """Broadcast a conflict of faucet payment ``txid``: same inputs, paying ``address``.

        It pays a higher fee and rate than the original (BIP-125 rules 3, 4 and 6),
        so it replaces the original if that sits in the mempool (e.g. after
        ``invalidateblock`` sent it back). It cannot replace a confirmed payment:
        invalidate its block first.
        """
        with self._lock:
            original = self.payments.get(txid)
            if original is None:
                raise FaucetError(f"{txid} is not a payment of this faucet")
            rate = max(DEFAULT_FEE_RATE_SAT_VB, original.fee_sat / original.vsize) * 2 + 1
            conflict = self.build_tx(
                [(address, sats)],
                spend=original.inputs,
                fee_rate_sat_vb=rate,
                min_fee_sat=original.fee_sat + original.vsize * 2 + 1_000,
            )
            return self._broadcast(conflict)
