"""The bank's signer as the service reaches it, from settings: `hsm serve` when
CUSTODY_HSM_URL is set, else the signer's code in this process (its own `HSM_*`
settings: token, registry file, node, price sources; never on mainnet), else none."""

from __future__ import annotations

from custody.config import Settings
from hsm.client import BankSigner, HttpTransport, InProcessTransport
from hsm.signer import SignerUnavailable


def signer_from_settings(settings: Settings) -> BankSigner | None:
    """None when nothing is configured: HSM keys and signatures then answer 503."""
    if settings.hsm_url:
        token = settings.hsm_serve_token.get_secret_value()
        return BankSigner(HttpTransport(settings.hsm_url, token))
    from hsm.settings import SignerSettings

    signer_settings = SignerSettings()
    if not signer_settings.pin.get_secret_value():
        return None
    if settings.network == "mainnet" or signer_settings.network == "mainnet":
        # In process, the token's PIN and the unsealed bank seed would live in the
        # service's process, which the signer must not trust.
        raise SignerUnavailable(
            "on mainnet the bank's signer runs as its own process: start `hsm serve` and set "
            "CUSTODY_HSM_URL (an in-process signer keeps its PIN and seed in the service's "
            "process)"
        )
    from hsm.factory import build_core

    core = build_core(signer_settings)
    return BankSigner(InProcessTransport(core, max_body_bytes=signer_settings.max_body_bytes))
