"""The signer's coin scans on btcd: a loan's valuation and the automatic liquidation that
follows at the same tip are one scan of its addresses, not two (the liquidation storm's
largest node cost), and nothing of that shortcut lets a coin go unseen: a block in
between, a coin confirmed in between, and a reorg back to the same height are all
scanned again, and the PSBT is judged on what the node shows then."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.signer_world import Loan, SignerWorld, in_process_world, matured

from hsm.signer import PolicyViolation
from regtest.node import RegtestNode
from regtest.price_feed import price_feed
from regtest.softhsm import SoftHsmToken

pytestmark = [pytest.mark.node, pytest.mark.hsm]


class Scans:
    """Counts the signer's full address scans (NodeReader.unspent_at_tip)."""

    def __init__(self, core: Any) -> None:
        self.count = 0
        real: Callable[..., Any] = core.node.unspent_at_tip

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return real(*args, **kwargs)

        core.node.unspent_at_tip = counted


@pytest.fixture(scope="module")
def scan_world(
    tmp_path_factory: pytest.TempPathFactory,
    regtest_node: RegtestNode,
    softhsm_token: SoftHsmToken,
) -> Iterator[tuple[SignerWorld, Scans]]:
    base: Path = tmp_path_factory.mktemp("signer-scans")
    with (
        price_feed("8000000") as feed,
        in_process_world(base, regtest_node, feed, softhsm_token) as world,
    ):
        world.bank_key = "hd"
        yield world, Scans(world.core)


def liquidate(world: SignerWorld, loan: Loan, psbt: str, valuation: dict[str, Any]) -> Any:
    return world.client.sign(
        loan.loan_ref, "liquidation", psbt, automatic=True, valuation_id=valuation["valuation_id"]
    )


def test_valuation_and_signature_at_one_tip_scan_once(
    scan_world: tuple[SignerWorld, Scans],
) -> None:
    world, scans = scan_world
    loan = matured(world)
    before = scans.count
    valuation = world.client.valuation(loan.loan_ref)
    assert valuation["verdict"] == "liquidate", valuation
    assert scans.count - before == 1
    signatures = world.bank_signatures()
    signed = liquidate(world, loan, world.liquidation_psbt(loan, valuation), valuation)
    assert scans.count - before == 1  # the sign reused the valuation's scan at that tip
    assert world.bank_signatures() - signatures == 1
    assert signed.psbt


def test_a_block_in_between_is_scanned_again(scan_world: tuple[SignerWorld, Scans]) -> None:
    world, scans = scan_world
    loan = matured(world)
    valuation = world.client.valuation(loan.loan_ref)
    psbt = world.liquidation_psbt(loan, valuation)
    world.node.mine(1)
    before = scans.count
    liquidate(world, loan, psbt, valuation)
    assert scans.count - before == 1


def test_a_coin_confirmed_in_between_is_seen(scan_world: tuple[SignerWorld, Scans]) -> None:
    """The attack the shortcut must not open: a PSBT built on the valuation's coins, and a
    top-up confirmed before the signature. The signer sees it and refuses the PSBT that
    would leave it behind, as it did before there was any shortcut."""
    world, scans = scan_world
    loan = matured(world)
    valuation = world.client.valuation(loan.loan_ref)
    psbt = world.liquidation_psbt(loan, valuation)
    world.fund(loan, 200_000, index=1)
    before, signatures = scans.count, world.bank_signatures()
    with pytest.raises(PolicyViolation) as refused:
        liquidate(world, loan, psbt, valuation)
    assert refused.value.check == "collateral_not_spent", refused.value.reason
    assert world.bank_signatures() == signatures
    assert scans.count - before >= 1  # (2: a coin at index 1 moves the gap on)


def test_a_reorg_to_the_same_height_is_scanned_again(
    scan_world: tuple[SignerWorld, Scans],
) -> None:
    """The tip's hash, not its height, says whether an earlier scan still stands: the
    block holding the loan's coin is replaced by another at the same height (the coin
    mined again in it), and the signature scans again before it signs."""
    world, scans = scan_world
    loan = matured(world)
    valuation = world.client.valuation(loan.loan_ref)
    psbt = world.liquidation_psbt(loan, valuation)
    height = world.node.rpc.get_block_count()
    orphaned = world.node.invalidate(1)
    world.node.mine(1)
    assert world.node.rpc.get_block_count() == height
    assert world.node.rpc.get_block_hash(height) != orphaned[0]
    before, signatures = scans.count, world.bank_signatures()
    liquidate(world, loan, psbt, valuation)
    assert scans.count - before == 1
    assert world.bank_signatures() - signatures == 1


def test_a_restarted_signer_values_a_loan_without_deriving_its_scripts(
    scan_world: tuple[SignerWorld, Scans],
) -> None:
    """Registration keeps the scripts a valuation scans (derived by both libraries) in the
    signer's registry; a valuation after a restart (no memo of this process left) reads
    them there and derives none, and still finds the loan's coin."""
    from pledge import descriptors

    world, _ = scan_world
    loan = matured(world)
    core = world.core
    record = core.registry.loan(loan.loan_ref)
    assert record is not None
    gap = core.address_gap
    kept = core.registry.scan_scripts(record.descriptor, 0, gap)
    parsed = descriptors.parse_collateral_descriptor(record.descriptor, "regtest")
    assert kept == {
        (index, change): parsed.script_pubkey(index, change)
        for index in range(gap + 1)
        for change in (False, True)
    }
    assert core.registry.scan_scripts(record.descriptor + "x", 0, gap) == {}  # by its text
    descriptors._agreed_output.cache_clear()  # as after a restart
    valuation = world.client.valuation(loan.loan_ref)
    assert valuation["verdict"] == "liquidate" and int(valuation["collateral_sats"]) > 0
    assert descriptors._agreed_output.cache_info().misses == 0
    # Its signature checks the inputs against the same kept scripts: it derives only what
    # the PSBT's one input is checked against (its script), not the whole watched range.
    signatures = world.bank_signatures()
    liquidate(world, loan, world.liquidation_psbt(loan, valuation), valuation)
    assert world.bank_signatures() == signatures + 1
    assert descriptors._agreed_output.cache_info().misses <= 1
