"""The one interface every screening backend implements (like HWI's: one protocol, one
module per backend), what it is asked about and what it answers, and how several answers
make one decision (the worst wins)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class Result(StrEnum):
    clear = "clear"
    review = "review"
    block = "block"


_RANK = {Result.clear: 0, Result.review: 1, Result.block: 2}
UNAVAILABLE = "provider unavailable"


@dataclass(frozen=True)
class Input:
    """One input of a funding transaction: the outpoint it spends and the address that
    outpoint paid (None for a script with no address)."""

    txid: str
    vout: int
    address: str | None


@dataclass(frozen=True)
class TransactionSubject:
    """A deposit's funding transaction, as the node knows it."""

    txid: str
    vout: int  # the output paying the collateral address
    amount_sats: int
    inputs: tuple[Input, ...] = ()


@dataclass(frozen=True)
class AddressSubject:
    """An address the service would pay (the miner's return, the bank's liquidation)."""

    address: str
    purpose: str


Subject = TransactionSubject | AddressSubject


@dataclass(frozen=True)
class Decision:
    result: Result
    score: int  # 0 (nothing found) .. 100 (certain)
    reasons: list[str] = field(default_factory=list)
    provider: str = ""
    reference: str | None = None


class ScreeningProvider(Protocol):
    """A screening backend. `screen` never raises for the subject's sake: a backend that
    cannot answer says `review` with the reason `UNAVAILABLE` (fail closed, never clear)."""

    name: str

    @property
    def needs_inputs(self) -> bool:
        """Whether it needs a transaction's inputs (one node call per input to learn the
        addresses): the built-in provider with empty lists does not."""
        ...

    def screen(self, subject: Subject) -> Decision: ...


def worst(decisions: Sequence[Decision]) -> Decision:
    """One decision from several: the worst result, the highest score, every reason."""
    if not decisions:
        return Decision(Result.review, 0, ["no screening provider answered"], "none")
    top = max(decisions, key=lambda d: (_RANK[d.result], d.score))
    reasons = [f"{d.provider}: {r}" for d in decisions for r in d.reasons]
    return Decision(
        result=top.result,
        score=max(d.score for d in decisions),
        reasons=reasons,
        provider=",".join(d.provider for d in decisions),
        reference=";".join(d.reference for d in decisions if d.reference) or None,
    )
