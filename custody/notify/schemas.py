"""Webhook subscription bodies."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Field,
    StrictStr,
)

from custody.schemas import Strict


class WebhookCreate(Strict):
    url: Annotated[StrictStr, Field(min_length=1, max_length=500)]
    secret: Annotated[StrictStr, Field(min_length=32, max_length=256)]
    events: list[StrictStr] | Literal["*"] = "*"
