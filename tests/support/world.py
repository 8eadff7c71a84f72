"""A populated service for API tests: parties, one principal per role, helpers to
make loans and keys. Built through the domain services (fast) and driven through
the HTTP API (what is under test)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from embit import bip32
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from support.declared import CheckedClient
from support.kyc import approve_miner

from custody.auth.service import create_principal
from custody.config import Settings
from custody.db.models import AuditEvent, Party, PartyKind, Role
from custody.db.session import transaction
from custody.root import Root
from hsm.client import BankSigner

# Regtest addresses for the loan terms (any valid bcrt1 address will do).
MINER_RETURN = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
BANK_LIQUIDATION = "bcrt1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3qzf4jry"

WHO = (
    "admin",
    "bank_operator",
    "bank_approver",
    "auditor",
    "compliance_officer",
    "miner",
    "other_miner",
    "arbiter",
    "other_arbiter",
)


def hd_key(network_coin: int = 1, account: int = 0, seed: bytes | None = None) -> str:
    """A BIP-48 P2WSH account key with origin, as a hardware wallet exports it."""
    root = bip32.HDKey.from_seed(seed or os.urandom(32))
    path = f"m/48h/{network_coin}h/{account}h/2h"
    account_key = root.derive(path).to_public()
    xpub = account_key.to_base58(version=bytes.fromhex("043587cf"))  # tpub
    return f"[{root.my_fingerprint.hex()}/48h/{network_coin}h/{account}h/2h]{xpub}"


@dataclass
class World:
    client: CheckedClient  # fails the test on any error answer its route does not declare
    api_keys: dict[str, str]
    party_ids: dict[str, int]
    settings: Settings
    engine: Engine
    staff: dict[str, Any] = field(default_factory=dict)  # people enrolled in the bank signer
    _seq: list[int] = field(default_factory=lambda: [0])

    def h(self, who: str | None) -> dict[str, str]:
        return {} if who is None else {"Authorization": f"Bearer {self.api_keys[who]}"}

    def call(self, who: str | None, method: str, path: str, **kw: Any) -> Any:
        return self.client.request(method, path, headers=self.h(who), **kw)

    def loan_body(self, **terms: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "principal_kopecks": 150_000_000_00,
            "interest_rate_bps": 1_800,
            "maturity_at": (datetime.now(UTC) + timedelta(days=180)).isoformat(),
            "required_collateral_sats": 50_000_000,
            "miner_return_address": MINER_RETURN,
            "bank_liquidation_address": BANK_LIQUIDATION,
        }
        base.update(terms)
        return {
            "miner_party_id": self.party_ids["miner"],
            "arbiter_party_id": self.party_ids["arbiter"],
            "terms": base,
        }

    def create_loan(self, **terms: Any) -> dict[str, Any]:
        r = self.call("bank_operator", "POST", "/v1/loans", json=self.loan_body(**terms))
        assert r.status_code == 201, r.text
        loan: dict[str, Any] = r.json()
        return loan

    def register(self, loan_id: int, seat: str, key: str | None = None) -> Any:
        who = {"miner": "miner", "bank": "bank_operator", "arbiter": "arbiter"}[seat]
        return self.call(
            who,
            "PUT",
            f"/v1/loans/{loan_id}/keys/{seat}",
            json={"kind": "hd", "key": key or hd_key()},
        )

    def keyed_loan(self, **terms: Any) -> dict[str, Any]:
        """A loan with its three HD keys registered (so it awaits its deposit at its
        first collateral address), as the API shows it."""
        loan = self.create_loan(**terms)
        for seat in ("miner", "bank", "arbiter"):
            r = self.register(loan["id"], seat)
            assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def sign_statement(
        self, statement_id: int, *staff: str, submitter: str = "bank_operator"
    ) -> Any:
        """Enrolled people sign a signer statement on their own machines and send their
        signatures (the last answer is returned)."""
        view = self.call(submitter, "GET", f"/v1/signer-statements/{statement_id}")
        assert view.status_code == 200, view.text
        statement = view.json()["statement"]
        answer = None
        for who in staff or ("operator", "approver"):
            answer = self.call(
                submitter,
                "POST",
                f"/v1/signer-statements/{statement_id}/endorsements",
                json=self.staff[who].endorse(statement),
            )
            assert answer.status_code == 200, answer.text
        return answer

    def hsm_bank_key(self, loan_id: int, kind: str | None = None) -> dict[str, Any]:
        """The bank's key made by its signer: the statement, signed by an operator and an
        approver. `kind` "hd"/"fixed" (None: the default, hd). Returns the statement's
        final view."""
        body = {"json": {"kind": kind}} if kind else {}
        r = self.call("bank_operator", "POST", f"/v1/loans/{loan_id}/keys/bank/hsm", **body)
        assert r.status_code == 201, r.text
        done: dict[str, Any] = self.sign_statement(r.json()["id"]).json()
        assert done["state"] == "done", done
        return done

    def funded_ready_loan(
        self, *, hsm_bank: bool = False, bank_kind: str | None = None
    ) -> dict[str, Any]:
        """A loan with all three keys: awaiting its deposit, with a collateral address.
        `hsm_bank`: the bank's signer makes the bank key (`bank_kind` hd/fixed)."""
        loan = self.create_loan()
        assert self.register(loan["id"], "miner").status_code == 200
        r = self.register(loan["id"], "arbiter")
        assert r.status_code == 200, r.text
        if hsm_bank:
            self.hsm_bank_key(loan["id"], bank_kind)
        else:
            assert self.register(loan["id"], "bank").status_code == 200
        out: dict[str, Any] = self.call("bank_operator", "GET", f"/v1/loans/{loan['id']}").json()
        return out


def build_world(
    engine: Engine,
    *,
    signer: BankSigner | None = None,
    chain: Any = None,
    staff: dict[str, Any] | None = None,
    network: str = "regtest",
    **settings_overrides: Any,
) -> World:
    settings = Settings(network=network, database_url="sqlite://", **settings_overrides)
    party_ids: dict[str, int] = {}
    api_keys: dict[str, str] = {}
    with transaction(engine) as session:
        for name, kind in (
            ("bank", PartyKind.bank),
            ("miner", PartyKind.miner),
            ("other_miner", PartyKind.miner),
            ("arbiter", PartyKind.arbiter),
            ("other_arbiter", PartyKind.arbiter),
        ):
            party = Party(name=f"party-{name}", kind=kind)
            session.add(party)
            session.flush()
            assert party.id is not None
            party_ids[name] = party.id
        roles = {
            "admin": (Role.admin, None),
            "bank_operator": (Role.bank_operator, party_ids["bank"]),
            "bank_approver": (Role.bank_approver, party_ids["bank"]),
            "auditor": (Role.auditor, None),
            "compliance_officer": (Role.compliance_officer, party_ids["bank"]),
            "miner": (Role.miner, party_ids["miner"]),
            "other_miner": (Role.miner, party_ids["other_miner"]),
            "arbiter": (Role.arbiter, party_ids["arbiter"]),
            "other_arbiter": (Role.arbiter, party_ids["other_arbiter"]),
        }
        principals = {}
        for who, (role, party_id) in roles.items():
            principals[who], api_keys[who] = create_principal(
                session, name=f"user-{who}", role=role, party_id=party_id, actor="test"
            )
        for miner in ("miner", "other_miner"):  # through the compliance gate, as in production
            approve_miner(
                session,
                party_ids[miner],
                editor=principals["bank_operator"],
                officer=principals["compliance_officer"],
                network=settings.network,
            )
    app = Root.assemble(settings, engine=engine, node=chain, signer=signer).app()
    client = CheckedClient(app, raise_server_exceptions=False)
    return World(
        client=client,
        api_keys=api_keys,
        party_ids=party_ids,
        settings=settings,
        engine=engine,
        staff=staff or {},
    )


def audit_actions(
    engine: Engine, *, loan_id: int | None = None, request_id: int | None = None
) -> list[str]:
    """The audit trail's actions, in order, for a loan or a signing request."""
    query = select(AuditEvent.action).order_by(col(AuditEvent.id))
    if loan_id is not None:
        query = query.where(AuditEvent.loan_id == loan_id)
    if request_id is not None:
        query = query.where(AuditEvent.request_id == request_id)
    with Session(engine) as session:
        return list(session.exec(query).all())
