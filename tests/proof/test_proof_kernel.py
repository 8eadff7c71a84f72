"""The kernel's proof parts without a node: Core's `gettxoutproof` answers (published mainnet
examples) read by our reader, our proofs read back, tampered ones refused, and the
Merkle-sum tree's paths and sums."""

from __future__ import annotations

import os
import random

import pytest
from embit import bip32
from embit.networks import NETWORKS
from embit.psbt import PSBT
from embit.script import Witness

from pledge import proof
from pledge.descriptors import CollateralDescriptor
from pledge.keys import parse_hd_key
from regtest.software_signer import SoftwareHDSigner

# `bitcoin-cli gettxoutproof '["2a895f92..."]'` on mainnet, as published with its output.
CORE_PROOF_ONE = (
    "00000020937194628d64a712d1cfdd46f7bdedd32fe8a6fd31180f000000000000000000b1fdff501fedfbff"
    "70cfe2faa7f6adf364f4b25f969f17e5466545c9ad0084ef1554e25b922d2717bafebba2070b00000db385e7"
    "7dd799c719bb304fc0378486db42b6f7c21891c36ba20223f93b7ce6ef10cd3d3f7b880e6cb662888197f7ab"
    "dbf86c665d0836484c185de62d7f6da3b65f33bb3e285613b7cd73e50d32116a7aa529469918eeeb4cfe22eb"
    "2f5ba0030c8ac70ae460e450d56652a71bdf63430310b0cd8a5096e02d1e9de5f3925f892a42eef6eb27b9c2"
    "95a624e743db82016f626a74401e0530ac24bfe8a102b4de004f33776510d532029bdf46182c170a423ec833"
    "10a6db0ece225c3b6787c7014d605924c66f15e092defb3183fa3748b321a8e8a1c738be30daa1e1cd1043d2"
    "fa549d4afef3f323711eda2b2eac4aac8c03d8ff06d3f6e5d2bc71437ecbec4de982df301a8b7c63d7f3e23b"
    "4b8324522eb8dad22fbbbbfdce48257a504d279e5fd4252dd75241c87e083c00518fe22ee9a1451e4ed56133"
    "41352499570b1511d933a27d366478fab45f4caa3261e870ac772129696c268adb3bd511081a1621f9ce0359"
    "d459af68c805b716daad63cab4259399ebb07ad1c9566482ad16f4fbe1f06442a656d07bd88c2ccb756502bc"
    "20769412715cd1b88e9641bc368217d94e04f7fa0000"
)
# Two transactions of one mainnet block in one proof (gettxoutproof with two txids).
CORE_PROOF_TWO = (
    "00004020e2ac770a4f511b7ed2f3b638fe12d39ff52b8ced104d360500000000000000006f5ca47842fdd12f"
    "46a274ce7060c701d0c1fcff294a826e19b88e8f3dcdbca8f560135e8b64051816587c9c1f0100000bc21da3"
    "9408e165a8368a7df46a17af25b4c5e3778b45222e48da632412b3be56e3b1196586e514fba3145219e3d9ed"
    "b1e0e2c71b4cedaf013d8512d121f55e1ae120e954338e4d63d0a446a466b4ec548704366a89c2513c0c4781"
    "8e4f8af8fa141bcda354451c2a48425704decd178df3c2c518c2fee2a593058b2c2c2ddee80ebc68aa38c161"
    "fcbf32f336b9d06feb652893be3326b0fd755cf61e575a56d7cb6b4944a2e74e3fdb583885c9dd4849ab2fd9"
    "74207d9693a3062d9ba5eb0ea1b7c2d9841297396526c43af19fa8e67f3a6c07f9c8333eda575556df0e8b86"
    "a65982f24022336589fae3d56d69d73474024ced4f3a63c7205623d5bd22daf8a58e69b4748539fcdc24e024"
    "1f8231278b560340a3eb112f2fd041dc7bd1a0f6ddc37b916c24b0f96a1e9e13b4ffc7ad9c3805cadb915204"
    "35821edd439ca70198c92187deb1dde075366006d963632a0fd1ca510b362bbd6cf1805ac70becd3d303ff2d00"
)


def test_cores_gettxoutproof_answers_are_read_and_checked() -> None:
    one = proof.read_merkle_block(CORE_PROOF_ONE)
    assert one.matched == ("2a895f92f3e59d1e2de096508acdb010034363df1ba75266d550e460e40ac78a",)
    two = proof.read_merkle_block(CORE_PROOF_TWO)
    assert two.matched == (
        "1a5ef521d112853d01afed4c1bc7e2e0b1edd9e3195214a3fb14e5866519b1e3",
        "e8de2d2c2c8b0593a5e2fec218c5c2f38d17cdde045742482a1c4554a3cd1b14",
    )
    proof.check_header_chain([one.header])  # mainnet proof of work
    proof.check_header_chain([two.header])
    assert one.header.hash.startswith("0" * 18)


def test_our_proofs_read_back_for_every_shape_of_tree() -> None:
    rng = random.Random(15)
    for count in range(1, 40):
        txids = [os.urandom(32).hex() for _ in range(count)]
        header = bytes(36) + proof.merkle_root(txids) + bytes(12)
        for _ in range(3):
            matched = rng.sample(txids, rng.randint(1, min(count, 4)))
            raw = proof.build_merkle_block(header, txids, matched)
            got = proof.read_merkle_block(raw.hex())
            assert got.matched == tuple(t for t in txids if t in matched)


def test_a_tampered_merkle_proof_is_refused() -> None:
    txids = [os.urandom(32).hex() for _ in range(7)]
    header = bytes(36) + proof.merkle_root(txids) + bytes(12)
    raw = bytearray(proof.build_merkle_block(header, txids, [txids[3]]))
    flipped = bytearray(raw)
    flipped[90] ^= 1  # inside the first hash
    with pytest.raises(proof.ProofInvalid, match="root is not the Merkle root"):
        proof.read_merkle_block(bytes(flipped).hex())
    with pytest.raises(proof.ProofInvalid, match="not a serialized CMerkleBlock"):
        proof.read_merkle_block((bytes(raw) + b"\x00").hex())
    other_root = bytes(36) + proof.merkle_root(txids[:6]) + bytes(12)
    with pytest.raises(proof.ProofInvalid, match="root is not the Merkle root"):
        proof.read_merkle_block((other_root + bytes(raw[80:])).hex())


def test_a_duplicated_last_transaction_is_refused() -> None:
    """CVE-2012-2459: [a, b, c, c] has the root of [a, b, c]; a proof through the
    duplicated pair is refused, as Core refuses it."""
    a, b, c = (os.urandom(32).hex() for _ in range(3))
    header = bytes(36) + proof.merkle_root([a, b, c]) + bytes(12)
    assert proof.merkle_root([a, b, c, c]) == proof.merkle_root([a, b, c])
    raw = proof.build_merkle_block(header, [a, b, c, c], [c])
    with pytest.raises(proof.ProofInvalid, match="duplicates a subtree"):
        proof.read_merkle_block(raw.hex())


def test_difficulty_bits() -> None:
    assert proof.target_from_bits(0x1D00FFFF) == 0xFFFF << 8 * (0x1D - 3)  # mainnet genesis
    assert proof.target_from_bits(0x207FFFFF) == 0x7FFFFF << 8 * (0x20 - 3)  # regtest
    with pytest.raises(proof.ProofInvalid, match="negative"):
        proof.target_from_bits(0x1D80FFFF)


def _leaves(n: int) -> list[proof.SumNode]:
    return [
        proof.leaf(i, "wsh(sortedmulti(2,a,b,c))#abcdefgh", 1_000 * i, os.urandom(32))
        for i in range(1, n + 1)
    ]


def test_every_leaf_has_a_path_to_the_root_and_the_root_holds_the_total() -> None:
    assert proof.sum_tree([]) == (proof.EMPTY_ROOT, [])
    for n in range(1, 12):
        leaves = _leaves(n)
        root, paths = proof.sum_tree(leaves)
        assert root.sum == sum(node.sum for node in leaves)
        for node, path in zip(leaves, paths, strict=True):
            assert proof.path_root(node, path) == root


def test_a_path_that_moves_value_between_siblings_does_not_reach_the_root() -> None:
    """Both child sums are in a node's hash: a prover showing one miner a sibling that is
    worth less (and so this leaf more) at the same total gets another root hash."""
    leaves = _leaves(4)
    root, paths = proof.sum_tree(leaves)
    step = paths[0][0]
    cheat = [proof.PathStep(step.side, step.hash, step.sum - 1), *paths[0][1:]]
    richer = proof.SumNode(leaves[0].hash, leaves[0].sum + 1)
    reached = proof.path_root(richer, cheat)
    assert reached.sum == root.sum and reached.hash != root.hash


def test_a_leaf_commits_to_its_loan_amount_and_salt() -> None:
    salt = os.urandom(32)
    base = proof.leaf(7, "wsh(x)#abcdefgh", 10, salt)
    assert proof.leaf(8, "wsh(x)#abcdefgh", 10, salt).hash != base.hash
    assert proof.leaf(7, "wsh(x)#abcdefgx", 10, salt).hash != base.hash
    assert proof.leaf(7, "wsh(x)#abcdefgh", 11, salt).hash != base.hash
    assert proof.leaf(7, "wsh(x)#abcdefgh", 10, os.urandom(32)).hash != base.hash
    assert proof.loan_salt("wsh(x)#abcdefgh", 100) != proof.loan_salt("wsh(x)#abcdefgh", 101)
    with pytest.raises(proof.ProofInvalid):
        proof.leaf(7, "wsh(x)#abcdefgh", -1, salt)


def test_a_document_of_another_format_is_refused() -> None:
    with pytest.raises(proof.ProofInvalid, match="not a pledge-proof-of-collateral"):
        proof.verify_document({"format": "x", "version": 1})


def _software_loan() -> tuple[str, list[SoftwareHDSigner], list[proof.ProofCoin]]:
    roots = [
        bip32.HDKey.from_seed(os.urandom(32), version=NETWORKS["regtest"]["xprv"]) for _ in range(3)
    ]
    signers = [SoftwareHDSigner(root, "regtest") for root in roots]
    keys = tuple(parse_hd_key(s.account_key_text(), "regtest", field="k") for s in signers)
    descriptor = CollateralDescriptor((keys[0], keys[1], keys[2]), "regtest")
    coins = [
        proof.ProofCoin(os.urandom(32).hex(), 1, 40_000_000, 0, False),
        proof.ProofCoin(os.urandom(32).hex(), 0, 2_500_000, 3, True),
    ]
    return descriptor.descriptor, signers, coins


def test_a_control_proof_holds_with_two_signatures_partial_or_finalized() -> None:
    """No node needed: the proof's coins are only named, and the digests cover their
    amounts and scripts (what the PSBT's witness UTXOs say)."""
    descriptor, signers, coins = _software_loan()
    unsigned = proof.control_proof_psbt(descriptor, "regtest", coins, "challenge")
    one = signers[0].sign_psbt(unsigned)
    problems = proof.check_control_proof(one, "challenge", descriptor, "regtest", coins)
    assert len(problems) == 2 and all("1 valid signature(s)" in p for p in problems)
    two = signers[2].sign_psbt(one)
    assert proof.check_control_proof(two, "challenge", descriptor, "regtest", coins) == []
    # Finalized as CHECKMULTISIG wants it (empty, signatures, script): still two.
    psbt = PSBT.from_string(two)
    for inp in psbt.inputs[1:]:
        sigs = list(inp.partial_sigs.values())
        inp.final_scriptwitness = Witness([b"", *sigs, inp.witness_script.data])
        inp.partial_sigs = {}
    finalized = psbt.to_string()
    assert proof.check_control_proof(finalized, "challenge", descriptor, "regtest", coins) == []
    # A signature made by the third key over another transaction does not count.
    stray = PSBT.from_string(
        signers[1].sign_psbt(proof.control_proof_psbt(descriptor, "regtest", coins, "other"))
    )
    mixed = PSBT.from_string(one)
    for inp, other in zip(mixed.inputs[1:], stray.inputs[1:], strict=True):
        inp.partial_sigs.update(other.partial_sigs)
    problems = proof.check_control_proof(
        mixed.to_string(), "challenge", descriptor, "regtest", coins
    )
    assert len(problems) == 2
