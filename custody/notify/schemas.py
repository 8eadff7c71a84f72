"""Webhook subscription bodies."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import StrictStr

from custody.schemas import Strict, Text


class WebhookCreate(Strict):
    url: Annotated[str, Text(500)]
    # The HMAC key, kept exactly as sent (not trimmed).
    secret: Annotated[str, Text(256, min_length=32, trim=False)]
    # Names from a fixed set, checked by the service (an unknown one is a 422 on `events`).
    events: list[StrictStr] | Literal["*"] = "*"
