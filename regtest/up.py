"""`make up`: the console to try by hand, on regtest, until Ctrl-C.

btcd on regtest (a temporary datadir), a local BTC/RUB feed, and the service's own
processes on one SQLite file, as `custody` runs them: `serve` (the API and the console),
`watch`, `risk` and `notify`. A small data set is made through the API: the parties, one
person per role, a confirmed price, and three loans (one active with 0.5 BTC confirmed,
one awaiting its deposit, one still a draft). Then it prints the console's URL and one
invitation link per role: open each in its own browser profile, register a passkey, and
look around. A block is mined every `BLOCK_SECONDS`, so confirmations move. The keys of
this data set are software HD keys held by this process (regtest only); it has no bank
signer, so HSM keys and signer statements answer 503 here (`make demo` has one).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from embit import bip32
from embit.networks import NETWORKS

from regtest.faucet import random_p2wpkh_address
from regtest.kyc import CLEAN_RECORD
from regtest.node import RegtestNode, free_port, wait_until
from regtest.price_feed import PriceFeed
from regtest.software_signer import SoftwareHDSigner

PRICE = "6000000"  # RUB per BTC
COLLATERAL_SATS = 50_000_000
BLOCK_SECONDS = 10.0
PEOPLE = (
    ("olga.operator", "bank_operator", "bank"),
    ("anton.approver", "bank_approver", "bank"),
    ("mikhail.miner", "miner", "miner"),
    ("arina.arbiter", "arbiter", "arbiter"),
    ("audrey.auditor", "auditor", None),
    ("clara.compliance", "compliance_officer", "bank"),
)


def _env(
    workdir: Path, node: RegtestNode, feed: PriceFeed, port: int, start: int
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUSTODY_", "HSM_"))}
    env.update(
        {
            "DATABASE_URL": f"sqlite:///{workdir / 'custody.db'}",
            "CUSTODY_NETWORK": "regtest",
            "CUSTODY_API_PORT": str(port),
            "CUSTODY_CONSOLE_ORIGIN": f"http://localhost:{port}",
            "CUSTODY_NODE_RPC_URL": node.rpc_url,
            "CUSTODY_NODE_RPC_USER": node.rpc_user,
            "CUSTODY_NODE_RPC_PASSWORD": node.rpc_password,
            "CUSTODY_WATCH_START_HEIGHT": str(start),
            "CUSTODY_PRICE_SOURCES": json.dumps([feed.source_config()]),
            "CUSTODY_RISK_POLL_SECONDS": "5",
        }
    )
    return env


def _custody(env: dict[str, str], workdir: Path, *args: str) -> subprocess.Popen[bytes]:
    log = (workdir / f"{args[0]}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "custody.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT
    )


class Api:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)
        self.keys: dict[str, str] = {}

    def __call__(self, who: str, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(
            method, path, headers={"Authorization": f"Bearer {self.keys[who]}"}, **kw
        )
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path} as {who}: {r.status_code} {r.text}")
        return r.json()


def _device() -> SoftwareHDSigner:
    root = bip32.HDKey.from_seed(os.urandom(32), version=NETWORKS["regtest"]["xprv"])
    return SoftwareHDSigner(root, "regtest")


def populate(api: Api, node: RegtestNode) -> None:
    """Parties, people, a confirmed price, three loans (active, awaiting, draft)."""
    parties = {
        kind: api("admin", "POST", "/v1/parties", json={"name": name, "kind": kind})["id"]
        for kind, name in (("bank", "Bank"), ("miner", "Miner LLC"), ("arbiter", "Arbiter"))
    }
    for name, role, party in PEOPLE:
        body = {"name": name, "role": role, "party_id": parties[party] if party else None}
        api.keys[role] = api("admin", "POST", "/v1/principals", json=body)["api_key"]
    # The miner's registry record, approved by compliance: its loans may leave draft.
    miner_record = f"/v1/parties/{parties['miner']}/miner-record"
    entered = api("bank_operator", "PUT", miner_record, json=CLEAN_RECORD)
    review = {"decision": "approve", "reason": "registry checked", "digest": entered["digest"]}
    api("compliance_officer", "POST", f"{miner_record}/reviews", json=review)
    proposal = api("bank_operator", "POST", "/v1/prices", json={"price_rub_per_btc": PRICE})
    api("bank_approver", "POST", f"/v1/prices/{proposal['id']}/confirm")
    devices = {seat: _device() for seat in ("miner", "bank", "arbiter")}
    who = {"miner": "miner", "bank": "bank_operator", "arbiter": "arbiter"}
    for n, (principal_rub, keyed, funded) in enumerate(
        ((1_500_000, True, True), (2_000_000, True, False), (1_000_000, False, False))
    ):
        terms = {
            "principal_kopecks": principal_rub * 100,
            "interest_rate_bps": 1_800,
            "maturity_at": (datetime.now(UTC) + timedelta(days=180)).isoformat(),
            "required_collateral_sats": COLLATERAL_SATS,
            "miner_return_address": random_p2wpkh_address(),
            "bank_liquidation_address": random_p2wpkh_address(),
        }
        body = {"miner_party_id": parties["miner"], "arbiter_party_id": parties["arbiter"]}
        loan = api("bank_operator", "POST", "/v1/loans", json={**body, "terms": terms})
        if not keyed:
            continue
        for seat, device in devices.items():
            key = device.account_key_text(account=n)
            api(
                who[seat],
                "PUT",
                f"/v1/loans/{loan['id']}/keys/{seat}",
                json={"kind": "hd", "key": key},
            )
        if funded:
            address = api("miner", "GET", f"/v1/loans/{loan['id']}")["collateral_address"]
            node.faucet.pay(address, COLLATERAL_SATS)
            node.mine(1)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # a `kill` stops it as cleanly as Ctrl-C
    workdir = Path(tempfile.mkdtemp(prefix="custody-up-"))
    print(f"work directory: {workdir} (logs: *.log)", flush=True)
    node = RegtestNode(name="up")
    node.start()
    feed = PriceFeed(PRICE).start()
    procs: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    try:
        node.mine(110)
        port = free_port()
        env = _env(workdir, node, feed, port, node.rpc.get_block_count() + 1)
        made = subprocess.run(
            [sys.executable, "-m", "custody.cli", "create-admin", "ada.admin"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        api = Api(f"http://127.0.0.1:{port}")
        api.keys["admin"] = made.stdout.strip().splitlines()[-1]
        procs = [_custody(env, workdir, cmd) for cmd in ("serve", "watch", "risk", "notify")]
        wait_until(_answers(api), timeout=60, message="custody serve to answer")
        populate(api, node)

        def mine() -> None:
            while not stop.wait(BLOCK_SECONDS):
                node.mine(1)

        threading.Thread(target=mine, name="miner", daemon=True).start()
        url = env["CUSTODY_CONSOLE_ORIGIN"]
        print(f"\nThe console: {url}/console/  (sign in after registering a passkey)\n")
        print("Invitation links, one per role (each works once; open each in its own profile):")
        me = {p["name"]: p for p in [api(role, "GET", "/v1/me") for role in api.keys]}
        for name, principal in me.items():
            link = api("admin", "POST", f"/v1/principals/{principal['id']}/invitations")["url"]
            print(f"  {principal['role']:<14} {name:<16} {link}")
        print(f"\nAPI: {url}/v1/docs · a block every {BLOCK_SECONDS:.0f} s · Ctrl-C stops it all")
        while all(p.poll() is None for p in procs):
            stop.wait(1.0)
        failed = [p.args for p in procs if p.poll() is not None]
        print(f"a process stopped: {failed}; see the logs in {workdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
        return 0
    finally:
        stop.set()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        feed.stop()
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _answers(api: Api) -> Any:
    def ready() -> bool:
        try:
            api.http.get("/v1/health")  # any answer: the server is up
            return True
        except httpx.TransportError:
            return False

    return ready


if __name__ == "__main__":
    raise SystemExit(main())
