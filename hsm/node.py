"""The bank signer's own, read-only connection to a Bitcoin node.

The signer decides which coins are a loan's collateral from this connection, never
from what the service's PSBT or request claims: every PSBT input must be a
confirmed unspent output paying a script of the loan's descriptor, and a release
or full liquidation must spend every such output. So the signer asks a node it
was configured with itself, through this small client, and shares no code with
the service's ``custody.chain.rpc``.

It reads only (no broadcast, no wallet) and speaks JSON-RPC 1.0 over HTTP to
btcd or Bitcoin Core, papering over what differs:

- btcd drops a request whose ``id`` is missing or null and ignores named params,
  so every request has an integer id (checked on the reply) and positional params.
- btcd answers errors with HTTP 200, Core with 404/500: the JSON body decides.
- Finding a script's outputs: btcd needs ``--addrindex`` and
  ``searchrawtransactions``; Core has ``scantxoutset`` (confirmed UTXOs only).
- btcd wants verbosity flags as integers (``getrawtransaction txid 1``).
- "Unspent" means "not spent by a confirmed transaction": btcd's ``gettxout`` still
  returns an output that only a mempool transaction spends, Core's hides it (so
  Core is asked again without the mempool). See ``NodeReader.tx_out`` for why.
- btcd lists an address's mempool transactions in random order on every call, so
  they are never paged (``NodeReader._address_history``).

Only the btcd path runs against a real node in this repository's tests (there is no
Bitcoin Core here); the Core path is checked against a fake server only.

Amounts are read from the JSON as Decimal (never float) and converted to exact
integer satoshis. Errors are ``hsm.signer.SignerUnavailable``: without its node
the signer cannot know the collateral and must not sign. The RPC password is
never logged nor put in an error message.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import Any, Literal, Self

import httpx
from embit.script import Script

from hsm.signer import SignerUnavailable
from hsm.urls import check_secret_url
from pledge.network import NetworkName, embit_network
from pledge.tls import client_tls

__all__ = [
    "NodeKind",
    "NodeReader",
    "NodeRpcError",
    "UnspentOutput",
    "btc_to_sats",
]

NodeKind = Literal["btcd", "core"]

SATS_PER_BTC = 100_000_000
MAX_SATS = 21_000_000 * SATS_PER_BTC

# JSON-RPC error codes shared by both nodes (Bitcoin Core's src/rpc/protocol.h).
_NOT_FOUND = -5  # "No information available about address/transaction"
_IN_WARMUP = -28


# Full rescans of an address history before giving up on a chain that keeps moving.
_SCAN_ATTEMPTS = 3
# Outpoints asked per gettxout batch.
_BATCH = 200
_HEX = frozenset("0123456789abcdef")


class NodeRpcError(SignerUnavailable):
    """The signer's node answered a call with a JSON-RPC error we did not expect.

    Still "unavailable" for the caller: the signer cannot establish the facts it
    needs, so it must not sign. ``rpc_code``/``rpc_message`` are the node's own.
    """

    def __init__(self, method: str, rpc_code: int, rpc_message: str) -> None:
        super().__init__(
            f"the signer's node answered {method} with error {rpc_code}: {rpc_message}"
        )
        self.method = method
        self.rpc_code = rpc_code
        self.rpc_message = rpc_message


@dataclass(frozen=True, slots=True)
class UnspentOutput:
    """An output the node holds as unspent; ``confirmations`` is 0 while in the mempool."""

    txid: str
    vout: int
    amount_sats: int
    script_pubkey: bytes
    confirmations: int


def btc_to_sats(value: Decimal | float | int | str) -> int:
    """Exact BTC -> satoshi for an amount a node returned.

    Goes through ``Decimal(str(value))`` so no float arithmetic touches the amount
    (``str`` of a float is its shortest round-tripping text, i.e. the node's own).
    Refuses fractions of a satoshi, negatives, non-finite values and more than 21M BTC.
    """
    if isinstance(value, bool):
        raise ValueError("a BTC amount cannot be a boolean")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"not a BTC amount: {value!r}") from None
    if not amount.is_finite():
        raise ValueError(f"not a finite BTC amount: {value!r}")
    sats = amount * SATS_PER_BTC
    if sats != sats.to_integral_value():
        raise ValueError(f"{value!r} BTC is not a whole number of satoshis")
    if not 0 <= sats <= MAX_SATS:
        raise ValueError(f"{value!r} BTC is outside 0..21,000,000")
    return int(sats)


def _check_outpoint(txid: str, vout: int) -> None:
    if len(txid) != 64 or any(c not in _HEX for c in txid.lower()):
        raise ValueError("a txid is 64 hex digits")
    if isinstance(vout, bool) or not isinstance(vout, int) or vout < 0:
        raise ValueError("an output index is a non-negative integer")


class NodeReader:
    """Read-only JSON-RPC client of the signer's own node. Thread-safe; ``close()`` it.

    ``timeout`` bounds every call except Core's ``scantxoutset``, which reads the
    whole UTXO set and gets ``scan_timeout``.
    """

    #: transactions per ``searchrawtransactions`` page (btcd); further pages are fetched
    search_page_size = 100

    def __init__(
        self,
        url: str,
        user: str,
        password: str,
        *,
        timeout: float = 10.0,
        scan_timeout: float = 120.0,
    ) -> None:
        self.url = check_secret_url(url, "the signer's node")
        self.timeout = timeout
        self.scan_timeout = scan_timeout
        self._client = httpx.Client(
            auth=httpx.BasicAuth(user, password),
            timeout=timeout,
            follow_redirects=False,
            # No proxy from the environment: the password would be sent to it.
            trust_env=False,
            verify=client_tls(trust_env=False),
        )
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._kind: NodeKind | None = None

    def __repr__(self) -> str:
        return f"NodeReader(url={self.url!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------

    def _post(self, payload: Any, method: str, timeout: float | None) -> tuple[Any, int]:
        """POST one JSON-RPC payload (a request or a batch): the decoded body (None if
        not JSON) and the HTTP status.
        ``SignerUnavailable`` when the node cannot be asked or sends no JSON."""
        try:
            response = self._client.post(
                self.url,
                content=json.dumps(payload),
                headers={"Content-Type": "application/json"},
                timeout=self.timeout if timeout is None else timeout,
            )
        except httpx.TimeoutException:
            raise SignerUnavailable(
                f"the signer's node at {self.url} did not answer {method} in time"
            ) from None
        except httpx.HTTPError as exc:
            raise SignerUnavailable(
                f"the signer's node at {self.url} is unreachable ({type(exc).__name__})"
            ) from None
        if response.status_code in (401, 403):
            raise SignerUnavailable(
                f"the signer's node at {self.url} rejected the signer's RPC credentials"
            )
        try:
            # Decimal, never float: amounts must stay exact.
            return json.loads(response.content, parse_float=Decimal), response.status_code
        except ValueError:
            return None, response.status_code

    @staticmethod
    def _reply(body: Any, status: int, method: str, request_id: int) -> Any:
        """``result`` of one reply; ``NodeRpcError`` for an RPC error."""
        if not isinstance(body, dict) or ("result" not in body and "error" not in body):
            raise SignerUnavailable(
                f"the signer's node sent HTTP {status} to {method}, not a JSON-RPC reply"
            )
        if body.get("id") != request_id:
            raise SignerUnavailable(f"the signer's node answered {method} with a foreign id")
        error = body.get("error")
        if error is not None:
            code, message = 0, str(error)
            if isinstance(error, dict):
                raw_code = error.get("code", 0)
                code = raw_code if isinstance(raw_code, int) else 0
                message = str(error.get("message", ""))
            if code == _IN_WARMUP:
                raise SignerUnavailable(f"the signer's node is still starting: {message}")
            raise NodeRpcError(method, code, message)
        return body.get("result")

    def _next_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def _call(self, method: str, *params: Any, timeout: float | None = None) -> Any:
        """``result`` of ``method(*params)``; ``NodeRpcError`` for an RPC error,
        ``SignerUnavailable`` when the node cannot be asked at all."""
        request_id = self._next_id()
        payload = {"jsonrpc": "1.0", "id": request_id, "method": method, "params": list(params)}
        body, status = self._post(payload, method, timeout)
        return self._reply(body, status, method, request_id)

    def _batch(self, calls: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        """The results of ``calls`` (method, params), asked in ONE HTTP request (a JSON-RPC
        batch), in their order; an entry the node answered with an RPC error is that
        ``NodeRpcError`` (returned, not raised: the caller decides per entry, e.g. -5).

        btcd closes its connection after every reply, so each request is a new TCP
        connection: a batch makes the ~10 reads of a loan's scan one round trip. btcd
        (rpcserver.go ``jsonRPCRead``) and Core both run a batch's entries one after
        the other in its order, so a batch reads as the same calls made in sequence.
        Each reply must carry one of our ids, once; anything else is ``SignerUnavailable``.
        """
        if not calls:
            return []
        ids = [self._next_id() for _ in calls]
        payload = [
            {"jsonrpc": "1.0", "id": i, "method": m, "params": list(p)}
            for i, (m, p) in zip(ids, calls, strict=True)
        ]
        what = f"a batch of {len(calls)} ({calls[0][0]}...)"
        body, status = self._post(payload, what, None)
        if not isinstance(body, list) or len(body) != len(calls):
            raise SignerUnavailable(
                f"the signer's node sent HTTP {status} to {what}, not a JSON-RPC batch reply"
            )
        by_id: dict[int, Any] = {}
        for reply in body:
            reply_id = reply.get("id") if isinstance(reply, dict) else None
            if not isinstance(reply_id, int) or reply_id not in ids or reply_id in by_id:
                raise SignerUnavailable(f"the signer's node answered {what} with a foreign id")
            by_id[reply_id] = reply
        results: list[Any] = []
        for request_id, (method, _) in zip(ids, calls, strict=True):
            try:
                results.append(self._reply(by_id[request_id], status, method, request_id))
            except NodeRpcError as exc:
                results.append(exc)
        return results

    # -- node kind -----------------------------------------------------------------

    def kind(self) -> NodeKind:
        """``"btcd"`` or ``"core"``, asked once: Core has ``getnetworkinfo`` with a
        ``/Satoshi:`` subversion, btcd a ``version`` with ``btcdjsonrpcapi``."""
        if self._kind is None:
            try:
                info = self._call("getnetworkinfo")
            except NodeRpcError:
                info = None  # btcd: -1 "Command unimplemented"
            if isinstance(info, dict) and "/Satoshi:" in str(info.get("subversion", "")):
                self._kind = "core"
            else:
                try:
                    version = self._call("version")
                except NodeRpcError:
                    version = None
                if not isinstance(version, dict) or "btcdjsonrpcapi" not in version:
                    raise SignerUnavailable(
                        f"the signer's node at {self.url} is neither btcd nor Bitcoin Core"
                    )
                self._kind = "btcd"
        return self._kind

    # -- chain ---------------------------------------------------------------------

    def tip_height(self) -> int:
        return _as_int(self._call("getblockcount"), "getblockcount")

    def tx_out(self, txid: str, vout: int) -> UnspentOutput | None:
        """The output unless a *confirmed* transaction spent it; None if spent or unknown.

        Outputs of mempool transactions are included (``confirmations`` 0). An output
        that only a mempool transaction spends is still returned: the mempool is not
        final (a spend there can be replaced or dropped), and the signer must be able
        to sign a fee bump of its own stuck transaction, whose inputs the stuck one
        already spends. btcd's ``gettxout txid vout true`` answers exactly that; Core's
        hides mempool-spent outputs, so there it is asked again without the mempool.
        """
        _check_outpoint(txid, vout)
        result = self._gettxout(txid, vout, include_mempool=True)
        if result is None and self.kind() == "core":
            result = self._gettxout(txid, vout, include_mempool=False)
        return _unspent(txid, vout, result)

    def tx_outs(self, outpoints: Sequence[tuple[str, int]]) -> list[UnspentOutput | None]:
        """``tx_out`` of each outpoint, in order. btcd: one batch for all of them (its
        ``gettxout ... true`` is already the answer ``tx_out`` wants); Core: one by one,
        as ``tx_out`` may have to ask it twice."""
        return self._tx_outs(outpoints, with_tip=False)[0]

    def tx_outs_at_tip(
        self, outpoints: Sequence[tuple[str, int]]
    ) -> tuple[list[UnspentOutput | None], str | None]:
        """``tx_outs`` and the best block hash the node had once it answered them (btcd:
        asked last in the same batch, which it runs in order; Core: None). A caller that
        read a script's confirmed coins at that same tip knows they still stand."""
        return self._tx_outs(outpoints, with_tip=True)

    def _tx_outs(
        self, outpoints: Sequence[tuple[str, int]], *, with_tip: bool
    ) -> tuple[list[UnspentOutput | None], str | None]:
        for txid, vout in outpoints:
            _check_outpoint(txid, vout)
        if self.kind() != "btcd":
            return [self.tx_out(txid, vout) for txid, vout in outpoints], None
        found: list[UnspentOutput | None] = []
        tip: str | None = None
        chunks = [outpoints[i : i + _BATCH] for i in range(0, len(outpoints), _BATCH)]
        if with_tip and not chunks:
            chunks = [[]]
        for n, chunk in enumerate(chunks):
            calls: list[tuple[str, Sequence[Any]]] = [("gettxout", (t, v, True)) for t, v in chunk]
            ask_tip = with_tip and n == len(chunks) - 1
            if ask_tip:
                calls.append(("getbestblockhash", ()))
            replies = self._batch(calls)
            if ask_tip:
                tip = _tip_hash(replies.pop())
            for (txid, vout), reply in zip(chunk, replies, strict=True):
                found.append(_unspent(txid, vout, _gettxout_result(reply)))
        return found, tip

    def _gettxout(self, txid: str, vout: int, *, include_mempool: bool) -> dict[str, Any] | None:
        try:
            result = self._call("gettxout", txid, vout, include_mempool)
        except NodeRpcError as exc:
            result = exc
        return _gettxout_result(result)

    def transaction_confirmations(self, txid: str) -> int | None:
        """Confirmations of ``txid``: 0 in the mempool, None when the node does not know it.

        Uses ``getrawtransaction txid 1`` (btcd needs ``--txindex``, Core ``-txindex``,
        for confirmed transactions).
        """
        _check_outpoint(txid, 0)
        try:
            result = self._call("getrawtransaction", txid, 1)
        except NodeRpcError as exc:
            if exc.rpc_code == _NOT_FOUND:
                return None
            raise
        if not isinstance(result, dict):
            raise SignerUnavailable("the signer's node sent a malformed getrawtransaction reply")
        # btcd omits "confirmations" for a mempool transaction; Core omits it too.
        return _as_int(result.get("confirmations", 0), "getrawtransaction")

    # -- finding a loan's outputs ------------------------------------------------------

    def unspent_for_scripts(
        self, scripts: Sequence[bytes], *, network: NetworkName
    ) -> list[UnspentOutput]:
        """Every unspent output paying any of ``scripts``, confirmed or not, in the order found.

        btcd: the address index (``searchrawtransactions``, all pages) lists every
        transaction touching each script's address; each output paying one of our
        scripts is then checked with ``gettxout`` (still unspent? how deep?).
        Core: ``scantxoutset`` over ``raw(<script>)`` descriptors, which sees confirmed
        outputs only (so no 0-conf ones there); each is then checked with ``tx_out``.
        As in ``tx_out``, an output only a mempool transaction spends is still listed.
        Callers that need confirmed coins filter on ``confirmations``.
        """
        return self.unspent_at_tip(scripts, network=network)[0]

    def unspent_at_tip(
        self, scripts: Sequence[bytes], *, network: NetworkName
    ) -> tuple[list[UnspentOutput], str | None]:
        """``unspent_for_scripts`` and the best block hash the whole answer holds at: the
        tip the address histories were read at, when it was still the tip once every
        candidate's ``gettxout`` had been answered; None when that is not known (the tip
        moved meanwhile, Core, or no scripts)."""
        wanted = list(dict.fromkeys(bytes(s) for s in scripts))
        if not wanted:
            return [], None
        scanned_at: str | None = None
        if self.kind() == "btcd":
            candidates, scanned_at = self._btcd_candidates(wanted, network)
        else:
            candidates = self._core_candidates(wanted)
        wanted_set = set(wanted)
        outs, answered_at = self.tx_outs_at_tip(list(dict.fromkeys(candidates)))
        tip = scanned_at if scanned_at is not None and scanned_at == answered_at else None
        return [o for o in outs if o is not None and o.script_pubkey in wanted_set], tip

    def has_history(self, script: bytes, *, network: NetworkName) -> bool:
        """Has any transaction ever paid or spent from ``script``? For gap-limit scanning.

        btcd answers from its address index (mempool included). Core can only say
        whether the script has a confirmed *unspent* output now (``scantxoutset``):
        a used and emptied address looks unused there.
        """
        if self.kind() == "btcd":
            page = self._search(_address(script, network), skip=0, count=1, verbose=0)
            return bool(page)
        return bool(self._core_candidates([bytes(script)]))

    # -- btcd ----------------------------------------------------------------------

    def _search(self, address: str, *, skip: int, count: int, verbose: int) -> list[Any]:
        """One page of ``searchrawtransactions``; [] where btcd says -5 (no history, or
        ``skip`` past the end)."""
        try:
            method, params = _search_call(address, skip=skip, count=count, verbose=verbose)
            result = self._call(method, *params)
        except NodeRpcError as exc:
            result = exc
        return _search_page(result)

    def _btcd_candidates(
        self, wanted: list[bytes], network: NetworkName
    ) -> tuple[list[tuple[str, int]], str]:
        """Outpoints paying ``wanted`` in every transaction of their addresses' history,
        and the best block hash they were read at.

        Pages of the confirmed history are only consistent while the chain stays put,
        so the scan is repeated if the tip moved meanwhile. The tip, every address's
        first page and the tip again are one batch (btcd runs it in order); an address
        with more (a full page, or mempool transactions) is read on as before, and the
        tip is then asked once more.
        """
        hexes = {s.hex() for s in wanted}
        addresses = [_address(s, network) for s in wanted]
        size = self.search_page_size
        for _ in range(_SCAN_ATTEMPTS):
            replies = self._batch(
                [
                    ("getbestblockhash", ()),
                    *(_search_call(a, skip=0, count=size, verbose=1) for a in addresses),
                    ("getbestblockhash", ()),
                ]
            )
            tips = [_batch_result(replies[0]), _batch_result(replies[-1])]
            candidates: list[tuple[str, int]] = []
            read_on = False
            for address, reply in zip(addresses, replies[1:-1], strict=True):
                first = _search_page(reply)
                history, more = self._address_history(address, first)
                read_on = read_on or more
                for tx in history:
                    try:
                        txid = str(tx["txid"])
                        for out in tx["vout"]:
                            if str(out["scriptPubKey"]["hex"]) in hexes:
                                candidates.append((txid, _as_int(out["n"], "vout")))
                    except (KeyError, TypeError):
                        raise SignerUnavailable(
                            "the signer's node sent a malformed searchrawtransactions reply"
                        ) from None
            if read_on:
                tips.append(self._call("getbestblockhash"))
            if all(tip == tips[0] for tip in tips):
                return candidates, _tip_hash(tips[0])
        raise SignerUnavailable("the signer's node kept changing its chain during a scan")

    def _address_history(
        self, address: str, first: list[Any] | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """Every transaction touching ``address``: confirmed ones (oldest first, paged),
        then the mempool's; and whether it asked the node (``first``, the first page,
        when already read).

        btcd lists an address's mempool transactions from a Go map, in a different
        order on each call, so paging through them could skip some: from the first
        unconfirmed one on, everything is taken in a single answer (the count doubled
        until the answer comes back short).
        """
        size = self.search_page_size
        history: list[dict[str, Any]] = []
        skip = 0
        asked = False
        while True:
            if first is not None:
                page, first = first, None
            else:
                page, asked = self._search(address, skip=skip, count=size, verbose=1), True
            unconfirmed_at = next(
                (i for i, tx in enumerate(page) if not isinstance(tx, dict) or not _in_block(tx)),
                None,
            )
            if unconfirmed_at is None:
                history.extend(page)
                if len(page) < size:
                    return history, asked
                skip += len(page)
                continue
            history.extend(page[:unconfirmed_at])
            skip += unconfirmed_at
            count = max(size, len(page) - unconfirmed_at) * 2
            while True:
                rest = self._search(address, skip=skip, count=count, verbose=1)
                if len(rest) < count:
                    history.extend(rest)
                    return history, True
                count *= 2

    # -- Bitcoin Core (not exercised against a real node here) ------------------------

    def _core_candidates(self, wanted: list[bytes]) -> list[tuple[str, int]]:
        descriptors = [{"desc": f"raw({s.hex()})"} for s in wanted]
        result = self._call("scantxoutset", "start", descriptors, timeout=self.scan_timeout)
        if not isinstance(result, dict) or result.get("success") is False:
            raise SignerUnavailable("the signer's node could not scan its UTXO set")
        try:
            return [
                (str(u["txid"]), _as_int(u["vout"], "scantxoutset"))
                for u in result.get("unspents", [])
            ]
        except (KeyError, TypeError):
            raise SignerUnavailable(
                "the signer's node sent a malformed scantxoutset reply"
            ) from None


def _batch_result(reply: Any) -> Any:
    """A batch entry that must not be an RPC error."""
    if isinstance(reply, NodeRpcError):
        raise reply
    return reply


def _tip_hash(reply: Any) -> str:
    """A ``getbestblockhash`` answer (a batch entry): 64 hex digits, or SignerUnavailable."""
    tip = _batch_result(reply)
    if not isinstance(tip, str) or len(tip) != 64 or any(c not in _HEX for c in tip.lower()):
        raise SignerUnavailable("the signer's node sent a malformed getbestblockhash reply")
    return tip.lower()


def _unspent(txid: str, vout: int, result: dict[str, Any] | None) -> UnspentOutput | None:
    if result is None:
        return None
    try:
        amount = btc_to_sats(result["value"])
        script = bytes.fromhex(str(result["scriptPubKey"]["hex"]))
        confirmations = _as_int(result["confirmations"], "gettxout")
    except (KeyError, TypeError, ValueError):
        raise SignerUnavailable("the signer's node sent a malformed gettxout reply") from None
    return UnspentOutput(txid.lower(), vout, amount, script, confirmations)


def _gettxout_result(result: Any) -> dict[str, Any] | None:
    """A ``gettxout`` answer (or its RPC error): the output, or None where there is none."""
    if isinstance(result, NodeRpcError):
        if result.rpc_code == _NOT_FOUND:
            return None  # btcd: "Output index number (vout) does not exist" (mempool tx)
        raise result
    if result is not None and not isinstance(result, dict):
        raise SignerUnavailable("the signer's node sent a malformed gettxout reply")
    return result


def _search_call(
    address: str, *, skip: int, count: int, verbose: int
) -> tuple[str, tuple[Any, ...]]:
    return ("searchrawtransactions", (address, verbose, skip, count, 0, False))


def _search_page(result: Any) -> list[Any]:
    """A ``searchrawtransactions`` answer (or its RPC error) as a page; [] for -5."""
    if isinstance(result, NodeRpcError):
        if result.rpc_code == _NOT_FOUND:
            return []
        if "addrindex" in result.rpc_message.lower():
            raise SignerUnavailable(
                "the signer's node has no address index: start btcd with --addrindex"
            ) from None
        raise result
    if not isinstance(result, list):
        raise SignerUnavailable("the signer's node sent a malformed searchrawtransactions reply")
    return result


def _address(script: bytes, network: NetworkName) -> str:
    """The address btcd indexes ``script`` under (ValueError for a script without one)."""
    try:
        return str(Script(bytes(script)).address(embit_network(network)))
    except Exception as exc:  # embit raises bare errors for scripts without an address form
        raise ValueError(f"script {bytes(script).hex()} has no address form") from exc


def _in_block(tx: dict[str, Any]) -> bool:
    """A verbose ``searchrawtransactions`` entry of a mined transaction (btcd leaves
    ``blockhash`` and ``confirmations`` out for mempool ones)."""
    return bool(tx.get("blockhash")) and bool(tx.get("confirmations"))


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SignerUnavailable(f"the signer's node sent a malformed {what} reply")
    return value
