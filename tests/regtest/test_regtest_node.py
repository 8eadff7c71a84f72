"""The regtest harness and NodeRpc against a real btcd (fails, never skips, without btcd).

Tests share one node per xdist worker: they read the tip instead of assuming a
height, and make and mine their own payments.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import httpx
import pytest
from embit import script
from embit.transaction import Transaction

from custody.chain.rpc import (
    NodeRpc,
    RpcBlockNotFound,
    RpcInvalidParams,
    RpcMethodNotFound,
    RpcTxAlreadyKnown,
    RpcTxRejected,
    RpcUnavailable,
)
from pledge.errors import Unsupported
from regtest.faucet import (
    COINBASE_MATURITY,
    Coin,
    FaucetError,
    random_p2wpkh_address,
    random_p2wsh_multisig,
)
from regtest.node import RegtestNode, WaitTimeout, free_port, wait_until

pytestmark = pytest.mark.node

HALVING_INTERVAL = 150  # regtest


def spk_hex(address: str) -> str:
    return str(script.address_to_scriptpubkey(address).data.hex())


# -- lifecycle -----------------------------------------------------------------------


def test_start_and_stop_deletes_datadir() -> None:
    node = RegtestNode(name="lifecycle")
    with node:
        assert node.process is not None and node.process.poll() is None
        assert node.rpc.get_block_count() == 0
        assert node.rpc.kind == "btcd"
        basedir = node.basedir
        assert basedir is not None and basedir.is_dir()
        url, password = node.rpc_url, node.rpc_password
        process = node.process
    assert process.poll() is not None  # the process is gone, not orphaned
    assert not basedir.exists()
    dead = NodeRpc(url, "regtest", password, timeout=2.0)
    with pytest.raises(RpcUnavailable):
        dead.get_block_count()


def test_datadir_kept_when_the_block_raises() -> None:
    node = RegtestNode(name="keep")
    with pytest.raises(RuntimeError, match="boom"), node:
        node.mine(1)
        raise RuntimeError("boom")
    assert node.basedir is not None
    try:
        assert (node.basedir / "data" / "regtest").is_dir()
        assert node.log_path.read_text()  # btcd wrote its log there
    finally:
        shutil.rmtree(node.basedir)


def test_node_is_per_worker(regtest_node: RegtestNode) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    assert f"-{worker}-" in str(regtest_node.basedir)
    assert regtest_node.rpc.get_block_count() >= COINBASE_MATURITY


# -- RPC against btcd ------------------------------------------------------------------


def test_btcd_needs_a_request_id() -> None:
    """Why NodeRpc always sends an id: btcd hangs up on a null one."""
    with RegtestNode(name="noid") as node:
        body: dict[str, Any] = {
            "jsonrpc": "1.0",
            "id": None,
            "method": "getblockcount",
            "params": [],
        }
        auth = (node.rpc_user, node.rpc_password)
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.post(node.rpc_url, json=body, auth=auth, timeout=5)
        reply = httpx.post(node.rpc_url, json={**body, "id": 7}, auth=auth, timeout=5).json()
        assert reply == {"jsonrpc": "1.0", "result": 0, "error": None, "id": 7}


def test_typed_errors(regtest_node: RegtestNode) -> None:
    rpc = regtest_node.rpc
    with pytest.raises(RpcMethodNotFound) as caught:
        rpc.call("nosuchmethod")
    assert caught.value.rpc_code == -32601
    with pytest.raises(RpcInvalidParams) as bad:
        rpc.call("getblockcount", "unexpected")
    assert bad.value.rpc_code == -32602
    with pytest.raises(RpcBlockNotFound):
        rpc.get_block_header("00" * 31 + "01")
    with pytest.raises(RpcTxRejected):
        rpc.send_raw_transaction("00")
    with pytest.raises(Unsupported):
        rpc.generate_to_address(1, random_p2wpkh_address())  # btcd mines to --miningaddr only


def test_unavailable_on_dead_port_and_bad_password(regtest_node: RegtestNode) -> None:
    with pytest.raises(RpcUnavailable):
        NodeRpc(f"http://127.0.0.1:{free_port()}", "u", "p", timeout=2.0).get_block_count()
    wrong = NodeRpc(regtest_node.rpc_url, "regtest", "wrong-password", timeout=5.0)
    with pytest.raises(RpcUnavailable, match="credentials"):
        wrong.get_block_count()


def test_chain_helpers(regtest_node: RegtestNode) -> None:
    rpc = regtest_node.rpc
    height = rpc.get_block_count()
    best = rpc.get_best_block_hash()
    assert rpc.get_block_hash(height) == best
    header = rpc.get_block_header(best)
    assert header["height"] == height
    assert header["confirmations"] == 1
    raw = rpc.get_block_raw(best)
    assert raw[4:36][::-1].hex() == header["previousblockhash"] == rpc.get_block_hash(height - 1)
    info = rpc.get_blockchain_info()
    assert info["chain"] == "regtest"
    assert info["bestblockhash"] == best


def test_mine_moves_the_height(regtest_node: RegtestNode) -> None:
    start = regtest_node.rpc.get_block_count()
    hashes = regtest_node.mine(3)
    assert len(hashes) == 3
    assert regtest_node.rpc.get_block_count() == start + 3
    assert [regtest_node.rpc.get_block_hash(start + i) for i in (1, 2, 3)] == hashes
    regtest_node.wait_for_height(start + 3, timeout=1)


def test_wait_until_times_out_with_message() -> None:
    with pytest.raises(WaitTimeout, match="never happens"):
        wait_until(lambda: False, timeout=0.1, message="never happens")


# -- faucet ----------------------------------------------------------------------------


def test_faucet_pays_p2wpkh_and_p2wsh(regtest_node: RegtestNode) -> None:
    rpc = regtest_node.rpc
    p2wpkh = random_p2wpkh_address()
    p2wsh, descriptor, _keys = random_p2wsh_multisig(2, 3)
    assert p2wsh.startswith("bcrt1q") and len(p2wsh) == 64  # 32-byte witness program
    assert descriptor.startswith("wsh(sortedmulti(2,")

    paid = {
        p2wpkh: regtest_node.faucet.pay(p2wpkh, 123_456),
        p2wsh: regtest_node.faucet.pay(p2wsh, 2_000_000),
    }
    mempool = rpc.get_raw_mempool()
    assert all(txid in mempool for txid, _ in paid.values())
    regtest_node.mine(1)
    for (address, (txid, vout)), sats in zip(paid.items(), (123_456, 2_000_000), strict=True):
        out = rpc.get_tx_out(txid, vout)
        assert out is not None
        assert out["value_sat"] == sats
        assert out["confirmations"] == 1
        assert out["scriptPubKey"]["hex"] == spk_hex(address)
        tx = Transaction.parse(rpc.get_raw_transaction(txid))
        assert tx.txid().hex() == txid
        assert tx.vin[0].sequence == 0xFFFFFFFD  # faucet txs signal RBF


def test_test_mempool_accept_and_duplicate_broadcast(regtest_node: RegtestNode) -> None:
    rpc = regtest_node.rpc
    payment = regtest_node.faucet.build_tx([(random_p2wpkh_address(), 50_000)])
    verdict = rpc.test_mempool_accept(payment.tx_hex)
    assert verdict["allowed"] is True
    assert verdict["txid"] == payment.txid
    assert payment.fee_sat / payment.vsize == pytest.approx(2.0, abs=0.1)
    assert rpc.send_raw_transaction(payment.tx_hex) == payment.txid
    with pytest.raises(RpcTxAlreadyKnown):
        rpc.send_raw_transaction(payment.tx_hex)  # in the mempool
    regtest_node.mine(1)
    with pytest.raises(RpcTxAlreadyKnown):
        rpc.send_raw_transaction(payment.tx_hex)  # in a block
    # Same inputs again: the node says no, with a reason.
    again = regtest_node.faucet.build_tx([(random_p2wpkh_address(), 40_000)], spend=payment.inputs)
    verdict = rpc.test_mempool_accept(again.tx_hex)
    assert verdict["allowed"] is False
    assert verdict["reject-reason"]


def test_pay_many_one_tx_many_outputs(regtest_node: RegtestNode) -> None:
    outputs = [(random_p2wpkh_address(), 10_000 + i) for i in range(40)]
    txid = regtest_node.faucet.pay_many(outputs)
    regtest_node.mine(1)
    for vout, (address, sats) in enumerate(outputs):
        out = regtest_node.rpc.get_tx_out(txid, vout)
        assert out is not None
        assert (out["value_sat"], out["scriptPubKey"]["hex"]) == (sats, spk_hex(address))


def test_pay_needs_more_than_dust(regtest_node: RegtestNode) -> None:
    with pytest.raises(FaucetError, match="dust"):
        regtest_node.faucet.pay(random_p2wpkh_address(), 10)


def test_estimate_fee_on_btcd(regtest_node: RegtestNode) -> None:
    """btcd has only ``estimatefee``: a number after a few blocks with faucet txs, else None."""
    for _ in range(3):
        regtest_node.faucet.pay(random_p2wpkh_address(), 20_000)
        regtest_node.mine(1)
    rate = regtest_node.rpc.estimate_fee_rate_sat_vb(2)
    assert rate is None or 1.0 <= rate <= 10.0
    assert regtest_node.rpc.estimate_fee_rate_sat_vb(10_000) is None


# -- reorgs ----------------------------------------------------------------------------


def test_invalidate_returns_payment_to_mempool_then_it_confirms_again(
    regtest_node: RegtestNode,
) -> None:
    rpc = regtest_node.rpc
    txid, vout = regtest_node.faucet.pay(random_p2wpkh_address(), 77_000)
    [block] = regtest_node.mine(1)
    height = rpc.get_block_count()

    orphaned = regtest_node.invalidate(1)
    assert orphaned == [block]
    assert rpc.get_block_count() == height - 1
    assert txid in rpc.get_raw_mempool()
    unconfirmed = rpc.get_tx_out(txid, vout)
    assert unconfirmed is not None and unconfirmed["confirmations"] == 0
    assert rpc.get_tx_out(txid, vout, include_mempool=False) is None
    side = rpc.get_block_header(block)  # btcd refuses this natively: the client papers over it
    assert side["confirmations"] == -1
    assert side["previousblockhash"] == rpc.get_block_hash(height - 1)
    assert rpc.get_block_raw(block)  # raw side-chain blocks stay readable (for rollbacks)

    [replacement] = regtest_node.mine(1)
    assert replacement != block
    assert rpc.get_block_count() == height
    confirmed = rpc.get_tx_out(txid, vout)
    assert confirmed is not None and confirmed["confirmations"] == 1
    assert txid not in rpc.get_raw_mempool()


def test_reorg_1_reconfirms_payment_in_new_branch(regtest_node: RegtestNode) -> None:
    rpc = regtest_node.rpc
    txid, vout = regtest_node.faucet.pay(random_p2wpkh_address(), 55_000)
    [old] = regtest_node.mine(1)
    height = rpc.get_block_count()
    new = regtest_node.reorg(1)
    assert len(new) == 2
    assert rpc.get_block_count() == height + 1
    assert rpc.get_block_hash(height) == new[0] != old
    assert rpc.get_block_header(old)["confirmations"] == -1
    out = rpc.get_tx_out(txid, vout, include_mempool=False)
    assert out is not None and out["confirmations"] == 2  # re-mined in the first new block


def test_reorg_3(regtest_node: RegtestNode) -> None:
    rpc = regtest_node.rpc
    paid = []
    old_blocks = []
    for sats in (31_000, 32_000, 33_000):
        paid.append(regtest_node.faucet.pay(random_p2wpkh_address(), sats))
        old_blocks += regtest_node.mine(1)
    height = rpc.get_block_count()
    new = regtest_node.reorg(3)
    assert len(new) == 4
    assert rpc.get_block_count() == height + 1
    assert [rpc.get_block_hash(height - 2 + i) for i in range(3)] == new[:3]
    assert all(rpc.get_block_header(h)["confirmations"] == -1 for h in old_blocks)
    for txid, vout in paid:
        assert rpc.get_tx_out(txid, vout, include_mempool=False) is not None
    assert not set(txid for txid, _ in paid) & set(rpc.get_raw_mempool())


def test_double_spend_replaces_a_payment_after_invalidate(regtest_node: RegtestNode) -> None:
    rpc = regtest_node.rpc
    deposit_address = random_p2wsh_multisig()[0]
    txid, vout = regtest_node.faucet.pay(deposit_address, 1_000_000)
    regtest_node.mine(1)
    elsewhere = random_p2wpkh_address()
    with pytest.raises(RpcTxRejected):
        regtest_node.faucet.double_spend(txid, elsewhere, 900_000)  # confirmed: cannot

    regtest_node.invalidate(1)
    assert txid in rpc.get_raw_mempool()
    conflict = regtest_node.faucet.double_spend(txid, elsewhere, 900_000)
    mempool = rpc.get_raw_mempool()
    assert conflict in mempool and txid not in mempool  # BIP-125 replacement
    regtest_node.mine(2)
    assert rpc.get_tx_out(txid, vout) is None
    out = rpc.get_tx_out(conflict, 0)
    assert out is not None and out["value_sat"] == 900_000
    assert out["scriptPubKey"]["hex"] == spk_hex(elsewhere)


def test_faucet_forgets_coinbases_of_orphaned_blocks(regtest_node: RegtestNode) -> None:
    faucet = regtest_node.faucet
    old = regtest_node.mine(3)
    old_coinbases = {str(regtest_node.rpc.call("getblock", h, 1)["tx"][0]) for h in old}
    assert old_coinbases <= {txid for txid, _ in faucet.known_outpoints}
    new = regtest_node.reorg(3)
    known = {txid for txid, _ in faucet.known_outpoints}
    assert not old_coinbases & known
    assert {str(regtest_node.rpc.call("getblock", h, 1)["tx"][0]) for h in new} <= known
    txid, vout = faucet.pay(random_p2wpkh_address(), 42_000)
    regtest_node.mine(1)
    assert regtest_node.rpc.get_tx_out(txid, vout) is not None


def test_faucet_survives_a_reorg_that_removes_its_spent_coinbase() -> None:
    """A deep reorg orphans the coinbase a payment spent: the payment and its change
    vanish for good; the faucet must drop them and keep paying from the new branch."""
    with RegtestNode(name="deep") as node:
        node.mine(COINBASE_MATURITY + 1)
        txid, vout = node.faucet.pay(random_p2wpkh_address(), 100_000)
        change = (txid, node.faucet.payments[txid].change_vout)
        node.mine(1)
        node.invalidate(node.rpc.get_block_count())  # back to genesis
        node.mine(COINBASE_MATURITY + 3)
        # btcd quirk: the payment stays in the mempool although its input is gone,
        # and is never mined (Bitcoin Core would evict it).
        assert node.rpc.get_tx_out(txid, vout, include_mempool=False) is None
        new_txid, new_vout = node.faucet.pay(random_p2wpkh_address(), 100_000)
        node.mine(1)
        assert node.rpc.get_tx_out(new_txid, new_vout, include_mempool=False) is not None
        spent = {(c.txid, c.vout) for c in node.faucet.payments[new_txid].inputs}
        assert change not in spent
        assert change not in node.faucet.known_outpoints


def test_faucet_after_halving(regtest_node: RegtestNode) -> None:
    """Past height 150 the subsidy halves; spend such a coinbase explicitly."""
    rpc = regtest_node.rpc
    target = HALVING_INTERVAL + COINBASE_MATURITY + 10
    height = rpc.get_block_count()
    if height < target:
        regtest_node.mine(target - height)

    # Other tests on this worker's node spend coinbases too: take the first unspent,
    # mature one past the halving, mining a fresh one if they are all gone.
    def unspent_halved_coinbase() -> tuple[str, dict[str, Any], int] | None:
        tip = rpc.get_block_count()
        for h in range(HALVING_INTERVAL + 1, tip - COINBASE_MATURITY + 1):
            txid = str(rpc.call("getblock", rpc.get_block_hash(h), 1)["tx"][0])
            found = rpc.get_tx_out(txid, 0)
            if found is not None:
                return txid, found, h
        return None

    pick = unspent_halved_coinbase()
    if pick is None:
        regtest_node.mine(COINBASE_MATURITY + 1)
        pick = unspent_halved_coinbase()
    assert pick is not None
    coinbase, out, at = pick
    assert out["coinbase"] is True
    # The subsidy at that height (a busy worker's node may be past a second halving too).
    subsidy = 5_000_000_000 >> (at // HALVING_INTERVAL)
    assert at > HALVING_INTERVAL and subsidy <= 2_500_000_000
    assert subsidy <= out["value_sat"] < 2 * subsidy  # the subsidy + fees
    payment = regtest_node.faucet.build_tx(
        [(random_p2wpkh_address(), subsidy - 100_000_000)],
        spend=[Coin(coinbase, 0, out["value_sat"])],
    )
    assert regtest_node.faucet.broadcast(payment) == payment.txid
    txid, vout = regtest_node.faucet.pay(random_p2wpkh_address(), 60_000)  # ordinary pay too
    regtest_node.mine(1)
    paid = rpc.get_tx_out(payment.txid, 0)
    assert paid is not None and paid["value_sat"] == subsidy - 100_000_000
    assert rpc.get_tx_out(txid, vout) is not None
