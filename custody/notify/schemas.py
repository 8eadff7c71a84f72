"""Webhook subscription bodies."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from custody.schemas import Strict, Text


class WebhookCreate(Strict):
    url: Annotated[str, Text(500)]
    # The HMAC key, kept exactly as sent (not trimmed).
    secret: Annotated[str, Text(256, min_length=32, trim=False)]
    events: Annotated[list[Annotated[str, Text(64)]], Field(max_length=100)] | Literal["*"] = "*"
