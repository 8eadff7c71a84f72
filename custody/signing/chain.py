"""What signing needs from the node and the fee policy, and a node whose answers were read before a
transaction opened."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from custody.config import Settings
from custody.errors import CollateralChanged, NoBroadcastWhileBuilding


class Chain(Protocol):
    """What signing needs from the node (custody.chain.rpc.NodeRpc satisfies it)."""

    def get_raw_transaction(self, txid: str, block_hash: str | None = None) -> bytes: ...
    def estimate_fee_rate_sat_vb(self, conf_target: int) -> float | None: ...
    def test_mempool_accept(
        self, tx_hex: str, max_fee_rate_btc_kvb: float = 0.1
    ) -> dict[str, Any]: ...
    def send_raw_transaction(self, tx_hex: str) -> str: ...


@dataclass(frozen=True)
class FeePolicy:
    floor_sat_vb: Decimal = Decimal(2)
    ceiling_sat_vb: Decimal = Decimal(200)
    max_fee_sats: int = 1_000_000
    conf_target: int = 6

    @classmethod
    def from_settings(cls, settings: Settings) -> FeePolicy:
        """The fee bounds the operator configured (CUSTODY_FEE_RATE_*, CUSTODY_MAX_FEE_SATS)."""
        return cls(
            floor_sat_vb=Decimal(str(settings.fee_rate_floor_sat_vb)),
            ceiling_sat_vb=Decimal(str(settings.fee_rate_ceiling_sat_vb)),
            max_fee_sats=settings.max_fee_sats,
        )


class PrefetchedChain:
    """The node's answers a request needs, fetched before its transaction opens: the
    previous transactions of the loan's confirmed deposits and the fee estimate. Asked
    for anything else (the collateral changed meanwhile), it refuses instead of calling."""

    def __init__(self, chain: Chain, txids: list[str], conf_target: int) -> None:
        self._txs = {txid: chain.get_raw_transaction(txid) for txid in dict.fromkeys(txids)}
        self._estimate = chain.estimate_fee_rate_sat_vb(conf_target)

    def get_raw_transaction(self, txid: str, block_hash: str | None = None) -> bytes:
        raw = self._txs.get(txid)
        if raw is None:
            raise CollateralChanged(
                "the loan's collateral changed while the request was built: try again"
            )
        return raw

    def estimate_fee_rate_sat_vb(self, conf_target: int) -> float | None:
        return self._estimate

    def test_mempool_accept(self, tx_hex: str, max_fee_rate_btc_kvb: float = 0.1) -> dict[str, Any]:
        raise NoBroadcastWhileBuilding("building a request broadcasts nothing")

    def send_raw_transaction(self, tx_hex: str) -> str:
        raise NoBroadcastWhileBuilding("building a request broadcasts nothing")
