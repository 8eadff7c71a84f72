"""`make demo`: a regtest node, the service on SQLite behind its real HTTP API, a
SoftHSM2 bank key, and collateral addresses end to end.

Two loans: one whose three keys are hardware-wallet style xpubs, one whose bank
key is generated inside the HSM. Both get a collateral address, the faucet pays
them, the watcher sees the deposits in the mempool and then confirmed, the loans
become active, and the final table is checked against the node itself.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from custody.api.app import create_app
from custody.audit.service import verify_chain
from custody.auth.service import create_principal
from custody.bitcoin.testkeys import make_test_key_text
from custody.chain.watcher import Watcher, WatcherConfig
from custody.config import Settings
from custody.db.migrate import upgrade
from custody.db.models import Role
from custody.db.session import make_engine, transaction
from custody.logging import configure_logging
from regtest.node import RegtestNode, free_port, wait_until

COLLATERAL_SATS = 50_000_000
STEP = [0]


def say(text: str) -> None:
    STEP[0] += 1
    print(f"\n[{STEP[0]:>2}] {text}", flush=True)


def detail(text: str) -> None:
    print(f"     {text}", flush=True)


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


def serve(settings: Settings, engine: Any, hsm: Any) -> tuple[str, uvicorn.Server]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, engine, hsm=hsm), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    threading.Thread(target=server.run, daemon=True).start()
    wait_until(lambda: server.started, timeout=30, message="the API to start")
    return f"http://127.0.0.1:{port}", server


def main() -> int:
    configure_logging("WARNING")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="custody-demo-"))
    ok = False
    say("Starting btcd on regtest (loopback, temp datadir) and maturing the faucet's coinbase")
    node = RegtestNode(name="demo")
    node.start()
    try:
        node.mine(110)
        detail(f"node {node.rpc_url}, height {node.rpc.get_block_count()}")

        say("Creating a SoftHSM2 token for the bank's keys")
        from hsm.pkcs11_backend import Pkcs11Signer
        from hsm.softhsm import create_token

        token = create_token(workdir / "softhsm", "demo-bank")
        hsm = Pkcs11Signer(token.module_path, token.label, token.pin)
        detail(f"token '{token.label}' via {token.module_path}")

        say("Starting the service on SQLite behind its HTTP API (127.0.0.1 only)")
        db_url = f"sqlite:///{workdir / 'custody.db'}"
        settings = Settings(network="regtest", database_url=db_url)
        engine = make_engine(db_url)
        upgrade(engine)
        base_url, server = serve(settings, engine, hsm)
        api = Api(base_url)
        with transaction(engine) as session:
            _, api.keys["admin"] = create_principal(
                session, name="demo-admin", role=Role.admin, party_id=None, actor="demo"
            )
        detail(f"API {base_url}/v1/docs")

        say("Admin registers the parties and gives each person an API key")
        bank = api("admin", "POST", "/v1/parties", 201, json={"name": "Bank", "kind": "bank"})
        miner = api(
            "admin", "POST", "/v1/parties", 201, json={"name": "Miner LLC", "kind": "miner"}
        )
        arbiter = api(
            "admin", "POST", "/v1/parties", 201, json={"name": "Arbiter", "kind": "arbiter"}
        )
        for who, role, party in (
            ("operator", "bank_operator", bank),
            ("miner", "miner", miner),
            ("arbiter", "arbiter", arbiter),
            ("auditor", "auditor", None),
        ):
            body = {"name": who, "role": role, "party_id": party["id"] if party else None}
            api.keys[who] = api("admin", "POST", "/v1/principals", 201, json=body)["api_key"]
        detail("bank operator, miner, arbiter, auditor")

        say("The bank operator creates two loans (1,500,000.00 RUB each)")
        maturity = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 180 * 86400))
        loans = []
        for _ in range(2):
            terms = {
                "principal_kopecks": 1_500_000_00,
                "interest_rate_bps": 1_800,
                "maturity_at": maturity,
                "required_collateral_sats": COLLATERAL_SATS,
                "required_confirmations": 1,
                "miner_return_address": _fresh_address(),
                "bank_liquidation_address": _fresh_address(),
            }
            loans.append(
                api(
                    "operator",
                    "POST",
                    "/v1/loans",
                    201,
                    json={
                        "miner_party_id": miner["id"],
                        "arbiter_party_id": arbiter["id"],
                        "terms": terms,
                    },
                )
            )
        detail(", ".join(f"loan {loan['id']}: {loan['state']}" for loan in loans))

        say("Each party registers its key (software keys stand in for hardware wallets)")
        for loan in loans:
            lid = loan["id"]
            for who, seat in (("miner", "miner"), ("arbiter", "arbiter")):
                key = make_test_key_text(secrets.token_bytes(32), "regtest")
                api(who, "PUT", f"/v1/loans/{lid}/keys/{seat}", json={"kind": "hd", "key": key})
        api(
            "operator",
            "PUT",
            f"/v1/loans/{loans[0]['id']}/keys/bank",
            json={"kind": "hd", "key": make_test_key_text(secrets.token_bytes(32), "regtest")},
        )
        loans[1] = api("operator", "POST", f"/v1/loans/{loans[1]['id']}/keys/bank/hsm", 201)
        loans[0] = api("miner", "GET", f"/v1/loans/{loans[0]['id']}")
        bank_key = loans[1]["keys"][1]
        detail(
            f"loan {loans[1]['id']} bank key made in the HSM: {bank_key['public_key']} "
            f"(local={bank_key['hsm_local']}, never_extractable="
            f"{bank_key['hsm_never_extractable']})"
        )
        for loan in loans:
            detail(
                f"loan {loan['id']}: {loan['state']}, collateral address "
                f"{loan['collateral_address']}"
            )
            detail(f"  {loan['descriptor']}")

        say("The parties export the wallet to check the address on their own devices")
        coldcard = api("miner", "GET", f"/v1/loans/{loans[0]['id']}/export/coldcard")
        policy = next(line for line in coldcard.splitlines() if line.startswith("Policy"))
        detail(f"loan {loans[0]['id']} Coldcard file: {policy}, ...")
        refused = api.http.get(
            f"/v1/loans/{loans[1]['id']}/export/coldcard",
            headers={"Authorization": f"Bearer {api.keys['miner']}"},
        )
        detail(
            f"loan {loans[1]['id']} Coldcard: {refused.status_code} "
            f"{refused.json()['message'][:110]}..."
        )
        bsms = api("arbiter", "GET", f"/v1/loans/{loans[1]['id']}/export/bsms")
        detail(f"loan {loans[1]['id']} BSMS first address: {bsms.splitlines()[-1]}")

        say("The watcher follows the node; the miner pays both collateral addresses")
        watcher = Watcher(
            engine, node.rpc, config=WatcherConfig(start_height=node.rpc.get_block_count() + 1)
        )
        watcher.acquire()
        payments = {
            loan["id"]: node.faucet.pay(loan["collateral_address"], COLLATERAL_SATS)
            for loan in loans
        }
        watcher.step()
        for loan in loans:
            dep = api("miner", "GET", f"/v1/loans/{loan['id']}/deposits")[0]
            detail(
                f"loan {loan['id']}: deposit {dep['txid'][:16]}...:{dep['vout']} "
                f"{dep['state']} ({dep['confirmations']} conf)"
            )

        say("A block is mined; the deposits confirm and the loans become active")
        node.mine(1)
        watcher.step()
        for loan in loans:
            view = api("miner", "GET", f"/v1/loans/{loan['id']}")
            detail(
                f"loan {loan['id']}: {view['state']}, confirmed "
                f"{view['collateral']['confirmed_sats']} sats"
            )

        say("A one-block reorg: the deposits go back to the mempool, then confirm again")
        node.invalidate(1)
        watcher.step()
        detail(
            "after invalidateblock: "
            + ", ".join(
                f"loan {loan['id']} {api('miner', 'GET', '/v1/loans/' + str(loan['id']))['state']}"
                for loan in loans
            )
        )
        node.mine(2)
        watcher.step()
        watcher.release()
        health = api("auditor", "GET", "/v1/health")["watcher"]
        detail(f"re-mined: watcher at height {health['height']}, lag {health['lag_blocks']}")

        say("Final state, checked against the node")
        print(
            f"\n     {'loan':<5} {'state':<17} {'bank key':<9} {'confirmed sats':>15}  "
            f"{'node sees at address':>20}  deposit"
        )
        for loan in loans:
            view = api("auditor", "GET", f"/v1/loans/{loan['id']}")
            txid, vout = payments[loan["id"]]
            out = node.rpc.get_tx_out(txid, vout, include_mempool=False)
            on_node = (
                out["value_sat"]
                if out and out["scriptPubKey"].get("address") == view["collateral_address"]
                else 0
            )
            print(
                f"     {view['id']:<5} {view['state']:<17} {view['keys'][1]['kind']:<9} "
                f"{view['collateral']['confirmed_sats']:>15}  {on_node:>20}  {txid}:{vout}"
            )
            if view["state"] != "active" or on_node != view["collateral"]["confirmed_sats"]:
                raise SystemExit(f"loan {loan['id']} does not match the node")
        with transaction(engine) as session:
            report = verify_chain(session)
        detail(f"audit log: {report.events} events, hash chain ok={report.ok}")
        if not report.ok:
            raise SystemExit("audit chain broken")
        server.should_exit = True
        hsm.close()
        ok = True
        print(f"\nDemo finished in {time.monotonic() - started:.0f} s.")
        return 0
    finally:
        node.stop(keep_datadir=not ok)
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept for inspection: {workdir} and {node.basedir}", file=sys.stderr)


def _fresh_address() -> str:
    from regtest.faucet import random_p2wpkh_address

    return random_p2wpkh_address()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
