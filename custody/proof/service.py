"""Build a proof of collateral at a height: what the ledger says was collateral there, read
in one short read transaction, then the node's blocks, headers and transactions with no
transaction open, checked against the ledger's block hashes (a reorganisation the watcher
has not applied yet is refused, not proved). The document's format is `pledge/proof.py`.

A deposit is collateral at H when it was mined at or below H with its required
confirmations by H, and not spent in a block at or below H (the watcher's ledger).
Screening holds (issue 15, part B) are not applied here yet."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from sqlalchemy.engine import Engine

from custody.chain.blocks import header_hash, scan_block
from custody.db.session import transaction
from custody.errors import ProofChainMoved, ProofHeightNotFollowed, ProofNoCollateral
from custody.proof import repository
from custody.proof.repository import CollateralRow
from custody.screening import service as screening
from custody.signing.statements import bank_hsm_key, signer_loan_ref
from hsm.client import BankSigner
from pledge import proof
from pledge.errors import InvalidInput
from pledge.network import NetworkName

HEADER_BATCH = 2_000


@runtime_checkable
class ProofNode(Protocol):
    """What building a proof asks the node (custody.chain.rpc.NodeRpc answers it)."""

    def get_block_hashes(self, heights: Sequence[int]) -> list[str]: ...
    def call_batch(self, method: str, params: Sequence[Sequence[Any]]) -> list[Any]: ...
    def get_block_raw(self, block_hash: str) -> bytes: ...
    def get_raw_transaction(self, txid: str, block_hash: str | None = None) -> bytes: ...


def ledger_at(engine: Engine, height: int | None) -> tuple[int, list[CollateralRow]]:
    """The height (the watcher's, when not given) and the collateral there, by loan."""
    with transaction(engine, write=False) as session:
        cursor = repository.cursor(session)
        if cursor is None:
            raise ProofHeightNotFollowed("the watcher has not followed the chain yet")
        at = cursor.height if height is None else height
        if at < 0:
            raise InvalidInput("the height must not be negative", field="height")
        if at > cursor.height:
            raise ProofHeightNotFollowed(
                f"the watcher has applied blocks up to height {cursor.height}, not {at}"
            )
        rows = repository.collateral_at(session, at)
        # AML screening holds some deposits out of collateral until cleared: not in a proof.
        held = screening.held_outpoints(session, sorted({r.loan_id for r in rows}))
        return at, [r for r in rows if (r.txid, r.vout) not in held]


def build(
    engine: Engine,
    node: ProofNode,
    network: NetworkName,
    *,
    height: int | None = None,
    loan_id: int | None = None,
) -> dict[str, Any]:
    """The document for the whole book at `height` (scope `book`), or with only one loan's
    entry and its path to the same tree (scope `loan`)."""
    at, rows = ledger_at(engine, height)
    first = min((r.block_height for r in rows), default=at)
    heights = list(range(first, at + 1))
    hashes: list[str] = []
    headers: list[bytes] = []
    for start in range(0, len(heights), HEADER_BATCH):
        chunk = heights[start : start + HEADER_BATCH]
        chunk_hashes = node.get_block_hashes(chunk)
        raw = [
            bytes.fromhex(h)
            for h in node.call_batch("getblockheader", [[h, False] for h in chunk_hashes])
        ]
        for block_hash, header in zip(chunk_hashes, raw, strict=True):
            if header_hash(header) != block_hash:
                raise ProofChainMoved(f"the node's header for block {block_hash} is another block")
        hashes += chunk_hashes
        headers += raw
    node_hash = dict(zip(heights, hashes, strict=True))
    by_block: dict[str, list[CollateralRow]] = defaultdict(list)
    for row in rows:
        if node_hash[row.block_height] != row.block_hash:
            raise ProofChainMoved(
                f"the node's block at height {row.block_height} is not the one the ledger "
                "applied: the watcher has a reorganisation to apply first"
            )
        by_block[row.block_hash].append(row)
    entries: dict[tuple[str, int], dict[str, Any]] = {}
    for block_hash, in_block in by_block.items():
        raw_block = node.get_block_raw(block_hash)
        txids = scan_block(raw_block, (), (), with_txids=True).txids
        assert txids is not None
        merkle_block = proof.build_merkle_block(
            raw_block[: proof.HEADER_SIZE], txids, {r.txid for r in in_block}
        )
        for row in in_block:
            entries[(row.txid, row.vout)] = proof.outpoint_entry(
                txid=row.txid,
                vout=row.vout,
                amount_sats=row.amount_sats,
                address_index=row.address_index,
                change=row.change,
                block_height=row.block_height,
                raw_tx=node.get_raw_transaction(row.txid, block_hash),
                merkle_proof=merkle_block,
            )
    book: dict[int, tuple[str, list[dict[str, Any]]]] = {}
    for row in rows:
        book.setdefault(row.loan_id, (row.descriptor, []))[1].append(entries[(row.txid, row.vout)])
    return proof.assemble(
        network=network,
        height=at,
        block_hash=node_hash[at],
        headers_from=first,
        headers=headers,
        book=[(lid, desc, outs) for lid, (desc, outs) in sorted(book.items())],
        only=None if loan_id is None else (lambda lid: lid == loan_id),
    )


def control_proof(
    engine: Engine,
    signer: BankSigner | None,
    network: NetworkName,
    *,
    loan_id: int,
    challenge: str,
) -> str:
    """The control-proof PSBT (BIP-127) over the loan's collateral at the watcher's height
    for the auditor's `challenge`, with the bank's signatures when its signer holds the
    bank key (asked with no transaction open); the miner or the arbiter adds the second
    (`custody proof attach` then puts it into a proof document)."""
    at, rows = ledger_at(engine, None)
    mine = [r for r in rows if r.loan_id == loan_id]
    if not mine:
        raise ProofNoCollateral(f"loan {loan_id} holds no collateral at height {at}")
    with transaction(engine, write=False) as session:
        key = bank_hsm_key(session, loan_id)
        loan_ref = signer_loan_ref(key) if key is not None else None
    coins = [
        proof.ProofCoin(r.txid, r.vout, r.amount_sats, r.address_index, r.change) for r in mine
    ]
    psbt = proof.control_proof_psbt(mine[0].descriptor, network, coins, challenge)
    if loan_ref is not None and signer is not None:
        psbt = signer.sign_proof(loan_ref, psbt, challenge).psbt
    return psbt
