"""Bank-side signing: the `Signer` interface (hsm.signer) and its PKCS#11 backend
(hsm.pkcs11_backend). Kept import-light: importing `hsm` does not load PKCS#11."""

from hsm.signer import (
    Signer,
    SignerBusy,
    SignerError,
    SignerKeyExists,
    SignerKeyNotFound,
    SignerRefused,
    SignerUnavailable,
)

__all__ = [
    "Signer",
    "SignerBusy",
    "SignerError",
    "SignerKeyExists",
    "SignerKeyNotFound",
    "SignerRefused",
    "SignerUnavailable",
]
