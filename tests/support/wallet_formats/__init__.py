"""Readers of wallet files, each written from its format's own specification or
reference source (never from our exporter), and one way to derive addresses from
what they read.

Every reader turns a file into a `ParsedWallet`: the threshold and the keys with the
origins the file gives. `addresses` then derives P2WSH sortedmulti addresses from it
with bdkpython AND embit, the way a wallet importing the file would, so a test can
compare them with the service's `CollateralDescriptor.address`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import bdkpython as bdk
from embit.descriptor import Descriptor as EmbitDescriptor

from pledge.network import NetworkName, bdk_network, bdk_network_kind, embit_network

HARDENED: Final = 2**31
_PATH_STEP: Final = re.compile(r"(\d+)(['hH]?)")


class FormatError(ValueError):
    """The file breaks its format's rules (the wallet would refuse it)."""


def path_steps(path: str) -> tuple[int, ...]:
    """`m/48'/1'/0'/2'` or `48h/1h/0h/2h` -> integers with bit 31 for hardened steps."""
    steps = path.split("/")
    if steps and steps[0] == "m":
        steps = steps[1:]
    out: list[int] = []
    for step in steps:
        match = _PATH_STEP.fullmatch(step)
        if match is None:
            raise FormatError(f"bad derivation step {step!r}")
        number = int(match.group(1))
        if number >= HARDENED:
            raise FormatError(f"derivation step {step!r} out of range")
        out.append(number + HARDENED if match.group(2) else number)
    return tuple(out)


@dataclass(frozen=True)
class ParsedKey:
    """One key as a file gives it: an xpub (or a plain hex public key) and, when the
    file says so, the master fingerprint and path it was derived at."""

    key: str
    fingerprint: str | None = None
    path: tuple[int, ...] | None = None

    @property
    def is_extended(self) -> bool:
        return self.key[1:4] == "pub"

    def expression(self, change: int) -> str:
        """The descriptor key for one branch: `[fp/48'/...]xpub/<change>/*` or the hex."""
        origin = ""
        if self.fingerprint is not None:
            steps = "".join(
                f"/{s - HARDENED}'" if s >= HARDENED else f"/{s}" for s in self.path or ()
            )
            origin = f"[{self.fingerprint}{steps}]"
        suffix = f"/{change}/*" if self.is_extended else ""
        return f"{origin}{self.key}{suffix}"


@dataclass(frozen=True)
class ParsedWallet:
    """What a wallet learns from a file: a P2WSH sortedmulti of `keys`."""

    threshold: int
    keys: tuple[ParsedKey, ...]

    def descriptor(self, change: int) -> str:
        keys = ",".join(k.expression(change) for k in self.keys)
        return f"wsh(sortedmulti({self.threshold},{keys}))"


def addresses(
    wallet: ParsedWallet, network: NetworkName, indexes: list[int], *, change: bool = False
) -> list[str]:
    """Addresses at `indexes` of the receive (or change) branch, derived by bdkpython
    and by embit, which must agree."""
    text = wallet.descriptor(int(change))
    bdk_descriptor = bdk.Descriptor(text, bdk_network_kind(network))
    embit_descriptor = EmbitDescriptor.from_string(text)
    out: list[str] = []
    for index in indexes:
        from_bdk = str(bdk_descriptor.derive_address(index, bdk_network(network)))
        from_embit = embit_descriptor.derive(index).address(embit_network(network))
        assert from_bdk == from_embit, (index, from_bdk, from_embit)
        out.append(from_bdk)
    return out
