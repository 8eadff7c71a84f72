"""A software HD signer for regtest and tests only: it plays a hardware wallet.

It signs PSBTs with embit's own signer (`PSBT.sign_with`), a code path independent
of the service's PSBT builder and of `hsm.psbt_signing`, so a test where it
co-signs proves the builder's derivation fields are what a real wallet needs.
A seed in memory is not custody: mainnet is refused at construction, and the module
lives in the test kit, not in `hsm/`, so no wheel or image of the product carries it.
"""

from __future__ import annotations

import re

from embit.bip32 import HDKey, parse_path
from embit.ec import Signature
from embit.networks import NETWORKS
from embit.psbt import PSBT

from hsm.signer import Signer, SignerError, SignerRefused
from pledge.errors import InvalidInput
from pledge.keys import account_path
from pledge.network import NetworkName, check_network, embit_network

__all__ = ["SoftwareHDSigner"]

_PATH_RE = re.compile(r"m(/[0-9]{1,10}h?)*")


class SoftwareHDSigner(Signer):
    """Signs with an in-memory BIP-32 master key. Key refs are paths like `m/48h/1h/0h/2h/0/3`."""

    def __init__(self, root: HDKey, network: NetworkName) -> None:
        try:
            self.network: NetworkName = check_network(network)
        except InvalidInput as exc:
            raise SignerRefused(exc.message, field="network") from None
        if self.network == "mainnet":
            raise SignerRefused(
                "the software HD signer is for regtest and tests only: refused on mainnet",
                field="network",
            )
        if not isinstance(root, HDKey) or not root.is_private:
            raise SignerRefused("the software HD signer needs a private master key", field="root")
        if root.version == NETWORKS["main"]["xprv"]:
            raise SignerRefused("this is a mainnet (xprv) key: refused", field="root")
        if root.depth != 0:
            raise SignerRefused(
                "give the master key (depth 0): key origins start at its fingerprint",
                field="root",
            )
        self._root = root

    @property
    def name(self) -> str:
        return f"software-hd:{self.fingerprint}"

    def __repr__(self) -> str:
        return f"SoftwareHDSigner(fingerprint={self.fingerprint!r}, network={self.network!r})"

    @property
    def fingerprint(self) -> str:
        """The master key fingerprint, hex, as in descriptor key origins."""
        fp: bytes = self._root.my_fingerprint
        return fp.hex()

    def account_key_text(self, account: int = 0) -> str:
        """`[fp/48h/1h/<account>h/2h]tpub...`: what a party registers for a loan."""
        if not 0 <= account < 2**31:
            raise SignerRefused("account must be in [0, 2**31)", field="account")
        path = account_path(self.network, account)
        xpub: str = (
            self._root.derive(path)
            .to_public()
            .to_base58(version=embit_network(self.network)["xpub"])
        )
        return f"[{self.fingerprint}{path[1:]}]{xpub}"

    def _derive(self, key_ref: str) -> HDKey:
        if not isinstance(key_ref, str) or not _PATH_RE.fullmatch(key_ref):
            raise SignerRefused(
                "key_ref must be a BIP-32 path like m/48h/1h/0h/2h/0/3", field="key_ref"
            )
        try:
            child: HDKey = self._root.derive(parse_path(key_ref))
        except Exception:
            raise SignerRefused(f"cannot derive {key_ref}", field="key_ref") from None
        return child

    def public_key(self, key_ref: str) -> bytes:
        sec: bytes = self._derive(key_ref).key.get_public_key().sec()
        return sec

    def sign_digest(self, key_ref: str, digest: bytes) -> bytes:
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise SignerRefused("the digest must be 32 bytes", field="digest")
        child = self._derive(key_ref)
        sig: Signature = child.key.sign(digest)
        der: bytes = sig.serialize()
        if not child.key.get_public_key().verify(Signature.parse(der), digest):
            raise SignerError("the software signature does not verify; not returned")
        return der

    def sign_psbt(self, psbt_b64: str) -> str:
        """Sign every input this root has a BIP-32 derivation for (SIGHASH_ALL only).

        Raises SignerRefused when nothing was signed: a silent no-op would look
        like progress to a caller counting steps."""
        try:
            psbt = PSBT.from_string(psbt_b64.strip())
        except Exception as exc:
            raise SignerRefused(
                f"the PSBT cannot be parsed ({type(exc).__name__})", field="psbt"
            ) from None
        try:
            count = int(psbt.sign_with(self._root))
        except Exception as exc:
            raise SignerRefused(f"embit refused to sign: {exc}", field="psbt") from None
        if count == 0:
            raise SignerRefused(
                f"nothing signed: no input has a SIGHASH_ALL BIP-32 derivation for "
                f"fingerprint {self.fingerprint}",
                field="psbt",
            )
        out: str = psbt.to_string()
        return out
