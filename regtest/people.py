"""Bank staff for the demo, tests and benchmarks: a person enrolled in the bank's signer
with an Ed25519 approval key held "on their own machine" (here, in memory)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pledge.statements import sign_statement

__all__ = ["Staff", "new_staff"]


@dataclass(frozen=True)
class Staff:
    """One enrolled person and the private key on their own machine."""

    name: str
    role: str
    key: ed25519.Ed25519PrivateKey = field(default_factory=ed25519.Ed25519PrivateKey.generate)

    @property
    def public_hex(self) -> str:
        return self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    def endorse(self, statement: dict[str, Any]) -> dict[str, str]:
        """Their signature over the statement, as they would send it."""
        return {"person": self.name, "signature": sign_statement(self.key, statement)}


def new_staff(name: str, role: str) -> Staff:
    return Staff(name, role)
