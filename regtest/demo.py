"""`make demo`: the whole lending story on a regtest node, in one command.

btcd on regtest, the service on SQLite behind its real HTTP API (loopback), the bank's
signer with its keys in a SoftHSM2 token (its own registry, node connection and price
feed; people enrolled with Ed25519 approval keys), and software HD signers playing the
miner's and the arbiter's hardware wallets. A local BTC/RUB feed plays the market; the
service and the signer each read it themselves. Three loans of 0.5 BTC each:

1. loan 1 is repaid: the bank asks for the release, the miner signs, the operator and a
   second bank employee sign the signer's statement of that exact transaction, the
   signer checks everything itself and signs, the collateral goes back to the miner;
2. the price falls: loan 2 gets a margin call, the miner tops it up, it is cured;
3. the price falls further: loan 3 (which ignored its own margin call) crosses the
   liquidation LTV; the signer's own valuation agrees, so it signs the liquidation with
   no human approval, the arbiter co-signs, the bank receives exactly the debt and the
   miner the rest.

Every step is narrated; the final table is checked against the node itself (the
process exits non-zero on any mismatch) and the audit hash chain is verified. On
failure the node's datadir and the work directory are kept for inspection.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from embit import bip32
from embit.networks import NETWORKS
from embit.transaction import Transaction
from sqlmodel import Session

from custody.audit.service import verify_chain
from custody.auth.service import create_principal
from custody.chain.rpc import NodeRpc
from custody.config import Settings
from custody.db.models import Loan, Role
from custody.db.session import transaction
from custody.logging import configure_logging
from custody.notify.events import AUDIENCE, notify_loan
from custody.risk.engine import RiskReport
from custody.risk.prices import HttpJsonPriceSource, MedianPriceSource
from custody.root import Root
from custody.signer.review import decode_psbt, describe
from hsm.approvals import People
from hsm.client import BankSigner, InProcessTransport
from hsm.registry import Registry
from pledge.amounts import ltv_bps, sats_for_kopecks
from pledge.statements import iso
from regtest.faucet import random_p2wpkh_address
from regtest.kyc import CLEAN_RECORD
from regtest.node import RegtestNode, free_port, wait_until
from regtest.people import Staff
from regtest.price_feed import PriceFeed
from regtest.software_signer import SoftwareHDSigner

COLLATERAL_SATS = 50_000_000  # 0.5 BTC per loan
TOP_UP_SATS = 50_000_000  # what the miner adds to cure loan 2's margin call
START_PRICE = Decimal(6_000_000)  # RUB per BTC
DROP_1 = Decimal(4_000_000)  # loan 2 at exactly 75%, loan 3 at 77.5%: margin calls
DROP_2 = Decimal(3_400_000)  # loan 3 at 91.2%: liquidated; loan 2 (1 BTC now) at 44%
# Principals (kopecks). Loans 2 and 3 carry no interest, so the debt the bank must
# receive is exact whenever the engine looks at it.
LOANS = (
    ("repaid and released", 1_000_000_00, 1_200),
    ("margin call, cured by a top-up", 1_500_000_00, 0),
    ("liquidated automatically", 1_550_000_00, 0),
)
STEP = [0]


def say(text: str) -> None:
    STEP[0] += 1
    print(f"\n[{STEP[0]:>2}] {text}", flush=True)


def detail(text: str) -> None:
    print(f"     {text}", flush=True)


def rub(kopecks: int) -> str:
    return f"{kopecks // 100:,} RUB"


class Api:
    """A tiny client: one bearer key per person, errors shown as the API words them."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=30)
        self.keys: dict[str, str] = {}

    def __call__(self, who: str, method: str, path: str, expect: int = 200, **kw: Any) -> Any:
        r = self.http.request(
            method, path, headers={"Authorization": f"Bearer {self.keys[who]}"}, **kw
        )
        if r.status_code != expect:
            raise SystemExit(f"{method} {path} as {who}: {r.status_code} {r.text}")
        return (
            r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
        )


class Device:
    """A party's signing device: a software HD signer (regtest only) standing in for a
    hardware wallet. One device per party, one BIP-48 account per loan, as in real life."""

    def __init__(self, who: str) -> None:
        root = bip32.HDKey.from_seed(os.urandom(32), version=NETWORKS["regtest"]["xprv"])
        self.who = who
        self.signer = SoftwareHDSigner(root, "regtest")

    def sign(self, api: Api, request_id: int) -> dict[str, Any]:
        """Download the request's PSBT, sign it on the device, upload it."""
        psbt = api(self.who, "GET", f"/v1/signing-requests/{request_id}/psbt")["psbt"]
        signed = self.signer.sign_psbt(psbt)
        out: dict[str, Any] = api(
            self.who, "POST", f"/v1/signing-requests/{request_id}/signatures", json={"psbt": signed}
        )
        return out


@dataclass
class Market:
    """The BTC/RUB feed both the service's risk engine and the bank's signer poll."""

    feed: PriceFeed
    median: MedianPriceSource = field(init=False)

    def __post_init__(self) -> None:
        source = HttpJsonPriceSource(
            "feed", self.feed.url, field_path="data.price", time_path="data.time"
        )
        self.median = MedianPriceSource([source], max_age=timedelta(minutes=10), max_spread_bps=200)

    def set(self, price: Decimal, *, age: timedelta = timedelta(0)) -> None:
        self.feed.set(str(price), datetime.now(UTC) - age if age else None)
        consensus = self.median.consensus()
        if consensus.quote is None:
            detail(f"BTC/RUB {price:,} quoted {age} ago; the median says: {consensus.reason}")
            return
        detail(
            f"the feed quotes BTC/RUB {price:,}; the engine's median: "
            f"{consensus.quote.price_rub_per_btc:,} ({consensus.quote.source})"
        )


def sign_statement_via_api(api: Api, who: str, sid: int, people: list[Staff]) -> dict[str, Any]:
    """Each person reviews the statement on their own machine and sends their signature."""
    statement = api(who, "GET", f"/v1/signer-statements/{sid}")["statement"]
    view: dict[str, Any] = {}
    for person in people:
        view = api(
            who, "POST", f"/v1/signer-statements/{sid}/endorsements", json=person.endorse(statement)
        )
    return view


def serve(root: Root) -> tuple[str, uvicorn.Server]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            root.app(),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    threading.Thread(target=server.run, daemon=True).start()
    wait_until(lambda: server.started, timeout=30, message="the API to start")
    return f"http://127.0.0.1:{port}", server


def notify(session: Session, loan: Loan, event: str, data: dict[str, Any]) -> None:
    """What the risk engine tells the parties: queued as webhooks (as the engine does
    without a callback), and narrated here. "signature.needed" was already queued when
    the signing request was created."""
    if event in AUDIENCE and event != "signature.needed":
        notify_loan(session, loan, event, data)
    extra = f" (LTV {data['ltv_bps']} bps)" if data.get("ltv_bps") else ""
    seat = f" -> {data['seat']}" if "seat" in data else ""
    detail(f"  notify: loan {loan.id} {event}{seat}{extra}")


def show_pass(report: RiskReport, api: Api, loan_ids: list[int], price: Decimal) -> None:
    detail(
        f"risk pass at {report.price}: {report.loans} open loans, margin calls "
        f"{report.margin_calls}, cured {report.cured}, liquidations (requests) "
        f"{report.liquidations}"
    )
    if report.paused or report.errors:
        raise SystemExit(f"risk pass paused/failed: {report.paused} {report.errors}")
    for lid in loan_ids:
        view = api("auditor", "GET", f"/v1/loans/{lid}")
        sats = view["collateral"]["confirmed_sats"]
        ltv = ltv_bps(view["terms"]["principal_kopecks"], sats, price) if sats else 0
        detail(f"  loan {lid}: {view['state']:<12} {sats:>11} sats  LTV ~{ltv / 100:.2f}%")


@dataclass
class Row:
    loan: int
    state: str
    collateral_in: int
    bank_got: int | None
    miner_got: int | None
    fee: int | None
    txid: str | None
    problems: list[str]


def _prevout(rpc: NodeRpc, txid: str, vout: int) -> tuple[int, str]:
    """Amount and address of an output, from the raw transaction the node returns
    (works for spent outputs too, unlike gettxout)."""
    out = Transaction.parse(rpc.get_raw_transaction(txid)).vout[vout]
    return int(out.value), str(out.script_pubkey.address(NETWORKS["regtest"]))


def check_loan(api: Api, rpc: NodeRpc, lid: int, expect: dict[str, Any]) -> Row:
    """One table row, every amount read from the node and compared with the service and
    with what the story says it must be."""
    view = api("auditor", "GET", f"/v1/loans/{lid}")
    deposits = api("auditor", "GET", f"/v1/loans/{lid}/deposits")
    own = {a["address"] for a in api("auditor", "GET", f"/v1/loans/{lid}/addresses")}
    problems: list[str] = []
    if view["state"] != expect["state"]:
        problems.append(f"state {view['state']} != {expect['state']}")
    collateral_in = 0
    for dep in deposits:
        amount, address = _prevout(rpc, dep["txid"], dep["vout"])
        collateral_in += amount
        if amount != dep["amount_sats"] or address not in own:
            problems.append(f"deposit {dep['txid']}:{dep['vout']} differs on the node")
    if collateral_in != expect["collateral_in"]:
        problems.append(f"collateral in {collateral_in} != {expect['collateral_in']}")
    txid = expect.get("txid")
    if txid is None:  # still open: every deposit must be unspent and confirmed on the node
        for dep in deposits:
            out = rpc.get_tx_out(dep["txid"], dep["vout"], include_mempool=False)
            if out is None or out["value_sat"] != dep["amount_sats"]:
                problems.append(f"deposit {dep['txid']}:{dep['vout']} is not unspent")
        return Row(lid, view["state"], collateral_in, None, None, None, None, problems)

    tx = Transaction.parse(rpc.get_raw_transaction(txid))
    spent = {(i.txid.hex(), i.vout) for i in tx.vin}
    if spent != {(d["txid"], d["vout"]) for d in deposits}:
        problems.append("the transaction does not spend exactly the loan's deposits")
    paid: dict[str, int] = {}
    for vout in range(len(tx.vout)):
        out = rpc.get_tx_out(txid, vout, include_mempool=False)  # confirmed and unspent
        if out is None:
            problems.append(f"{txid}:{vout} is not a confirmed unspent output")
            continue
        address = out["scriptPubKey"].get("address")
        paid[address] = paid.get(address, 0) + out["value_sat"]
    terms = view["terms"]
    bank_got = paid.pop(terms["bank_liquidation_address"], 0)
    miner_got = paid.pop(terms["miner_return_address"], 0)
    if paid:
        problems.append(f"outputs to unexpected addresses: {sorted(paid)}")
    fee = collateral_in - bank_got - miner_got
    if bank_got != expect["bank"]:
        problems.append(f"bank got {bank_got} != {expect['bank']}")
    if miner_got != expect["miner"]:
        problems.append(f"miner got {miner_got} != {expect['miner']}")
    if fee != expect["fee"]:
        problems.append(f"fee {fee} != {expect['fee']}")
    if bank_got + miner_got + fee != collateral_in:
        problems.append("bank + miner + fee != inputs")
    return Row(lid, view["state"], collateral_in, bank_got, miner_got, fee, txid, problems)


def main() -> int:
    # The demo says what each warning means itself; the service's JSON log lines would
    # only repeat it in another format.
    configure_logging("ERROR")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="custody-demo-"))
    ok = False
    say("Starting btcd on regtest (loopback, temp datadir) and maturing the faucet's coinbase")
    node = RegtestNode(name="demo")
    node.start()
    server: uvicorn.Server | None = None
    core: Any = None
    root: Root | None = None
    feed = PriceFeed(str(START_PRICE)).start()
    try:
        node.mine(110)
        detail(f"node {node.rpc_url}, height {node.rpc.get_block_count()}")

        say("The bank's signer: a SoftHSM2 token, its own registry, node and price feed")
        from hsm.factory import build_core
        from hsm.settings import SignerSettings
        from regtest.softhsm import create_token

        token = create_token(workdir / "softhsm", "demo-bank")
        signer_settings = SignerSettings(
            network="regtest",
            module=token.module_path,
            token_label=token.label,
            pin=token.pin,
            state_db=workdir / "hsm-state.db",
            node_rpc_url=node.rpc_url,
            node_rpc_user=node.rpc_user,
            node_rpc_password=node.rpc_password,
            price_sources=[feed.source_config()],
            price_max_age_seconds=600,
            max_fee_sats=100_000,
        )
        detail(f"token '{token.label}' via {token.module_path}; price feed {feed.url}")

        say("Enrolment ceremony on the signer's machine: two admins, then two bank employees")
        admins = [Staff("ada.admin", "admin"), Staff("alan.admin", "admin")]
        registry = Registry(signer_settings.state_db)
        People(registry).bootstrap(
            [(a.name, "ed25519", bytes.fromhex(a.public_hex)) for a in admins], datetime.now(UTC)
        )
        registry.close()
        detail("`hsm enroll-bootstrap`: " + ", ".join(a.name for a in admins))
        core = build_core(signer_settings)
        signer = BankSigner(InProcessTransport(core))
        olga, anton = (
            Staff("olga.operator", "bank_operator"),
            Staff("anton.approver", "bank_approver"),
        )
        for person in (olga, anton):
            statement = {
                "kind": "enroll",
                "name": person.name,
                "role": person.role,
                "algorithm": "ed25519",
                "public_key": person.public_hex,
                "expires_at": iso(datetime.now(UTC) + timedelta(hours=1)),
            }
            signer.enroll(statement, [a.endorse(statement) for a in admins])
            detail(f"enrolled {person.name} as {person.role}, signed by both admins")
        staff = [olga, anton]

        say("Key ceremony: the bank seed is made in the HSM and split into SLIP-39 shares")
        from hsm.backup import make_share_set

        assert core.seed is not None
        fingerprint = core.seed.create()
        officers = ["irina", "pavel", "sofia", "kirill", "marta"]
        shares = make_share_set(core.seed, core.registry, officers, 3, workdir / "shares")
        sealed = core.seed.key_evidence()
        detail(
            f"`hsm seed init`: seed {fingerprint} from the token's random generator, sealed "
            f"under AES key '{sealed.label}' (never extractable={sealed.never_extractable})"
        )
        detail(f"3 of {len(shares)} shares restore it, one file per officer in {shares[0].parent}")

        say("Starting the service on SQLite behind its HTTP API (127.0.0.1 only)")
        board = Market(feed)
        board.set(START_PRICE)
        settings = Settings(
            network="regtest",
            database_url=f"sqlite:///{workdir / 'custody.db'}",
            node_rpc_url=node.rpc_url,
            node_rpc_user=node.rpc_user,
            node_rpc_password=node.rpc_password,
            watch_start_height=node.rpc.get_block_count() + 1,
        )
        # The service's parts come from its composition root, as in `custody serve`; only
        # the bank's signer (in-process, over SoftHSM) and the price board are the demo's.
        root = Root.assemble(settings, signer=signer, prices=board.median, price_feeds=board.median)
        engine = root.engine
        base_url, server = serve(root)
        api = Api(base_url)
        with transaction(engine) as session:
            _, api.keys["admin"] = create_principal(
                session, name="demo-admin", role=Role.admin, party_id=None, actor="demo"
            )
        detail(f"API {base_url}/v1/docs")

        say("Admin registers the parties and gives each person an API key")
        parties = {
            kind: api("admin", "POST", "/v1/parties", 201, json={"name": name, "kind": kind})
            for kind, name in (("bank", "Bank"), ("miner", "Miner LLC"), ("arbiter", "Arbiter"))
        }
        for who, role, party in (
            ("operator", "bank_operator", "bank"),
            ("approver", "bank_approver", "bank"),
            ("miner", "miner", "miner"),
            ("arbiter", "arbiter", "arbiter"),
            ("auditor", "auditor", None),
            ("compliance", "compliance_officer", "bank"),
        ):
            body = {"name": who, "role": role, "party_id": parties[party]["id"] if party else None}
            api.keys[who] = api("admin", "POST", "/v1/principals", 201, json=body)["api_key"]
        detail("bank operator, bank approver (the second pair of eyes), miner, arbiter, auditor")
        detail("(API keys let them in; only the signer-enrolled approval keys move money)")
        devices = {who: Device(who) for who in ("miner", "arbiter")}
        detail(
            "devices: "
            + ", ".join(f"{d.who} {d.signer.fingerprint} (software HD)" for d in devices.values())
            + "; bank: the HSM"
        )

        say("One deployment, one bank; and one person cannot move the price")
        refused = api(
            "admin", "POST", "/v1/parties", 409, json={"name": "Other Bank", "kind": "bank"}
        )
        detail(f"a second bank party: {refused['error']} ({refused['message']})")
        refused = api("operator", "POST", "/v1/prices", 422, json={"price_rub_per_btc": "1"})
        detail(f"the operator proposes 1 RUB/BTC: {refused['error']}")
        detail(f"  ({refused['message']})")
        near = START_PRICE - 50_000
        proposal = api("operator", "POST", "/v1/prices", 201, json={"price_rub_per_btc": str(near)})
        pid = proposal["id"]
        detail(f"the operator proposes {near:,}: price {pid} {proposal['state']}, nothing moves")
        own = api("operator", "POST", f"/v1/prices/{pid}/confirm", 409)
        detail(f"the operator confirms it too: {own['error']} (4-eyes)")
        withdrawn = api("approver", "POST", f"/v1/prices/{pid}/reject")
        detail(
            f"the approver turns it down (the feed is healthy): price {pid} {withdrawn['state']}; "
            f"the risk engine reads confirmed prices only"
        )
        [shown] = api("auditor", "GET", "/v1/prices")
        detail(
            f"the auditor's price history: proposed by {shown['proposed_by']}, "
            f"rejected by {shown['rejected_by']}; the miner may not look "
            f"({api('miner', 'GET', '/v1/prices', 403)['error']})"
        )

        say("Compliance: who the miner is (221-FZ), checked by a second person")
        record_path = f"/v1/parties/{parties['miner']['id']}/miner-record"
        typo = api("operator", "PUT", record_path, 422, json={**CLEAN_RECORD, "inn": "7707083894"})
        detail(f"an INN with a wrong check digit: {typo['error']} on {typo['field']}")
        entered = api("operator", "PUT", record_path, 200, json=CLEAN_RECORD)
        detail(
            f"the operator enters Miner LLC: INN {entered['inn']}, OGRN {entered['ogrn']}, "
            f"register entry {entered['register_number']} ({entered['register_status']}), "
            f"region {entered['region']}: {entered['state']}, flags {entered['flags'] or 'none'}"
        )
        approved = api(
            "compliance",
            "POST",
            f"{record_path}/reviews",
            201,
            json={
                "decision": "approve",
                "reason": "register extract checked",
                "digest": entered["digest"],
            },
        )
        detail(
            f"the compliance officer approves it: {approved['state']} (its loans may leave draft)"
        )

        say("The bank operator creates three loans of 0.5 BTC collateral each")
        maturity = (datetime.now(UTC) + timedelta(days=180)).strftime("%Y-%m-%dT%H:%M:%SZ")
        loan_ids: list[int] = []
        for story, principal, rate in LOANS:
            terms = {
                "principal_kopecks": principal,
                "interest_rate_bps": rate,
                "maturity_at": maturity,
                "required_collateral_sats": COLLATERAL_SATS,
                "required_confirmations": 1,
                "miner_return_address": random_p2wpkh_address(),
                "bank_liquidation_address": random_p2wpkh_address(),
            }
            loan = api(
                "operator",
                "POST",
                "/v1/loans",
                201,
                json={
                    "miner_party_id": parties["miner"]["id"],
                    "arbiter_party_id": parties["arbiter"]["id"],
                    "terms": terms,
                },
            )
            loan_ids.append(loan["id"])
            t = loan["terms"]
            detail(
                f"loan {loan['id']}: {rub(principal)} at {rate / 100:g}%, margin call "
                f"{t['margin_call_ltv_bps'] / 100:g}%, liquidation "
                f"{t['liquidation_ltv_bps'] / 100:g}%  ({story})"
            )
        l1, l2, l3 = loan_ids

        say("Keys: the miner and the arbiter register account keys; two bank employees sign")
        detail("the loan's registration; then the signer makes the bank's key")
        detail(f"(loans {l1} and {l3}: an HD account of the bank seed, the default; loan {l2}:")
        detail(" a fixed key that never leaves the token, by the bank's explicit choice)")
        for n, lid in enumerate(loan_ids):
            for who, device in devices.items():
                key = device.signer.account_key_text(account=n)
                api(who, "PUT", f"/v1/loans/{lid}/keys/{who}", json={"kind": "hd", "key": key})
            kind = "fixed" if lid == l2 else "hd"
            st = api("operator", "POST", f"/v1/loans/{lid}/keys/bank/hsm", 201, json={"kind": kind})
            done = sign_statement_via_api(api, "operator", st["id"], staff)
            if done["state"] != "done":
                raise SystemExit(f"the signer did not register loan {lid}: {done}")
            loan = api("operator", "GET", f"/v1/loans/{lid}")
            bank_key = next(k for k in loan["keys"] if k["role"] == "bank")
            made = (
                f"bank key [{bank_key['fingerprint']}{bank_key['origin_path'][1:]}]"
                f"{bank_key['xpub'][:12]}... from the sealed seed"
                if bank_key["kind"] == "hd"
                else f"bank key {bank_key['public_key'][:16]}... made in the HSM "
                f"(never extractable={bank_key['hsm_never_extractable']})"
            )
            detail(
                f"loan {lid}: statement {st['id']} signed by {', '.join(done['signed_by'])}; "
                f"{made}; {loan['state']} at {loan['collateral_address']}"
            )

        say("Each party checks the address on its own wallet: the exports say which can")
        policy = api("miner", "GET", f"/v1/loans/{l1}/export/wallet-policy")
        detail(f"loan {l1} (HD bank key), BIP-388 policy {policy['descriptor_template']}")
        detail(f"  works with: {', '.join(policy['works_with'][:4])}, ...")
        refused = api("miner", "GET", f"/v1/loans/{l2}/export/coldcard", 422)
        detail(f"loan {l2} (fixed bank key), Coldcard file: {refused['error']}")
        detail(f"  {refused['message']}")

        say("The watcher follows the node; the miner pays the three collateral addresses")
        watcher = root.watcher()
        watcher.acquire()
        for lid in loan_ids:
            address = api("miner", "GET", f"/v1/loans/{lid}")["collateral_address"]
            txid, vout = node.faucet.pay(address, COLLATERAL_SATS)
            detail(f"loan {lid}: paid {COLLATERAL_SATS} sats in {txid[:16]}...:{vout}")
        watcher.step()
        node.mine(1)
        watcher.step()
        detail(
            "one block later: "
            + ", ".join(
                f"loan {lid} {api('miner', 'GET', f'/v1/loans/{lid}')['state']}" for lid in loan_ids
            )
        )

        say("The risk engine starts, reading the BTC/RUB feed (the signer reads it on its own)")
        risk = root.risk_engine(notify=notify)
        show_pass(risk.run_once(), api, loan_ids, START_PRICE)

        say(f"Loan {l1} is repaid: the bank operator asks for the release")
        release = api(
            "operator", "POST", f"/v1/loans/{l1}/signing-requests", 201, json={"action": "release"}
        )
        [to_miner] = release["outputs"]
        detail(
            f"request {release['id']}: {to_miner['amount_sats']} sats to the miner's return "
            f"address, fee {release['fee_sats']}, seats {release['required_seats']}, "
            f"txid {release['unsigned_txid']}"
        )
        signed = devices["miner"].sign(api, release["id"])
        detail(f"the miner signed on its device: {signed['signed_seats']}, {signed['state']}")
        sid = release["signer_statement_id"]
        statement = api("approver", "GET", f"/v1/signer-statements/{sid}")["statement"]
        psbt = api("approver", "GET", f"/v1/signing-requests/{release['id']}/psbt")["psbt"]
        roles = {o["address"]: o["role"] for o in release["outputs"]}
        detail("what `custody approve` shows each of them, decoded on their own machine:")
        for line in describe(statement, decode_psbt(psbt, "regtest"), roles):
            detail(f"  | {line}")
        outcome = sign_statement_via_api(api, "approver", sid, staff)
        approved = api("approver", "GET", f"/v1/signing-requests/{release['id']}")
        detail(
            f"signed by {', '.join(outcome['signed_by'])}; the signer checked its own records, "
            f"node and their signatures and signed: {approved['signed_seats']}, "
            f"{approved['state']}"
        )
        if approved["state"] != "broadcast":
            raise SystemExit(f"release not broadcast: {approved}")
        node.mine(1)
        watcher.step()
        done = api("miner", "GET", f"/v1/signing-requests/{release['id']}")
        detail(
            f"mined: request {done['state']}, loan {l1} "
            f"{api('miner', 'GET', f'/v1/loans/{l1}')['state']}"
        )

        say(f"The price falls to {DROP_1:,} RUB/BTC")
        board.set(DROP_1)
        report = risk.run_once()
        show_pass(report, api, [l2, l3], DROP_1)
        if l2 not in report.margin_calls:
            raise SystemExit(f"loan {l2} should be in margin call: {report}")

        say(f"Loan {l2}'s miner tops up {TOP_UP_SATS} sats to a fresh collateral address")
        top_up = api("miner", "POST", f"/v1/loans/{l2}/addresses", 201)["address"]
        txid, vout = node.faucet.pay(top_up, TOP_UP_SATS)
        detail(f"paid {top_up} in {txid[:16]}...:{vout}")
        node.mine(1)
        watcher.step()
        report = risk.run_once()
        show_pass(report, api, [l2, l3], DROP_1)
        if report.cured != [l2]:
            raise SystemExit(f"loan {l2} should be cured: {report}")
        detail(f"loan {l3}'s miner does nothing; its cure window is still open")

        say("The only price feed goes stale: the engine pauses instead of guessing")
        board.set(DROP_2, age=timedelta(minutes=11))
        report = risk.run_once()
        detail(f"risk pass: paused={report.paused!r}, liquidations {report.liquidations}")
        if not report.paused or report.liquidations:
            raise SystemExit(f"a stale price must pause the engine: {report}")

        say(f"A fresh quote: the price has fallen further, to {DROP_2:,} RUB/BTC")
        board.set(DROP_2)
        report = risk.run_once()
        show_pass(report, api, [l2, l3], DROP_2)
        if len(report.liquidations) != 1:
            raise SystemExit(f"exactly loan {l3} should be liquidated: {report}")
        [rid] = report.liquidations
        liq = api("arbiter", "GET", f"/v1/signing-requests/{rid}")
        evidence = liq["evidence"]["risk"]
        bank_out, miner_out = liq["outputs"]
        debt_sats = sats_for_kopecks(LOANS[2][1], DROP_2)
        detail(
            f"request {rid} for loan {liq['loan_id']}: {liq['action']}, signed by "
            f"{liq['signed_seats']} with no human approval: the engine saw LTV "
            f"{evidence['ltv_bps']} bps; the signer's own figures: "
            f"{'; '.join(evidence['signer_reasons'])} ({liq['evidence']['price_source']})"
        )
        detail(
            f"bank {bank_out['amount_sats']} sats (= {rub(LOANS[2][1])} at {DROP_2:,}, "
            f"rounded up: {debt_sats}), miner {miner_out['amount_sats']}, fee {liq['fee_sats']}"
        )
        if liq["loan_id"] != l3 or liq["signed_seats"] != ["bank"]:
            raise SystemExit(f"unexpected liquidation request: {liq}")

        say("The arbiter reviews the evidence and co-signs on its device")
        signed = devices["arbiter"].sign(api, rid)
        detail(f"signed seats {signed['signed_seats']}: {signed['state']}")
        if signed["state"] != "broadcast":
            raise SystemExit(f"liquidation not broadcast: {signed}")
        node.mine(1)
        watcher.step()
        detail(
            f"mined: request {api('arbiter', 'GET', f'/v1/signing-requests/{rid}')['state']}, "
            f"loan {l3} {api('miner', 'GET', f'/v1/loans/{l3}')['state']}"
        )
        show_pass(risk.run_once(), api, [l2], DROP_2)
        watcher.release()

        say("Final state, every amount checked against the node")
        expected = {
            l1: {
                "state": "released",
                "collateral_in": COLLATERAL_SATS,
                "txid": release["unsigned_txid"],
                "bank": 0,
                "miner": COLLATERAL_SATS - release["fee_sats"],
                "fee": release["fee_sats"],
            },
            l2: {"state": "active", "collateral_in": COLLATERAL_SATS + TOP_UP_SATS},
            l3: {
                "state": "liquidated",
                "collateral_in": COLLATERAL_SATS,
                "txid": liq["unsigned_txid"],
                "bank": debt_sats,
                "miner": COLLATERAL_SATS - debt_sats - liq["fee_sats"],
                "fee": liq["fee_sats"],
            },
        }
        rows = [check_loan(api, node.rpc, lid, expected[lid]) for lid in loan_ids]
        print(
            f"\n     {'loan':<5} {'state':<11} {'collateral in':>13} {'bank got':>10} "
            f"{'miner got':>10} {'fee':>6}  {'txid':<64}  node"
        )
        for row in rows:
            print(
                f"     {row.loan:<5} {row.state:<11} {row.collateral_in:>13} "
                f"{_cell(row.bank_got):>10} {_cell(row.miner_got):>10} {_cell(row.fee):>6}  "
                f"{row.txid or '-':<64}  {'ok' if not row.problems else 'MISMATCH'}"
            )
        problems = [f"loan {r.loan}: {p}" for r in rows for p in r.problems]
        for problem in problems:
            print(f"     !! {problem}", file=sys.stderr)
        if problems:
            raise SystemExit("the service's view does not match the node")
        detail(
            f"loan {l3}: the bank got {rub(LOANS[2][1])} worth at {DROP_2:,} RUB/BTC "
            f"exactly (rounded up to the sat); bank + miner + fee == inputs"
        )

        with transaction(engine) as session:
            chain_report = verify_chain(session)
        detail(f"audit log: {chain_report.events} events, hash chain ok={chain_report.ok}")
        if not chain_report.ok:
            raise SystemExit("audit chain broken")
        ok = True
        print(f"\nDemo finished in {time.monotonic() - started:.0f} s.")
        return 0
    finally:
        if server is not None:
            server.should_exit = True
        if root is not None:
            root.close()
        if core is not None:
            core.close()
        feed.stop()
        node.stop(keep_datadir=not ok)
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept for inspection: {workdir} and {node.basedir}", file=sys.stderr)


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
