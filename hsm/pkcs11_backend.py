"""PKCS#11 backend: per-loan secp256k1 keys generated and used inside an HSM.

Why the plumbing below is shaped the way it is:

- python-pkcs11 calls `C_Initialize(NULL)`, which tells the module the caller
  does its own locking; SoftHSM2 then runs with no internal locks at all. So
  every PKCS#11 call for one module goes through ONE process-wide lock per
  module path (not per signer: two signers on the same module share the C
  library state).
- PKCS#11 login state belongs to the application and the token, not to a
  session: a second `C_Login` on a token fails with USER_ALREADY_LOGGED_IN
  (even with a wrong PIN) and `C_Logout` on any session logs out all of them.
  Signers on the same (module, token) therefore share one logged-in session
  (`_TokenConnection`, reference counted). A signer that joins an existing
  login proves it knows the same PIN by an HMAC comparison (random per-process
  key) so a wrong PIN is still refused.
- A PKCS#11 handle is worthless after `fork()`: the child must re-run
  `C_Initialize` and open new sessions. We detect a pid change before every
  call, drop the parent's session without touching it, and re-initialise the
  module once per child. Locks are replaced in the child by an at-fork hook
  (a lock held by another parent thread at fork time would never be released).
- After any PKCS#11 error the session is closed and re-opened on next use;
  errors that mean "this session is gone" are retried once.
- The PIN is held as a pydantic `SecretStr` and unwrapped only at the
  `C_Login` call; it never appears in a log, repr or exception message.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
from asn1crypto.core import OctetString
from embit.ec import ECError, PublicKey, Signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_ecdsa_signature, encode_named_curve_parameters
from pydantic import SecretStr

from hsm.signer import (
    Signer,
    SignerBusy,
    SignerError,
    SignerKeyExists,
    SignerKeyNotFound,
    SignerRefused,
    SignerUnavailable,
)

__all__ = ["SECP256K1_EC_PARAMS", "HsmKeyInfo", "Pkcs11Signer", "SealedBlob", "SecretKeyInfo"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# DER ECParameters for the named curve secp256k1 (OID 1.3.132.0.10).
SECP256K1_EC_PARAMS: bytes = encode_named_curve_parameters("secp256k1")
# Group order n of secp256k1 (SEC 2, section 2.4.1): needed to fold s into the low half.
SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_HALF_ORDER = SECP256K1_ORDER // 2

_LABEL_PREFIX = "pledge-loan:"
_ID_DOMAIN = b"pledge-custody/hsm-loan-key/v1:"
# Loan references become PKCS#11 labels: keep them boring and printable.
_LOAN_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_KEY_REF_RE = re.compile(re.escape(_LABEL_PREFIX) + _LOAN_REF_RE.pattern)

# Errors after which the session (or whole module state) is gone: re-open and retry once.
_STALE_SESSION_ERRORS: tuple[type[Exception], ...] = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.UserNotLoggedIn,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
)
_UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    *_STALE_SESSION_ERRORS,
    p11e.PinIncorrect,
    p11e.PinInvalid,
    p11e.PinLenRange,
    p11e.PinExpired,
    p11e.PinLocked,
    p11e.UserPinNotInitialized,
    p11e.NoSuchToken,
    p11e.MultipleTokensReturned,
    p11e.TokenNotRecognised,
    p11e.SlotIDInvalid,
    p11e.DeviceError,
    p11e.DeviceMemory,
    p11e.GeneralError,
    p11e.AnotherUserAlreadyLoggedIn,
    p11e.UserAlreadyLoggedIn,
)
_BUSY_ERRORS: tuple[type[Exception], ...] = (
    p11e.SessionCount,
    p11e.OperationActive,
    p11e.FunctionCancelled,
)


@dataclass(frozen=True, slots=True)
class HsmKeyInfo:
    """A loan key as the HSM describes it; the booleans are audit evidence that the
    private key was born inside the token and can never leave it."""

    key_ref: str
    key_id_hex: str
    public_key: bytes
    local: bool
    never_extractable: bool
    always_sensitive: bool

    @property
    def label(self) -> str:
        """The PKCS#11 CKA_LABEL; identical to `key_ref` for this backend."""
        return self.key_ref


@dataclass(frozen=True, slots=True)
class SecretKeyInfo:
    """An AES key as the token describes it: the evidence that it was made inside the
    token and can be used there only (no export, no wrap, no unwrap)."""

    label: str
    local: bool
    never_extractable: bool
    always_sensitive: bool
    extractable: bool
    wrap: bool
    unwrap: bool


@dataclass(frozen=True, slots=True)
class SealedBlob:
    """A secret encrypted by the token's AES key (AES-256-GCM, 96-bit IV, 128-bit tag)."""

    key_label: str
    iv: bytes
    ciphertext: bytes


_AES_KEY_BITS = 256
_GCM_IV_BYTES = 12
_GCM_TAG_BITS = 128
_SECRET_LABEL_RE = re.compile(r"pledge-[a-z0-9-]{1,48}")


def key_ref_for_loan(loan_ref: str) -> str:
    """The key reference (PKCS#11 label) a loan's key has; refuses odd loan refs."""
    if not isinstance(loan_ref, str) or not _LOAN_REF_RE.fullmatch(loan_ref):
        raise SignerRefused(
            "loan_ref must be 1-64 characters of [A-Za-z0-9._:-], starting alphanumeric",
            field="loan_ref",
        )
    return _LABEL_PREFIX + loan_ref


def key_id_for_loan(loan_ref: str) -> bytes:
    """A stable CKA_ID derived from the loan ref, so the key can be found by id too."""
    return hashlib.sha256(_ID_DOMAIN + loan_ref.encode("utf-8")).digest()[:16]


def _exactly_one(found: list[Any], what: str, field: str) -> Any:
    """The one token object a label names: none is not found, more is never guessed."""
    if not found:
        raise SignerKeyNotFound(f"no {what} on the token", field=field)
    if len(found) > 1:
        raise SignerError(f"{len(found)} objects on the token are {what}; refusing to guess")
    return found[0]


def _compressed_from_ec_point(ec_point: bytes) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING around the SEC1 point; some tokens give it raw."""
    if len(ec_point) == 65 and ec_point[0] == 0x04:
        raw = ec_point
    else:
        raw = bytes(OctetString.load(ec_point).native)
    try:
        pub = PublicKey.parse(raw)
    except (ECError, ValueError) as exc:
        raise SignerError("the token returned an invalid secp256k1 public point") from exc
    pub.compressed = True
    sec: bytes = pub.sec()
    return sec


def _low_s_der(raw_sig: bytes) -> bytes:
    """Raw PKCS#11 r||s -> DER with s folded to the low half (BIP-62/146 standardness)."""
    if len(raw_sig) != 64:
        raise SignerError(f"unexpected ECDSA signature length {len(raw_sig)} from the token")
    r = int.from_bytes(raw_sig[:32], "big")
    s = int.from_bytes(raw_sig[32:], "big")
    if not (0 < r < SECP256K1_ORDER and 0 < s < SECP256K1_ORDER):
        raise SignerError("the token returned an out-of-range ECDSA signature")
    if s > _HALF_ORDER:
        s = SECP256K1_ORDER - s
    der: bytes = encode_ecdsa_signature(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    return der


def _verify(public_key: bytes, digest: bytes, der: bytes) -> None:
    """Refuse to hand out a signature libsecp256k1 (via embit) does not accept as-is."""
    try:
        sig = Signature.parse(der)
        ok = bool(PublicKey.parse(public_key).verify(sig, digest))
        canonical = sig.serialize() == der
    except (ECError, ValueError) as exc:
        raise SignerError("the HSM signature could not be parsed") from exc
    if not (ok and canonical):
        raise SignerError("the HSM produced a signature that does not verify; not returned")


# --------------------------------------------------------------------------- process state


class _Module:
    """One PKCS#11 module (shared library) as loaded in this process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.RLock()
        self._lib: Any = None
        self._pid: int | None = None

    def lib(self) -> Any:
        """The initialised library, re-initialised once in a forked child. Call under lock."""
        pid = os.getpid()
        if self._lib is None:
            try:
                self._lib = pkcs11.lib(_loaded_spelling(self.path))
            except p11e.PKCS11Error as exc:
                raise SignerUnavailable(
                    f"cannot load PKCS#11 module {self.path}: {type(exc).__name__}"
                ) from exc
            self._pid = pid
        elif self._pid != pid:
            # Parent's C_Initialize does not carry over a fork (PKCS#11 v2.40 sec. 6.7.7).
            # Usually fails (the child's view is not initialised); finalize still resets
            # python-pkcs11's `initialized` flag so initialize() really calls C_Initialize.
            with contextlib.suppress(p11e.PKCS11Error):
                self._lib.finalize()
            self._lib.initialize()
            self._pid = pid
        return self._lib


def _loaded_spelling(path: str) -> str:
    """The path python-pkcs11 already loaded this module under, if any.

    python-pkcs11 caches modules by the path string; loading the same .so under a
    second spelling (symlink vs real path) dlopen()s the same library and calls
    C_Initialize twice, which fails with CRYPTOKI_ALREADY_INITIALIZED.
    """
    loaded: dict[str, Any] = getattr(pkcs11, "_loaded", {})
    real = os.path.realpath(path)
    for spelling in loaded:
        if os.path.realpath(spelling) == real:
            return spelling
    return path


class _TokenConnection:
    """The one logged-in session this process keeps on a (module, token)."""

    def __init__(self, module: _Module, token_label: str) -> None:
        self.module = module
        self.token_label = token_label
        self.users = 0
        self._session: Any = None
        self._pid: int | None = None
        self._pin_mac: bytes | None = None
        # (object class, label) -> object handles, valid for this session only: a
        # search per signature grows with the number of keys on the token.
        self.index: dict[tuple[Any, str], list[Any]] | None = None

    def session(self, pin: SecretStr, pin_mac: bytes) -> Any:
        """A logged-in session, opened (and PIN checked) on demand. Call under module lock."""
        if self._session is not None and self._pid != os.getpid():
            # Inherited from the parent: unusable, and closing it would be wrong too.
            self._session = None
            self._pin_mac = None
            self.index = None
        if self._session is not None:
            if self._pin_mac is None or not hmac.compare_digest(self._pin_mac, pin_mac):
                raise SignerUnavailable(
                    f"PIN rejected for token {self.token_label!r}: it differs from the PIN "
                    "this process is logged in with"
                )
            return self._session
        lib = self.module.lib()
        try:
            token = lib.get_token(token_label=self.token_label)
            session = token.open(rw=True, user_pin=pin.get_secret_value())
        except p11e.UserAlreadyLoggedIn as exc:
            raise SignerUnavailable(
                f"token {self.token_label!r} is already logged in by other code in this "
                "process; use one Pkcs11Signer per token"
            ) from exc
        except p11e.PKCS11Error as exc:
            raise _translate(exc, f"cannot log in to token {self.token_label!r}") from exc
        self._session = session
        self._pid = os.getpid()
        self._pin_mac = pin_mac
        self.index = None
        return session

    def reset(self) -> None:
        """Close the session after an error so the next call starts clean."""
        session, self._session = self._session, None
        self._pin_mac = None
        self.index = None
        if session is not None and self._pid == os.getpid():
            try:
                session.close()
            except p11e.PKCS11Error:
                log.debug("hsm.session_close_failed")


_registry_lock = threading.Lock()
_modules: dict[str, _Module] = {}
_connections: dict[tuple[str, str], _TokenConnection] = {}
_PIN_MAC_KEY = secrets.token_bytes(32)


def _after_fork_in_child() -> None:
    """Locks may have been held by parent threads that do not exist in the child."""
    global _registry_lock
    _registry_lock = threading.Lock()
    for module in _modules.values():
        module.lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _pin_mac(pin: SecretStr) -> bytes:
    return hmac.new(_PIN_MAC_KEY, pin.get_secret_value().encode("utf-8"), "sha256").digest()


def _translate(exc: Exception, context: str) -> SignerError:
    """Map a python-pkcs11 exception to the signer error set (class name only, no args)."""
    what = f"{context}: {type(exc).__name__}"
    if isinstance(exc, _BUSY_ERRORS):
        return SignerBusy(what)
    if isinstance(exc, _UNAVAILABLE_ERRORS):
        return SignerUnavailable(what)
    if type(exc) is p11e.PKCS11Error and "not initialized" in str(exc).lower():
        return SignerUnavailable(what)
    return SignerError(what)


# --------------------------------------------------------------------------- the signer


class Pkcs11Signer(Signer):
    """Signs with per-loan secp256k1 keys that never leave a PKCS#11 token."""

    def __init__(
        self,
        module_path: str,
        token_label: str,
        pin: str | SecretStr,
        *,
        lock_timeout: float = 30.0,
    ) -> None:
        """Load the module, find the token and log in now, so a bad setup fails at startup."""
        if not Path(module_path).is_file():
            raise SignerUnavailable(f"PKCS#11 module not found: {module_path}")
        # Keyed by the real path (one C library state per file), loaded as spelled.
        self._module_path = os.path.realpath(module_path)
        self._token_label = token_label
        self._pin = pin if isinstance(pin, SecretStr) else SecretStr(pin)
        self._pin_mac = _pin_mac(self._pin)
        self._lock_timeout = lock_timeout
        self._public_keys: dict[str, bytes] = {}
        self._closed = False
        self.c_sign_calls = 0  # C_Sign calls made through this object
        with _registry_lock:
            module = _modules.get(self._module_path)
            if module is None:
                module = _modules[self._module_path] = _Module(module_path)
            key = (self._module_path, token_label)
            conn = _connections.get(key)
            if conn is None:
                conn = _connections[key] = _TokenConnection(module, token_label)
            conn.users += 1
        self._conn = conn
        try:
            self._run("open session", lambda session: None)
        except BaseException:
            self._release()
            raise

    # -- identity ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return f"pkcs11:{self._token_label}"

    def __repr__(self) -> str:
        return f"Pkcs11Signer(module_path={self._module_path!r}, token_label={self._token_label!r})"

    # -- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Leave the shared login; the last signer on a token closes the session."""
        if self._closed:
            return
        self._closed = True
        self._release()

    def _release(self) -> None:
        with self._locked(), _registry_lock:
            self._conn.users -= 1
            if self._conn.users <= 0:
                self._conn.reset()
                _connections.pop((self._module_path, self._token_label), None)

    # -- plumbing ---------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self._conn.module.lock
        if not lock.acquire(timeout=self._lock_timeout):
            raise SignerBusy(f"PKCS#11 module busy for more than {self._lock_timeout:g}s")
        try:
            yield
        finally:
            lock.release()

    def _run(self, what: str, op: Callable[[Any], T]) -> T:
        """Run `op(session)` under the module lock; re-open the session after errors."""
        if self._closed:
            raise SignerUnavailable("signer is closed")
        with self._locked():
            for attempt in (1, 2):
                session = self._conn.session(self._pin, self._pin_mac)
                try:
                    return op(session)
                except SignerError:
                    raise
                except p11e.PKCS11Error as exc:
                    self._conn.reset()
                    stale = isinstance(exc, _STALE_SESSION_ERRORS) or (
                        type(exc) is p11e.PKCS11Error and "not initialized" in str(exc).lower()
                    )
                    if attempt == 1 and stale:
                        log.warning("hsm.session_reopened", extra={"error": type(exc).__name__})
                        continue
                    raise _translate(exc, f"PKCS#11 {what} failed") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _check_key_ref(key_ref: str) -> str:
        if not isinstance(key_ref, str) or not _KEY_REF_RE.fullmatch(key_ref):
            raise SignerRefused("malformed key_ref", field="key_ref")
        return key_ref

    def _find_one(self, session: Any, object_class: ObjectClass, label: str) -> Any:
        """The one key object with this class and label. Served from a per-session index
        built with one enumeration; a miss falls back to a search (a key made by another
        process since), and more than one match is refused, never guessed."""
        index = self._conn.index
        if index is None:
            index = {}
            for obj in session.get_objects({Attribute.KEY_TYPE: KeyType.EC}):
                try:
                    cls, name = obj[Attribute.CLASS], obj[Attribute.LABEL]
                except p11e.PKCS11Error:
                    continue
                index.setdefault((cls, name), []).append(obj)
            self._conn.index = index
        found = index.get((object_class, label))
        if not found:
            found = list(
                session.get_objects(
                    {
                        Attribute.CLASS: object_class,
                        Attribute.KEY_TYPE: KeyType.EC,
                        Attribute.LABEL: label,
                    }
                )
            )
            if found:
                index[(object_class, label)] = found
        return _exactly_one(found, f"HSM key {label!r}", "key_ref")

    @staticmethod
    def _public_from_object(pub_obj: Any, label: str) -> bytes:
        if bytes(pub_obj[Attribute.EC_PARAMS]) != SECP256K1_EC_PARAMS:
            raise SignerRefused(f"HSM key {label!r} is not on secp256k1", field="key_ref")
        return _compressed_from_ec_point(bytes(pub_obj[Attribute.EC_POINT]))

    def _info(self, session: Any, label: str, pub_obj: Any, priv_obj: Any) -> HsmKeyInfo:
        return HsmKeyInfo(
            key_ref=label,
            key_id_hex=bytes(priv_obj[Attribute.ID]).hex(),
            public_key=self._public_from_object(pub_obj, label),
            local=bool(priv_obj[Attribute.LOCAL]),
            never_extractable=bool(priv_obj[Attribute.NEVER_EXTRACTABLE]),
            always_sensitive=bool(priv_obj[Attribute.ALWAYS_SENSITIVE]),
        )

    # -- key management ---------------------------------------------------------------

    def generate_loan_key(self, loan_ref: str) -> HsmKeyInfo:
        """Generate the loan's sign-only secp256k1 key inside the token; one key per loan.

        The uniqueness check and the generation run under the module lock, so
        they are atomic within this process; across processes the loan table's
        own uniqueness must back it up.
        """
        label = key_ref_for_loan(loan_ref)
        key_id = key_id_for_loan(loan_ref)

        def op(session: Any) -> HsmKeyInfo:
            for attrs in ({Attribute.LABEL: label}, {Attribute.ID: key_id}):
                # list(): drain the search so C_FindObjectsFinal runs now, under the lock.
                if list(session.get_objects(attrs)):
                    raise SignerKeyExists(
                        f"loan {loan_ref!r} already has an HSM key", field="loan_ref"
                    )
            public_template = {
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.EC_PARAMS: SECP256K1_EC_PARAMS,
                Attribute.VERIFY: True,
                Attribute.ENCRYPT: False,
                Attribute.WRAP: False,
                Attribute.DERIVE: False,
                Attribute.VERIFY_RECOVER: False,
            }
            private_template = {
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.SIGN_RECOVER: False,
                Attribute.DERIVE: False,
                Attribute.DECRYPT: False,
                Attribute.UNWRAP: False,
            }
            pub_obj, priv_obj = session.generate_keypair(
                KeyType.EC,
                id=key_id,
                label=label,
                store=True,
                mechanism=Mechanism.EC_KEY_PAIR_GEN,
                public_template=public_template,
                private_template=private_template,
            )
            if self._conn.index is not None:
                self._conn.index[(ObjectClass.PUBLIC_KEY, label)] = [pub_obj]
                self._conn.index[(ObjectClass.PRIVATE_KEY, label)] = [priv_obj]
            return self._info(session, label, pub_obj, priv_obj)

        info = self._run("key generation", op)
        self._public_keys[label] = info.public_key
        log.info(
            "hsm.loan_key_generated",
            extra={
                "label": label,
                "local": info.local,
                "never_extractable": info.never_extractable,
            },
        )
        return info

    def key_info(self, key_ref: str) -> HsmKeyInfo:
        """Re-read a key's evidence attributes (for audits long after generation)."""
        label = self._check_key_ref(key_ref)

        def op(session: Any) -> HsmKeyInfo:
            pub_obj = self._find_one(session, ObjectClass.PUBLIC_KEY, label)
            priv_obj = self._find_one(session, ObjectClass.PRIVATE_KEY, label)
            return self._info(session, label, pub_obj, priv_obj)

        return self._run("key lookup", op)

    # -- Signer -----------------------------------------------------------------------

    def public_key(self, key_ref: str) -> bytes:
        label = self._check_key_ref(key_ref)
        cached = self._public_keys.get(label)
        if cached is not None:
            return cached

        def op(session: Any) -> bytes:
            return self._public_from_object(
                self._find_one(session, ObjectClass.PUBLIC_KEY, label), label
            )

        pub = self._run("public key lookup", op)
        self._public_keys[label] = pub
        return pub

    def sign_digest(self, key_ref: str, digest: bytes) -> bytes:
        if not isinstance(digest, bytes | bytearray) or len(digest) != 32:
            raise SignerRefused("digest must be exactly 32 bytes", field="digest")
        digest = bytes(digest)
        label = self._check_key_ref(key_ref)
        public_key = self.public_key(label)

        def op(session: Any) -> bytes:
            priv_obj = self._find_one(session, ObjectClass.PRIVATE_KEY, label)
            # Explicit mechanism: python-pkcs11's EC default hashes the input again.
            self.c_sign_calls += 1  # counted at the C_Sign call itself: tests assert on it
            raw: bytes = priv_obj.sign(digest, mechanism=Mechanism.ECDSA)
            return raw

        der = _low_s_der(self._run("sign", op))
        _verify(public_key, digest, der)
        return der

    # -- the token's AES key and random generator (the HD bank seed's protection) -----------

    @staticmethod
    def _check_secret_label(label: str) -> str:
        if not isinstance(label, str) or not _SECRET_LABEL_RE.fullmatch(label):
            raise SignerRefused("malformed AES key label", field="key_label")
        return label

    @staticmethod
    def _secret_keys(session: Any, label: str) -> list[Any]:
        return list(
            session.get_objects(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.LABEL: label,
                }
            )
        )

    def _one_secret_key(self, session: Any, label: str) -> Any:
        return _exactly_one(self._secret_keys(session, label), f"AES key {label!r}", "key_label")

    @staticmethod
    def _secret_info(label: str, obj: Any) -> SecretKeyInfo:
        return SecretKeyInfo(
            label=label,
            local=bool(obj[Attribute.LOCAL]),
            never_extractable=bool(obj[Attribute.NEVER_EXTRACTABLE]),
            always_sensitive=bool(obj[Attribute.ALWAYS_SENSITIVE]),
            extractable=bool(obj[Attribute.EXTRACTABLE]),
            wrap=bool(obj[Attribute.WRAP]),
            unwrap=bool(obj[Attribute.UNWRAP]),
        )

    def random_bytes(self, count: int) -> bytearray:
        """`count` bytes from the token's random generator (C_GenerateRandom)."""
        if not 1 <= count <= 1024:
            raise SignerRefused("random byte count must be 1..1024", field="count")
        raw: bytes = self._run("random", lambda session: session.generate_random(count * 8))
        if len(raw) != count:
            raise SignerError(f"the token returned {len(raw)} random bytes, not {count}")
        return bytearray(raw)

    def generate_secret_key(self, label: str) -> SecretKeyInfo:
        """Make the AES-256 key that seals the bank's seed: born in the token, sensitive,
        never extractable, usable only to encrypt and decrypt (no wrap: it cannot be used to
        export another key either). One per label; a second is refused."""
        label = self._check_secret_label(label)

        def op(session: Any) -> SecretKeyInfo:
            if self._secret_keys(session, label):
                raise SignerKeyExists(f"the token already has an AES key {label!r}")
            key = session.generate_key(
                KeyType.AES,
                _AES_KEY_BITS,
                label=label,
                store=True,
                template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True,
                    Attribute.WRAP: False,
                    Attribute.UNWRAP: False,
                    Attribute.SIGN: False,
                    Attribute.VERIFY: False,
                    Attribute.DERIVE: False,
                },
            )
            return self._secret_info(label, key)

        info = self._run("AES key generation", op)
        log.info("hsm.seal_key_generated", extra={"label": label})
        return info

    def secret_key_info(self, label: str) -> SecretKeyInfo:
        """Re-read an AES key's evidence attributes from the token."""
        label = self._check_secret_label(label)
        return self._run(
            "AES key lookup",
            lambda session: self._secret_info(label, self._one_secret_key(session, label)),
        )

    def seal(self, label: str, plaintext: bytes | bytearray, aad: bytes) -> SealedBlob:
        """Encrypt inside the token with AES-GCM under `label`; `aad` binds the blob to its
        purpose (a blob sealed for one use is refused for another)."""
        from pkcs11.mechanisms import GCMParams

        label = self._check_secret_label(label)

        def op(session: Any) -> SealedBlob:
            key = self._one_secret_key(session, label)
            iv = bytes(session.generate_random(_GCM_IV_BYTES * 8))
            params = GCMParams(iv, aad, _GCM_TAG_BITS)
            ciphertext: bytes = key.encrypt(
                bytes(plaintext), mechanism=Mechanism.AES_GCM, mechanism_param=params
            )
            return SealedBlob(label, iv, bytes(ciphertext))

        return self._run("seal", op)

    def unseal(self, blob: SealedBlob, aad: bytes) -> bytearray:
        """Decrypt a sealed blob inside the token; a changed blob or `aad` fails the GCM tag
        and is refused. The caller wipes the returned bytearray when done."""
        from pkcs11.mechanisms import GCMParams

        label = self._check_secret_label(blob.key_label)

        def op(session: Any) -> bytearray:
            key = self._one_secret_key(session, label)
            params = GCMParams(blob.iv, aad, _GCM_TAG_BITS)
            try:
                plain = key.decrypt(
                    blob.ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=params
                )
            except (p11e.EncryptedDataInvalid, p11e.EncryptedDataLenRange, p11e.GeneralError):
                raise SignerError(
                    "the sealed seed does not decrypt under the token's AES key (another "
                    "token's blob, or it was changed)"
                ) from None
            return bytearray(plain)

        return self._run("unseal", op)
