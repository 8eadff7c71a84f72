"""Party request and response bodies."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    Field,
    StrictStr,
)

from custody.schemas import Strict


class PartyCreate(Strict):
    name: Annotated[StrictStr, Field(min_length=1, max_length=120)]
    kind: Literal["miner", "bank", "arbiter"]


class PartyOut(BaseModel):
    id: int
    name: str
    kind: str
