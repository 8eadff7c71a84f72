"""The built-in provider's lists and rules, and how several answers make one decision."""

from __future__ import annotations

from custody.screening.builtin import BuiltinProvider, Lists
from custody.screening.providers import (
    AddressSubject,
    Decision,
    Input,
    Result,
    TransactionSubject,
    worst,
)

FUNDING = "aa" * 32
PREV = "bb" * 32
BAD_ADDRESS = "bcrt1qbadbadbadbadbadbadbadbadbadbadbad0000"


def _tx(*inputs: Input) -> TransactionSubject:
    return TransactionSubject(FUNDING, 0, 50_000_000, inputs)


def _provider(entries: dict[tuple[str, str], tuple[str, str]], **rules: int) -> BuiltinProvider:
    return BuiltinProvider(Lists(entries=entries, review_inputs_over=rules.get("inputs_over")))


def test_empty_lists_clear_everything_and_need_no_inputs() -> None:
    provider = _provider({})
    assert not provider.needs_inputs  # no node call per input for nothing to compare
    decision = provider.screen(_tx(Input(PREV, 1, BAD_ADDRESS)))
    assert (decision.result, decision.score, decision.reasons) == (Result.clear, 0, [])


def test_an_input_from_a_blocked_address_blocks() -> None:
    provider = _provider({("address", BAD_ADDRESS): ("block", "sanctions list 2026-11")})
    assert provider.needs_inputs
    decision = provider.screen(_tx(Input("cc" * 32, 0, "bcrt1qother"), Input(PREV, 1, BAD_ADDRESS)))
    assert decision.result == Result.block and decision.score == 100
    [reason] = decision.reasons
    assert BAD_ADDRESS in reason and "sanctions list 2026-11" in reason


def test_a_listed_outpoint_txid_or_funding_transaction_is_found() -> None:
    review_outpoint = _provider({("outpoint", f"{PREV}:1"): ("review", "mixer output")})
    assert review_outpoint.screen(_tx(Input(PREV, 1, None))).result == Result.review
    assert review_outpoint.screen(_tx(Input(PREV, 2, None))).result == Result.clear
    blocked_parent = _provider({("txid", PREV): ("block", "exchange hack")})
    assert blocked_parent.screen(_tx(Input(PREV, 7, None))).result == Result.block
    blocked_funding = _provider({("txid", FUNDING): ("block", "reported")})
    assert blocked_funding.screen(_tx()).result == Result.block


def test_block_beats_review_on_the_same_transaction() -> None:
    provider = _provider(
        {
            ("address", BAD_ADDRESS): ("review", "watch"),
            ("outpoint", f"{PREV}:1"): ("block", "stolen"),
        }
    )
    decision = provider.screen(_tx(Input(PREV, 1, BAD_ADDRESS)))
    assert decision.result == Result.block and len(decision.reasons) == 2


def test_more_inputs_than_the_rule_allows_goes_to_review() -> None:
    provider = _provider({}, inputs_over=2)
    assert provider.needs_inputs
    three = _tx(*(Input(PREV, i, None) for i in range(3)))
    decision = provider.screen(three)
    assert decision.result == Result.review and "3 inputs" in decision.reasons[0]
    assert provider.screen(_tx(Input(PREV, 0, None), Input(PREV, 1, None))).result == Result.clear


def test_a_payout_address_on_the_list() -> None:
    provider = _provider({("address", BAD_ADDRESS): ("block", "court order")})
    blocked = provider.screen(AddressSubject(BAD_ADDRESS, "miner_return"))
    assert blocked.result == Result.block and "miner_return address" in blocked.reasons[0]
    assert provider.screen(AddressSubject("bcrt1qfine", "miner_return")).result == Result.clear


def test_the_worst_answer_wins_with_every_reason() -> None:
    decisions = [
        Decision(Result.clear, 0, [], "builtin"),
        Decision(Result.review, 35, ["provider unavailable: timed out"], "http"),
    ]
    combined = worst(decisions)
    assert (combined.result, combined.score) == (Result.review, 35)
    assert combined.reasons == ["http: provider unavailable: timed out"]
    assert combined.provider == "builtin,http"
    assert worst([]).result == Result.review  # no answer is never clear
