"""The bank seed never leaves the signer in clear (issue 13).

An HD loan's life through the service and a real `hsm serve` (its own SoftHSM2 token):
the bank key made on a 4-eyes statement, a deposit, a 4-eyes release broadcast and mined.
Then every table of the service's database, every response the service gave, the service's
and the signer's logs, and the signer's registry file are searched for the seed, the master
xprv, the loan's account xprv and the child private key that signed, raw, hex and base58,
and for the backup shares' words."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from embit.bip32 import HDKey as EmbitHDKey
from embit.networks import NETWORKS
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel
from support.lending import bank_sign, funded_loan, request, sign, the_psbt, upload
from support.signer_world import SignerWorld, serve_world
from support.world import World, build_world

from custody.watcher.service import Watcher
from hsm.backup import read_share_file, recover_seed
from regtest.node import RegtestNode
from regtest.price_feed import price_feed

pytestmark = [pytest.mark.node, pytest.mark.hsm]


@pytest.fixture
def signer(tmp_path: Path, regtest_node: RegtestNode) -> Iterator[SignerWorld]:
    with price_feed("8000000") as feed, serve_world(tmp_path / "hsm", regtest_node, feed) as sw:
        yield sw


def _secrets(sw: SignerWorld, bank: dict[str, Any]) -> dict[str, bytes]:
    seed = bytes(recover_seed([read_share_file(p) for p in sw.shares[:3]]))
    root = EmbitHDKey.from_seed(seed, version=NETWORKS["regtest"]["xprv"])
    account = root.derive(bank["origin_path"])
    assert account.to_public().to_base58(NETWORKS["regtest"]["xpub"]) == bank["xpub"]
    child = account.derive([0, 0]).key.secret
    found = {
        "seed": seed,
        "seed hex": seed.hex().encode(),
        "master xprv": root.to_base58().encode(),
        "account xprv": account.to_base58().encode(),
        "child key": child,
        "child key hex": child.hex().encode(),
    }
    for i, share in enumerate(sw.shares):
        found[f"share {i}"] = read_share_file(share).encode()
    return found


def _database_text(engine: Engine) -> bytes:
    out: list[bytes] = []
    with engine.connect() as conn:
        for table in SQLModel.metadata.sorted_tables:
            for row in conn.execute(select(table)).all():
                for value in row:
                    out.append(value if isinstance(value, bytes) else str(value).encode())
    return b"\n".join(out)


def test_the_seed_is_nowhere_but_sealed(
    engine: Engine,
    regtest_node: RegtestNode,
    watcher: Watcher,
    signer: SignerWorld,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    world: World = build_world(
        engine, chain=regtest_node.rpc, signer=signer.client, staff=signer.staff
    )
    responses: list[bytes] = []

    def keep(response: httpx.Response) -> None:
        responses.append(response.read())

    world.client.event_hooks["response"].append(keep)
    f = funded_loan(world, regtest_node, watcher)
    bank = f.loan["keys"][1]
    assert bank["kind"] == "hd" and bank["hsm_key_label"]
    for fmt in ("descriptor", "bsms", "coldcard", "caravan"):
        assert world.call("miner", "GET", f"/v1/loans/{f.loan['id']}/export/{fmt}").is_success
    req = request(world, "bank_operator", f.loan["id"], action="release")
    psbt = the_psbt(world, "miner", req["id"])
    assert upload(world, "miner", req["id"], sign(psbt, f.roots["miner"])).status_code == 200
    assert bank_sign(world, req["id"]).json()["state"] == "done"
    regtest_node.mine(1)
    watcher.step()
    assert world.call("miner", "GET", f"/v1/loans/{f.loan['id']}").json()["state"] == "released"
    assert len(responses) > 10

    secrets = _secrets(signer, bank)
    registry = signer.registry()
    places = {
        "the service's database": _database_text(engine),
        "the service's responses": b"\n".join(responses),
        "the service's log": (caplog.text + "".join(capfd.readouterr())).encode(),
        "hsm serve's log": (Path(registry.path).parent / "serve.log").read_bytes(),
        "the signer's registry": b"".join(
            p.read_bytes() for p in registry.path.parent.glob(registry.path.name + "*")
        ),
    }
    registry.close()
    leaks = [
        f"{what} in {where}"
        for where, text in places.items()
        for what, secret in secrets.items()
        if secret in text
    ]
    assert leaks == []
    # Controls: the searches read the right bytes (the public halves are there).
    assert bank["xpub"].encode() in places["the service's database"]
    assert bank["xpub"].encode() in places["the service's responses"]
    sealed = signer.registry().seed()
    assert (
        sealed is not None and sealed.ciphertext.hex().encode() in places["the signer's registry"]
    )
