"""Principal (API user) request and response bodies."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    Field,
)

from custody.schemas import Id, Name, Strict


class PrincipalCreate(Strict):
    name: Name
    role: Literal[
        "miner",
        "bank_operator",
        "bank_approver",
        "arbiter",
        "auditor",
        "admin",
        "compliance_officer",  # issue 15: reviews miners' records (bank staff)
    ]
    party_id: Id | None = None


class PrincipalOut(BaseModel):
    id: int
    name: str
    role: str
    party_id: int | None
    key_prefix: str
    revoked: bool = Field(description="The key is revoked: it answers 401.")


class PrincipalCreated(PrincipalOut):
    api_key: str = Field(
        description="Shown once (the answer is `Cache-Control: no-store`); only its hash is stored."
    )
