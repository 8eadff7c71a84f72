"""The one JSON-RPC client for Bitcoin Core (production) and btcd (tests, demo).

Both nodes speak "JSON-RPC 1.0 over HTTP with basic auth", but they differ in
details that would otherwise leak into every caller. They are papered over here,
and only here:

- btcd closes the connection without a reply to a request whose ``id`` is missing
  or null, so every request carries a unique integer id (checked on the reply).
- Bitcoin Core answers errors with HTTP 500/404 *and* a JSON body; btcd with HTTP 200.
  The body decides, the status is only a fallback.
- btcd has no ``getnetworkinfo``, ``generatetoaddress`` or ``estimatesmartfee``;
  Core has no ``version``, ``generate`` or ``estimatefee``. The node kind is
  detected once (``kind``) and the typed helpers pick the right call.
- btcd's ``testmempoolaccept`` requires ``maxfeerate``; ``getrawtransaction`` and
  ``getblock`` verbosity must be integers on btcd (Core accepts both).
- Error codes differ (btcd reports bad params as -32602, Core as -1/-3/-8); the
  subclasses below group the codes that mean the same thing on either node.

Amounts the nodes return are BTC as JSON numbers; helpers that return amounts add
an exact integer ``*_sat`` field so the rest of the code never touches floats.

Blocks: Bitcoin Core serves them binary over its REST interface
(``/rest/block/<hash>.bin``: half the bytes of RPC hex, no JSON to build or parse, a
fraction of the node's CPU). ``get_block_raw`` asks once whether the node offers it
and otherwise uses ``getblock <hash> 0`` (btcd has no REST). REST has no
authentication, so by default it is asked only of a loopback node URL (``rest=True``:
any, e.g. a node on a private network that its ``-rpcallowip`` guards), with the
client's timeout; the block it returns must hash to the hash asked for. Block hashes for a range of
heights come in one batched JSON-RPC request (``get_block_hashes``).
"""

from __future__ import annotations

import hashlib
import itertools
import re
import struct
import threading
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from custody.errors import NodeUnavailable
from custody.netpolicy import is_loopback_host
from pledge.errors import CustodyError, InvalidInput, Unsupported
from pledge.tls import client_tls

__all__ = [
    "NodeKind",
    "NodeRpc",
    "RpcBlockNotFound",
    "RpcBlockNotInMainChain",
    "RpcError",
    "RpcInvalidParams",
    "RpcMethodNotFound",
    "RpcNotFound",
    "RpcTxAlreadyKnown",
    "RpcTxRejected",
    "RpcUnavailable",
    "btc_to_sat",
]

NodeKind = Literal["core", "btcd"]

SATS_PER_BTC = 100_000_000

# Bitcoin Core's RPC error codes (src/rpc/protocol.h); btcd reuses most of them.
_METHOD_NOT_FOUND = -32601
_INVALID_PARAMS = -32602
_INVALID_REQUEST = -32600
_INTERNAL_ERROR = -32603
_TYPE_ERROR = -3
_INVALID_ADDRESS_OR_KEY = -5  # "block not found" / "no such transaction" on both nodes
_INVALID_PARAMETER = -8
_DESERIALIZATION_ERROR = -22
_VERIFY_ERROR = -25
_VERIFY_REJECTED = -26
_VERIFY_ALREADY_IN_CHAIN = -27
_IN_WARMUP = -28
_UNIMPLEMENTED = -1  # btcd: "Command unimplemented" (also Core's generic misc error)


class RpcUnavailable(NodeUnavailable):
    """The node could not be asked: connection refused, timeout, auth rejected,
    warming up, or an answer that is not JSON-RPC. Retrying later may help.

    A timeout on ``sendrawtransaction`` is ambiguous (the node may have taken the
    transaction): callers must re-check by txid rather than assume failure.
    """


class RpcError(CustodyError):
    """The node answered with a JSON-RPC error. ``rpc_code``/``rpc_message`` are the
    node's own; ``method`` is what was called (never the params: they may be large)."""

    status_code = 502
    code = "node_rpc_error"

    def __init__(self, method: str, rpc_code: int, rpc_message: str) -> None:
        super().__init__(f"node RPC {method} failed ({rpc_code}): {rpc_message}")
        self.method = method
        self.rpc_code = rpc_code
        self.rpc_message = rpc_message


class RpcMethodNotFound(RpcError):
    """The node does not implement the method (-32601, or btcd's -1 "Command unimplemented")."""


class RpcInvalidParams(RpcError):
    """Wrong number or type of params (btcd -32602, Core -1 with help text / -3 / -8)."""


class RpcNotFound(RpcError):
    """No such block or transaction (-5 on both nodes)."""


class RpcBlockNotFound(RpcNotFound):
    """A block hash the node does not know."""


class RpcBlockNotInMainChain(RpcError):
    """btcd: verbose ``getblock``/``getblockheader`` refuse side-chain (e.g. invalidated)
    blocks with -32603; raw ``getblock hash 0`` still serves them."""


class RpcTxRejected(RpcError):
    """The node refused a transaction: undecodable, invalid, or policy (-22/-25/-26)."""


class RpcTxAlreadyKnown(RpcTxRejected):
    """The transaction is already in the mempool or chain: a broadcast retry succeeded before."""


def btc_to_sat(value: float | int | str | Decimal) -> int:
    """Exact BTC -> satoshi for amounts a node returned as JSON numbers.

    ``repr(float)`` is the shortest string that round-trips, which is the node's
    own (at most 8-decimal) text, so going through Decimal is exact.
    """
    amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    sats = amount * SATS_PER_BTC
    if sats != sats.to_integral_value():
        raise InvalidInput(f"amount {value!r} BTC is not a whole number of satoshis")
    return int(sats)


def _error_for(method: str, code: int, message: str) -> RpcError:
    """Map a JSON-RPC error to the most specific class that means the same on both nodes."""
    lowered = message.lower()
    if code == _METHOD_NOT_FOUND or (code == _UNIMPLEMENTED and "unimplemented" in lowered):
        return RpcMethodNotFound(method, code, message)
    if method == "sendrawtransaction":
        # btcd: -26 "already have transaction in mempool", -27 "already exists in blockchain".
        if code == _VERIFY_ALREADY_IN_CHAIN or "already have transaction" in lowered:
            return RpcTxAlreadyKnown(method, code, message)
        if code in (_DESERIALIZATION_ERROR, _VERIFY_ERROR, _VERIFY_REJECTED):
            return RpcTxRejected(method, code, message)
    if method == "testmempoolaccept" and code == _DESERIALIZATION_ERROR:
        return RpcTxRejected(method, code, message)
    if code == _INVALID_ADDRESS_OR_KEY:
        if re.search(r"\bblock\b", lowered):  # not "blockchain transaction"
            return RpcBlockNotFound(method, code, message)
        return RpcNotFound(method, code, message)
    if code in (_INVALID_PARAMS, _TYPE_ERROR, _INVALID_PARAMETER):
        return RpcInvalidParams(method, code, message)
    if code == _UNIMPLEMENTED and lowered.split(maxsplit=1)[:1] == [method.lower()]:
        # Core answers a wrong argument count with -1 and the method's help text.
        return RpcInvalidParams(method, code, message)
    if code == _INTERNAL_ERROR and "not in the main chain" in lowered:
        return RpcBlockNotInMainChain(method, code, message)
    return RpcError(method, code, message)


_HASH_HEX = re.compile(r"[0-9a-f]{64}")


def _double_sha256(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def _result(method: str, status: int, body: Any, request_id: int | None) -> Any:
    """The ``result`` of one JSON-RPC reply object, or its error raised as ours.
    ``request_id`` None: a reply to a batch the node refused as a whole."""
    if not isinstance(body, dict) or ("result" not in body and "error" not in body):
        raise RpcUnavailable(f"node RPC {method}: HTTP {status}, malformed reply")
    if request_id is not None and body.get("id") != request_id:
        raise RpcUnavailable(
            f"node RPC {method}: reply id {body.get('id')!r} != request id {request_id}"
        )
    error = body.get("error")
    if error is not None:
        code = int(error.get("code", 0)) if isinstance(error, dict) else 0
        message = str(error.get("message", "")) if isinstance(error, dict) else str(error)
        if code == _IN_WARMUP:
            raise RpcUnavailable(f"node is warming up: {message}")
        raise _error_for(method, code, message)
    return body.get("result")


def _side_chain_header(block_hash: str, raw: bytes) -> dict[str, Any]:
    """The fields of an 80-byte block header, named as ``getblockheader`` names them."""
    version, prev, merkle, timestamp, bits, nonce = struct.unpack_from("<i32s32sI4sI", raw)
    return {
        "hash": block_hash,
        "confirmations": -1,
        "version": version,
        "previousblockhash": prev[::-1].hex(),
        "merkleroot": merkle[::-1].hex(),
        "time": timestamp,
        "bits": bits[::-1].hex(),
        "nonce": nonce,
    }


class NodeRpc:
    """Synchronous JSON-RPC client for one node.

    Thread-safe (httpx.Client is; ids come from a locked counter). ``mining_address``
    is only needed for ``generate_to_address`` on btcd, which can mine only to the
    ``--miningaddr`` it was started with: the harness passes it so a mismatch fails
    loudly instead of paying the wrong address.
    """

    def __init__(
        self,
        url: str,
        user: str,
        password: str,
        timeout: float = 30.0,
        *,
        mining_address: str | None = None,
        rest: bool | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInput(
                f"node RPC url must be http(s)://host:port, got {url!r}", field="url"
            )
        if parts.username or parts.password:
            # Credentials in the URL would end up in logs and error messages.
            raise InvalidInput("pass node RPC credentials separately, not in the url", field="url")
        self.url = url
        self.timeout = timeout
        self.mining_address = mining_address
        self._credentials = (user, password)
        self._client = httpx.Client(
            auth=httpx.BasicAuth(user, password), timeout=timeout, verify=client_tls()
        )
        self._ids = itertools.count(1)
        self._id_lock = threading.Lock()
        self._kind: NodeKind | None = None
        # Whether the node serves binary blocks over REST: asked once (None: not yet).
        # `rest`: None asks only a node on this machine, True any node, False none.
        allowed = is_loopback_host(parts.hostname) if rest is None else rest
        self._rest: bool | None = None if allowed else False

    def __repr__(self) -> str:
        return f"NodeRpc({self.url!r}, timeout={self.timeout})"

    def close(self) -> None:
        self._client.close()

    def copy(self) -> NodeRpc:
        """A client of its own to the same node, knowing what this one learnt (its kind,
        whether it serves REST): for another process, which must not share this one's
        connections."""
        twin = NodeRpc(
            self.url, *self._credentials, self.timeout, mining_address=self.mining_address
        )
        twin._kind, twin._rest = self._kind, self._rest
        return twin

    def __enter__(self) -> NodeRpc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------

    def _next_id(self) -> int:
        with self._id_lock:
            return next(self._ids)

    def call(self, method: str, *params: Any, timeout: float | None = None) -> Any:
        """Call ``method`` with positional ``params``; return ``result`` or raise.
        ``timeout`` replaces the client's for this call (a health check's short one).

        Raises ``RpcUnavailable`` when the node cannot be asked and ``RpcError`` (or a
        subclass) when it answered with an error.
        """
        request_id = self._next_id()
        payload = {"jsonrpc": "1.0", "id": request_id, "method": method, "params": list(params)}
        response = self._post(method, payload, timeout)
        body = self._json_body(method, response)
        return _result(method, response.status_code, body, request_id)

    def call_batch(self, method: str, params: Sequence[Sequence[Any]]) -> list[Any]:
        """Call ``method`` once per entry of ``params`` in one HTTP request (a JSON-RPC
        batch, which both nodes accept); the results in order, or the error of the
        first entry that failed."""
        if not params:
            return []
        ids = [self._next_id() for _ in params]
        payload = [
            {"jsonrpc": "1.0", "id": i, "method": method, "params": list(p)}
            for i, p in zip(ids, params, strict=True)
        ]
        response = self._post(method, payload)
        body = self._json_body(method, response)
        if not isinstance(body, list):
            # A node that refuses the whole batch answers one error object.
            _result(method, response.status_code, body, None)
            raise RpcUnavailable(f"node RPC {method}: HTTP {response.status_code}, not a batch")
        by_id = {entry.get("id"): entry for entry in body if isinstance(entry, dict)}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise RpcUnavailable(f"node RPC {method}: batch reply lacks ids {missing[:3]}")
        return [_result(method, response.status_code, by_id[i], i) for i in ids]

    def _post(self, method: str, payload: Any, timeout: float | None = None) -> httpx.Response:
        try:
            return self._client.post(
                self.url,
                json=payload,
                timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
            )
        except httpx.TimeoutException as exc:
            waited = self.timeout if timeout is None else timeout
            raise RpcUnavailable(f"node RPC {method} timed out after {waited}s") from exc
        except httpx.TransportError as exc:
            raise RpcUnavailable(
                f"node RPC at {self.url} unreachable ({type(exc).__name__}: {exc})"
            ) from exc

    def _json_body(self, method: str, response: httpx.Response) -> Any:
        if response.status_code in (401, 403):
            raise RpcUnavailable(f"node RPC at {self.url} rejected the credentials")
        try:
            return response.json()
        except ValueError as exc:
            raise RpcUnavailable(
                f"node RPC {method}: HTTP {response.status_code}, not a JSON-RPC reply"
            ) from exc

    # -- node kind -----------------------------------------------------------------

    @property
    def kind(self) -> NodeKind:
        """``"core"`` or ``"btcd"``, asked once: Core has ``getnetworkinfo``, btcd ``version``."""
        if self._kind is None:
            try:
                info = self.call("getnetworkinfo")
            except RpcMethodNotFound:
                version = self.call("version")
                if not isinstance(version, dict) or "btcdjsonrpcapi" not in version:
                    raise Unsupported(f"unknown node at {self.url}: {version!r}") from None
                self._kind = "btcd"
            else:
                subversion = str(info.get("subversion", "")) if isinstance(info, dict) else ""
                if "Satoshi" not in subversion:
                    raise Unsupported(f"unknown node at {self.url}: subversion {subversion!r}")
                self._kind = "core"
        return self._kind

    # -- chain ---------------------------------------------------------------------

    def get_blockchain_info(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("getblockchaininfo")
        return result

    def get_block_count(self, *, timeout: float | None = None) -> int:
        return int(self.call("getblockcount", timeout=timeout))

    def get_best_block_hash(self) -> str:
        return str(self.call("getbestblockhash"))

    def get_block_hash(self, height: int) -> str:
        """Hash of the active-chain block at ``height``; ``RpcError`` past the tip."""
        return str(self.call("getblockhash", height))

    def get_block_hashes(self, heights: Sequence[int]) -> list[str]:
        """Hashes of the active-chain blocks at ``heights``, in one request."""
        return [str(h) for h in self.call_batch("getblockhash", [[h] for h in heights])]

    def get_block_raw(self, block_hash: str) -> bytes:
        """Serialized block (with witnesses); we parse blocks ourselves, not the node.
        Binary over REST where the node serves it, else ``getblock <hash> 0`` as hex."""
        if self._rest is not False:
            raw = self._rest_block(block_hash)
            if raw is not None:
                return raw
        return bytes.fromhex(self.call("getblock", block_hash, 0))

    @property
    def serves_rest(self) -> bool | None:
        """Whether binary blocks come over REST (None until the first block is fetched)."""
        return self._rest

    def _rest_block(self, block_hash: str) -> bytes | None:
        """The block over REST, or None when the node has no REST interface (decided on
        the first answer, kept for this client's life)."""
        if not _HASH_HEX.fullmatch(block_hash):
            raise InvalidInput(f"not a block hash: {block_hash!r}", field="block_hash")
        url = f"{self.url.rstrip('/')}/rest/block/{block_hash}.bin"
        try:
            response = self._client.get(url)
        except httpx.TimeoutException as exc:
            raise RpcUnavailable(f"node REST block timed out after {self.timeout}s") from exc
        except httpx.RemoteProtocolError:
            if self._rest is None:  # btcd hangs up on a GET: no REST there
                self._rest = False
                return None
            raise RpcUnavailable(f"node REST at {self.url} hung up") from None
        except httpx.TransportError as exc:
            if self._rest is None:
                return None  # undecided: the node is away; RPC reports it
            raise RpcUnavailable(
                f"node REST at {self.url} unreachable ({type(exc).__name__}: {exc})"
            ) from exc
        binary = response.headers.get("content-type", "").startswith("application/octet-stream")
        if response.status_code == 200 and binary:
            raw = response.content
            if len(raw) < 80 or _double_sha256(raw[:80])[::-1].hex() != block_hash:
                raise RpcUnavailable(f"node REST block {block_hash}: the bytes are another block")
            self._rest = True
            return raw
        if response.status_code == 503:  # Core warming up: ask again once it is up
            if self._rest is None:
                return None
            raise RpcUnavailable(f"node REST block {block_hash}: warming up")
        if self._rest is None:
            # Any other answer to the first question (404 with REST off, 403 from an
            # address -rpcallowip refuses, 405, 501, ...): no REST here; RPC from now on.
            self._rest = False
            return None
        if response.status_code == 404:
            raise RpcBlockNotFound("rest/block", _INVALID_ADDRESS_OR_KEY, response.text[:200])
        raise RpcUnavailable(f"node REST block {block_hash}: HTTP {response.status_code}")

    def get_block_header(self, block_hash: str) -> dict[str, Any]:
        """Verbose header: ``hash``, ``confirmations`` (-1 when not on the active chain),
        ``previousblockhash``, ``height``...

        btcd refuses side-chain blocks here, so for those the header fields are read
        from the raw block and ``confirmations`` is -1 as on Core; ``height`` is then
        absent (btcd does not say it): callers that need it know it from their cursor.
        """
        try:
            result: dict[str, Any] = self.call("getblockheader", block_hash, True)
        except RpcBlockNotInMainChain:
            raw = bytes.fromhex(self.call("getblock", block_hash, 0))
            return _side_chain_header(block_hash, raw)
        return result

    def invalidate_block(self, block_hash: str) -> None:
        self.call("invalidateblock", block_hash)

    def reconsider_block(self, block_hash: str) -> None:
        self.call("reconsiderblock", block_hash)

    # -- transactions ----------------------------------------------------------------

    def get_raw_transaction(self, txid: str, block_hash: str | None = None) -> bytes:
        """Serialized transaction from the mempool or the tx index.

        ``block_hash`` helps Core without ``-txindex``; btcd has no such param and
        needs ``--txindex`` (which the regtest harness sets), so it is dropped there.
        """
        if block_hash is not None and self.kind == "core":
            return bytes.fromhex(self.call("getrawtransaction", txid, 0, block_hash))
        return bytes.fromhex(self.call("getrawtransaction", txid, 0))

    def get_tx_out(
        self, txid: str, vout: int, include_mempool: bool = True
    ) -> dict[str, Any] | None:
        """The unspent output, or None if spent/unknown. Adds ``value_sat`` (exact int)."""
        result = self.call("gettxout", txid, vout, include_mempool)
        if result is None:
            return None
        out: dict[str, Any] = dict(result)
        out["value_sat"] = btc_to_sat(out["value"])
        return out

    def get_raw_mempool(self) -> list[str]:
        return [str(txid) for txid in self.call("getrawmempool")]

    def send_raw_transaction(self, tx_hex: str) -> str:
        """Broadcast; returns the txid. ``RpcTxRejected`` / ``RpcTxAlreadyKnown`` on refusal.

        Only the hex is sent: the second param means ``maxfeerate`` on Core and
        ``allowhighfees`` on btcd, so the defaults are the only common meaning.
        """
        return str(self.call("sendrawtransaction", tx_hex))

    def test_mempool_accept(self, tx_hex: str, max_fee_rate_btc_kvb: float = 0.1) -> dict[str, Any]:
        """Would the mempool take this tx? Returns the node's single entry
        (``txid``, ``allowed``, ``reject-reason``...). btcd requires ``maxfeerate``."""
        result = self.call("testmempoolaccept", [tx_hex], max_fee_rate_btc_kvb)
        entry: dict[str, Any] = dict(result[0])
        entry.setdefault("allowed", False)  # btcd omits it on rejection; Core says false
        return entry

    def estimate_fee_rate_sat_vb(self, conf_target: int) -> float | None:
        """Fee rate estimate in sat/vB, or None when the node has no estimate yet.

        Core: ``estimatesmartfee`` (BTC/kvB). btcd: ``estimatefee`` (BTC/kB; answers 0
        until it has seen enough blocks with transactions, and rejects targets it
        does not track). Callers need a fallback either way.
        """
        if self.kind == "core":
            result = self.call("estimatesmartfee", conf_target)
            rate = result.get("feerate") if isinstance(result, dict) else None
        else:
            try:
                rate = self.call("estimatefee", conf_target)
            except RpcError:
                return None  # e.g. a target beyond what btcd tracks
        if rate is None or float(rate) <= 0:
            return None
        return float(Decimal(repr(float(rate))) * SATS_PER_BTC / 1000)

    # -- regtest ---------------------------------------------------------------------

    def generate_to_address(self, n: int, address: str) -> list[str]:
        """Mine ``n`` blocks paying ``address``; returns their hashes.

        btcd has no ``generatetoaddress``: ``generate n`` pays its ``--miningaddr``, so
        this refuses unless ``address`` is the ``mining_address`` this client was
        given. btcd also fails two concurrent ``generate`` calls: one caller per node.
        """
        if self.kind == "core":
            hashes = self.call("generatetoaddress", n, address)
        else:
            if self.mining_address is None:
                raise Unsupported(
                    "btcd mines only to its --miningaddr: create NodeRpc(mining_address=...)"
                )
            if address != self.mining_address:
                raise Unsupported(
                    f"btcd mines only to its --miningaddr {self.mining_address}, not {address}"
                )
            hashes = self.call("generate", n)
        return [str(h) for h in hashes]
