"""The bank's signer as the service reaches it, from settings: `hsm serve` when
CUSTODY_HSM_URL is set, else the signer's code in this process (its own `HSM_*`
settings: token, registry file, node, price sources), else none."""

from __future__ import annotations

from custody.config import Settings
from hsm.client import BankSigner, HttpTransport, InProcessTransport


def signer_from_settings(settings: Settings) -> BankSigner | None:
    """None when nothing is configured: HSM keys and signatures then answer 503."""
    if settings.hsm_url:
        token = settings.hsm_serve_token.get_secret_value()
        return BankSigner(HttpTransport(settings.hsm_url, token))
    from hsm.settings import SignerSettings

    signer_settings = SignerSettings()
    if not signer_settings.pin.get_secret_value():
        return None
    from hsm.factory import build_core

    core = build_core(signer_settings)
    return BankSigner(InProcessTransport(core, max_body_bytes=signer_settings.max_body_bytes))
