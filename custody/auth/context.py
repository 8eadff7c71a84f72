"""Who is asking, and on which network the service runs: what every domain call needs to
decide what the caller may see and do."""

from __future__ import annotations

from dataclasses import dataclass

from custody.db.models import Principal
from pledge.network import NetworkName


@dataclass(frozen=True)
class Context:
    """The authenticated principal and the service's network."""

    principal: Principal
    network: NetworkName

    @property
    def actor(self) -> str:
        return f"{self.principal.role}:{self.principal.name}"
