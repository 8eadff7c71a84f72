"""Party request and response bodies."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from custody.schemas import Name, Strict


class PartyCreate(Strict):
    name: Name
    kind: Literal["miner", "bank", "arbiter"]


class PartyOut(BaseModel):
    id: int
    name: str
    kind: str
