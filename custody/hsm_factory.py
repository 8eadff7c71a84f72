"""Builds the bank's HSM from settings: `hsm serve` when CUSTODY_HSM_URL is set,
else the PKCS#11 module in-process. The only place the PIN or the token is read."""

from __future__ import annotations

from custody.bank_hsm import BankHsm, LocalBankHsm, RemoteBankHsm
from custody.config import Settings
from hsm.pkcs11_backend import Pkcs11Signer
from hsm.remote import RemoteSigner


def hsm_from_settings(settings: Settings) -> BankHsm | None:
    """None when nothing is configured: HSM key generation and signing then answer 409/503."""
    if settings.hsm_url:
        token = settings.hsm_serve_token.get_secret_value()
        return RemoteBankHsm(RemoteSigner(settings.hsm_url, token))
    if not settings.hsm_pin.get_secret_value():
        return None
    return LocalBankHsm(
        Pkcs11Signer(settings.hsm_module, settings.hsm_token_label, settings.hsm_pin)
    )
