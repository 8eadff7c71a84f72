"""A PSBT's unsigned txid, shared by the service and the bank's signer's client.

A signing request's PSBT carries each input's whole previous transaction (hardware
wallets need it), so parsing one costs milliseconds when the funding transaction is
large (a batch payout of hundreds of outputs), and the same stored PSBT text is parsed
for its txid when it is stored, when the signer's answer is compared with it and when
signatures are merged. The txid is a function of the text alone: it is memoised.
"""

from __future__ import annotations

from functools import lru_cache

from embit.psbt import PSBT

__all__ = ["unsigned_txid"]


@lru_cache(maxsize=4096)
def unsigned_txid(psbt_b64: str) -> str:
    """The hex txid of the PSBT's unsigned transaction (ValueError if it does not parse;
    a refusal is not memoised)."""
    try:
        txid: bytes = PSBT.from_string(psbt_b64).tx.txid()
    except Exception as exc:
        raise ValueError(f"the PSBT does not parse: {type(exc).__name__}") from None
    return txid.hex()
