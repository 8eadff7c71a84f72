"""What collateral moves can be asked for: one vocabulary for the service and the signer.

The service's `SigningAction` enum and the signer's request bodies are both checked
against these names (tests/test_layers.py), so neither side can grow an action the other
does not know.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

__all__ = ["ACTIONS", "BANK_ACTIONS", "LIQUIDATIONS", "RELEASES", "ActionName", "BankAction"]

ActionName = Literal["release", "dispute_release", "liquidation", "partial_liquidation"]
# The actions the bank's key signs (a dispute release is miner + arbiter, without the bank).
BankAction = Literal["release", "liquidation", "partial_liquidation"]

ACTIONS: Final[tuple[str, ...]] = get_args(ActionName)
BANK_ACTIONS: Final[tuple[str, ...]] = get_args(BankAction)
RELEASES: Final = frozenset({"release", "dispute_release"})
LIQUIDATIONS: Final = frozenset({"liquidation"})
