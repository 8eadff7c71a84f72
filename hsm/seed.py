"""The bank's HD key: a BIP-32 seed the HSM protects, one hardened BIP-48 account per loan.

Why a seed and not a key per loan in the token: every mainstream wallet (Ledger's wallet
policies, Coldcard, BitBox02, Jade, Specter, Liana, Caravan, Sparrow) takes a multisig
only when every key is an xpub with its origin. So the bank's key of a loan is
`[fp/48h/<coin>h/<account>h/2h]xpub` like the miner's and the arbiter's.

How the seed is protected:
- it is made from the token's random generator (C_GenerateRandom) and exists outside a
  call only sealed: AES-256-GCM under an AES key born in the token (sensitive, never
  extractable, no wrap/unwrap), the ciphertext in the signer's registry, bound by its
  GCM additional data to this purpose and its fingerprint;
- this process (the signer's own: `hsm serve` or the in-process signer, never the API's
  handlers) unseals it only to derive an account xpub or sign, into a `bytearray` that is
  zeroed right after. Python cannot promise the derived key objects leave no copy in
  memory until they are collected: that is the trade-off against a fixed key that never
  leaves the token (`bank_key: fixed`), see README;
- it is backed up as SLIP-39 shares (`hsm seed init` / `hsm seed backup`) and restored
  into a fresh token from enough of them (`hsm seed restore`): losing the token does not
  lose the bank's key.

Key references of this backend are `bip32:<fingerprint>/48h/<coin>h/<account>h/2h[/c/i]`;
they name a path, never hold a secret.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol, TypeVar

from embit.bip32 import HARDENED_INDEX
from embit.bip32 import HDKey as EmbitHDKey
from embit.ec import Signature

from hsm.registry import Registry, SeedRecord
from hsm.signer import (
    PolicyViolation,
    Signer,
    SignerError,
    SignerKeyNotFound,
    SignerRefused,
)
from pledge.keys import HDKey, account_path, parse_hd_key
from pledge.network import NetworkName, check_network, coin_type, embit_network

__all__ = [
    "SEED_BYTES",
    "SEED_KEY_LABEL",
    "BankSeed",
    "SealingToken",
    "account_key_ref",
    "child_key_ref",
    "master_fingerprint",
]

T = TypeVar("T")

SEED_BYTES: Final = 32  # 256 bits, BIP-32's recommended maximum; SLIP-39 takes 16..32
SEED_KEY_LABEL: Final = "pledge-bank-seed-key"
_AAD_DOMAIN: Final = b"pledge-custody/bank-seed/v1:"
_REF_RE: Final = re.compile(
    r"bip32:(?P<fp>[0-9a-f]{8})/48h/(?P<coin>[01])h/(?P<account>0|[1-9][0-9]{0,9})h/2h"
    r"(?:/(?P<change>[01])/(?P<index>0|[1-9][0-9]{0,9}))?"
)


class SealingToken(Protocol):
    """What the seed needs of the token (`hsm.pkcs11_backend.Pkcs11Signer` has it)."""

    def random_bytes(self, count: int) -> bytearray: ...
    def generate_secret_key(self, label: str) -> Any: ...
    def secret_key_info(self, label: str) -> Any: ...
    def seal(self, label: str, plaintext: bytes | bytearray, aad: bytes) -> Any: ...
    def unseal(self, blob: Any, aad: bytes) -> bytearray: ...


def _aad(fingerprint: str) -> bytes:
    return _AAD_DOMAIN + fingerprint.encode("ascii")


def account_key_ref(fingerprint: str, network: NetworkName, account: int) -> str:
    return f"bip32:{fingerprint}{account_path(network, account)[1:]}"


def child_key_ref(account_ref: str, change: int, index: int) -> str:
    return f"{account_ref}/{change}/{index}"


def _wipe(buffer: bytearray) -> None:
    for i in range(len(buffer)):
        buffer[i] = 0


def master_fingerprint(seed: bytes | bytearray, network: NetworkName) -> str:
    root = EmbitHDKey.from_seed(bytes(seed), version=embit_network(network)["xprv"])
    fingerprint: str = root.my_fingerprint.hex()
    return fingerprint


@dataclass(frozen=True, slots=True)
class _Path:
    fingerprint: str
    account: int
    change: int | None
    index: int | None

    def steps(self, network: NetworkName) -> list[int]:
        h = HARDENED_INDEX
        out = [48 + h, coin_type(network) + h, self.account + h, 2 + h]
        if self.change is not None and self.index is not None:
            out += [self.change, self.index]
        return out


class BankSeed(Signer):
    """The HD bank key: derives per-loan BIP-48 accounts and signs with their children.

    Every operation unseals the seed in the token, derives, and wipes the plaintext
    before returning; nothing secret is cached. Public account keys are cached (they
    are in every HD loan's descriptor anyway)."""

    def __init__(self, token: SealingToken, registry: Registry, network: NetworkName) -> None:
        self.token = token
        self.registry = registry
        self.network: NetworkName = check_network(network)
        self._public: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.unseal_calls = 0
        self.signatures = 0  # digests signed (as `c_sign_calls` counts the token's)

    @property
    def name(self) -> str:
        return "bank-seed"

    # -- the ceremony side: make, re-seal, export for backup ---------------------------------

    @property
    def fingerprint(self) -> str | None:
        record = self.registry.seed()
        return record.fingerprint if record else None

    def create(self, now: datetime | None = None) -> str:
        """Make the bank's seed from the token's random generator and seal it; refused when
        the signer already has one. Returns the master fingerprint (public)."""
        if self.registry.seed() is not None:
            raise PolicyViolation("seed_exists", "the signer already has a bank seed", field="seed")
        seed = self.token.random_bytes(SEED_BYTES)
        try:
            return self._seal(seed, now or datetime.now(UTC), replace=False)
        finally:
            _wipe(seed)

    def restore(self, seed: bytearray, now: datetime | None = None) -> str:
        """Seal a seed recovered from shares under this token's AES key (made if absent).
        The registry's fingerprint must match: shares of another bank are refused."""
        return self._seal(seed, now or datetime.now(UTC), replace=True)

    def _seal(self, seed: bytearray, now: datetime, *, replace: bool) -> str:
        if len(seed) not in (16, 32):
            raise SignerRefused("a bank seed is 16 or 32 bytes", field="seed")
        fingerprint = master_fingerprint(seed, self.network)
        existing = self.registry.seed()
        if existing is not None and existing.fingerprint != fingerprint:
            raise PolicyViolation(
                "seed_mismatch",
                f"the restored seed has fingerprint {fingerprint}, the signer's loans use "
                f"{existing.fingerprint}: these are not this bank's shares",
                field="seed",
            )
        try:
            self.token.secret_key_info(SEED_KEY_LABEL)
        except SignerKeyNotFound:
            self.token.generate_secret_key(SEED_KEY_LABEL)
        blob = self.token.seal(SEED_KEY_LABEL, seed, _aad(fingerprint))
        self.registry.store_seed(
            SeedRecord(
                fingerprint=fingerprint,
                key_label=blob.key_label,
                iv=blob.iv,
                ciphertext=blob.ciphertext,
                created_at=existing.created_at if existing else now,
                sealed_at=now,
            ),
            replace=replace,
        )
        # The round trip proves this token can open what it just sealed.
        self.with_seed(lambda s: None)
        return fingerprint

    def key_evidence(self) -> Any:
        """The AES key's attributes as the token reports them (audit evidence)."""
        return self.token.secret_key_info(SEED_KEY_LABEL)

    @contextmanager
    def unsealed(self) -> Iterator[bytearray]:
        """The plaintext seed for the length of a `with` block, zeroed after it."""
        record = self.registry.seed()
        if record is None:
            raise PolicyViolation(
                "seed_missing",
                "the signer has no bank seed yet: run `hsm seed init` (it makes the seed and "
                "its SLIP-39 backup shares)",
                field="bank_key",
            )
        from hsm.pkcs11_backend import SealedBlob

        self.unseal_calls += 1
        seed = self.token.unseal(
            SealedBlob(record.key_label, record.iv, record.ciphertext), _aad(record.fingerprint)
        )
        try:
            if master_fingerprint(seed, self.network) != record.fingerprint:
                raise SignerError("the unsealed seed does not have the recorded fingerprint")
            yield seed
        finally:
            _wipe(seed)

    def with_seed(self, use: Callable[[bytearray], T]) -> T:
        with self.unsealed() as seed:
            return use(seed)

    def _root(self, seed: bytearray) -> EmbitHDKey:
        return EmbitHDKey.from_seed(bytes(seed), version=embit_network(self.network)["xprv"])

    # -- accounts -----------------------------------------------------------------------------

    def account_key(self, account: int) -> HDKey:
        """The loan's bank key: `[fp/48h/<coin>h/<account>h/2h]xpub`, parsed by the same
        rules as the miner's and the arbiter's keys."""
        if isinstance(account, bool) or not 0 <= account < HARDENED_INDEX:
            raise SignerRefused("account must be in [0, 2**31)", field="account")

        def derive(seed: bytearray) -> HDKey:
            root = self._root(seed)
            path = account_path(self.network, account)
            xpub = (
                root.derive(path).to_public().to_base58(version=embit_network(self.network)["xpub"])
            )
            return parse_hd_key(
                f"[{root.my_fingerprint.hex()}{path[1:]}]{xpub}", self.network, field="bank_key"
            )

        return self.with_seed(derive)

    # -- Signer -------------------------------------------------------------------------------

    def _path(self, key_ref: str) -> _Path:
        match = _REF_RE.fullmatch(key_ref) if isinstance(key_ref, str) else None
        if match is None or int(match["coin"]) != coin_type(self.network):
            raise SignerRefused("malformed key_ref for the bank seed", field="key_ref")
        account = int(match["account"])
        index = match["index"]
        if account >= HARDENED_INDEX or (index is not None and int(index) >= HARDENED_INDEX):
            raise SignerRefused("key_ref path step out of range", field="key_ref")
        return _Path(
            match["fp"],
            account,
            None if match["change"] is None else int(match["change"]),
            None if index is None else int(index),
        )

    def _check_fingerprint(self, path: _Path) -> None:
        if path.fingerprint != self.fingerprint:
            raise SignerKeyNotFound(
                f"key_ref is for seed {path.fingerprint}, not this signer's", field="key_ref"
            )

    def public_key(self, key_ref: str) -> bytes:
        path = self._path(key_ref)
        cached = self._public.get(key_ref)
        if cached is not None:
            return cached
        self._check_fingerprint(path)

        def derive(seed: bytearray) -> bytes:
            sec: bytes = (
                self._root(seed).derive(path.steps(self.network)).key.get_public_key().sec()
            )
            return sec

        pub = self.with_seed(derive)
        self._public[key_ref] = pub
        return pub

    def sign_digest(self, key_ref: str, digest: bytes) -> bytes:
        return self.sign_digests([(key_ref, digest)])[0]

    def sign_digests(self, requests: Sequence[tuple[str, bytes]]) -> list[bytes]:
        """Sign several (child key_ref, 32-byte digest) pairs with one unseal; each
        signature is DER, low-S, and verified before it is returned."""
        paths: list[_Path] = []
        for key_ref, digest in requests:
            if not isinstance(digest, bytes | bytearray) or len(digest) != 32:
                raise SignerRefused("digest must be exactly 32 bytes", field="digest")
            path = self._path(key_ref)
            if path.index is None:
                raise SignerRefused(
                    "a signature needs a child key (…/change/index), not the account",
                    field="key_ref",
                )
            self._check_fingerprint(path)
            paths.append(path)

        def sign(seed: bytearray) -> list[bytes]:
            root = self._root(seed)
            out: list[bytes] = []
            for path, (_, digest) in zip(paths, requests, strict=True):
                child = root.derive(path.steps(self.network)).key
                signature = child.sign(bytes(digest))
                der: bytes = signature.serialize()
                public = child.get_public_key()
                if not (
                    public.verify(Signature.parse(der), bytes(digest)) and _is_low_s(signature)
                ):
                    raise SignerError("a seed signature did not verify; not returned")
                out.append(der)
            self.signatures += len(out)
            return out

        with self._lock:
            return self.with_seed(sign)


def _is_low_s(signature: Signature) -> bool:
    from hsm.pkcs11_backend import SECP256K1_ORDER

    der = signature.serialize()
    r_len = der[3]
    s = int.from_bytes(der[6 + r_len :], "big")
    return 0 < s <= SECP256K1_ORDER // 2
