"""The built-in provider: the lists the bank maintains (blocked and review addresses,
txids and outpoints) and a few rules, read from the database before it is asked (a
`Lists` snapshot), so screening itself needs no transaction."""

from __future__ import annotations

from dataclasses import dataclass, field

from custody.screening.providers import (
    AddressSubject,
    Decision,
    Result,
    Subject,
    TransactionSubject,
)

BLOCK_SCORE = 100
REVIEW_SCORE = 60
MANY_INPUTS_SCORE = 40


@dataclass(frozen=True)
class Lists:
    """(kind, value) -> (action, note), kind one of address, txid, outpoint."""

    entries: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    # A funding transaction with more inputs than this goes to review (None: no such rule).
    review_inputs_over: int | None = None

    @property
    def empty(self) -> bool:
        return not self.entries and self.review_inputs_over is None


class BuiltinProvider:
    name = "builtin"

    def __init__(self, lists: Lists) -> None:
        self.lists = lists

    @property
    def needs_inputs(self) -> bool:
        return not self.lists.empty

    def screen(self, subject: Subject) -> Decision:
        hits: list[tuple[str, str]] = []  # (action, reason)
        if isinstance(subject, AddressSubject):
            hits += self._hits("address", subject.address, f"{subject.purpose} address")
        else:
            hits += self._transaction_hits(subject)
        if any(action == "block" for action, _ in hits):
            result, score = Result.block, BLOCK_SCORE
        elif any(action == "review" for action, _ in hits):
            result, score = Result.review, REVIEW_SCORE
        else:
            result, score = Result.clear, 0
        if result == Result.clear and isinstance(subject, TransactionSubject):
            rule = self.lists.review_inputs_over
            if rule is not None and len(subject.inputs) > rule:
                result, score = Result.review, MANY_INPUTS_SCORE
                hits.append(("review", f"{len(subject.inputs)} inputs, more than {rule}"))
        return Decision(result, score, [reason for _, reason in hits], self.name)

    def _transaction_hits(self, subject: TransactionSubject) -> list[tuple[str, str]]:
        hits = self._hits("txid", subject.txid, "funding transaction")
        for spent in subject.inputs:
            hits += self._hits("txid", spent.txid, "an input's transaction")
            hits += self._hits("outpoint", f"{spent.txid}:{spent.vout}", "an input")
            if spent.address is not None:
                hits += self._hits("address", spent.address, "an input from address")
        return hits

    def _hits(self, kind: str, value: str, what: str) -> list[tuple[str, str]]:
        found = self.lists.entries.get((kind, value))
        if found is None:
            return []
        action, note = found
        return [(action, f"{what} {value} is on the bank's {action} list: {note}")]
