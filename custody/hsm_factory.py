"""Builds the bank's HSM signer from settings. The only place the PIN is read."""

from __future__ import annotations

from custody.config import Settings
from hsm.pkcs11_backend import Pkcs11Signer


def hsm_from_settings(settings: Settings) -> Pkcs11Signer | None:
    """None when no PIN is configured: the API then refuses HSM key generation (409)."""
    pin = settings.hsm_pin.get_secret_value()
    if not pin:
        return None
    return Pkcs11Signer(settings.hsm_module, settings.hsm_token_label, settings.hsm_pin)
