"""The signer's own configuration (`HSM_*`), every default defined once, here.

Why separate from the service's settings: the signer's limits (fee caps, daily limit,
price rules) are the bank's policy, and a caller must not be able to loosen them. The
service never passes a limit to the signer; both transports build the signer from this.
Secrets (`HSM_PIN`, `HSM_SERVE_TOKEN`, `HSM_NODE_RPC_PASSWORD`) are SecretStr: never
printed, logged or returned.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pledge.network import NetworkName

__all__ = ["SignerSettings"]


class SignerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HSM_", extra="ignore")

    network: NetworkName = "regtest"
    # PKCS#11 token
    module: str = "/usr/lib/softhsm/libsofthsm2.so"
    token_label: str = "custody-bank"
    pin: SecretStr = SecretStr("")
    # `hsm serve`
    serve_token: SecretStr = SecretStr("")
    port: int = Field(default=8790, ge=1, le=65535)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)  # a PSBT of a loan's coins is small
    # its own records
    state_db: Path = Path("./hsm-state.db")
    # its own node (read-only; may be another node than the service's)
    node_rpc_url: str = "http://127.0.0.1:18443"
    node_rpc_user: str = "hsm"
    node_rpc_password: SecretStr = SecretStr("")
    node_rpc_timeout: float = 10.0
    address_gap: int = Field(default=20, ge=1, le=1000)  # unused addresses scanned past the last
    # limits
    daily_limit_sats: int = Field(default=10 * 100_000_000, ge=0)
    max_fee_sats: int = Field(default=1_000_000, ge=0)
    max_fee_rate_sat_vb: Decimal = Field(default=Decimal(200), gt=0)
    approval_ttl_seconds: int = Field(default=24 * 3600, ge=60, le=7 * 24 * 3600)
    # its own price
    price_sources: list[dict[str, Any]] = Field(default_factory=list)
    price_max_age_seconds: int = Field(default=900, ge=1)
    price_max_spread_bps: int = Field(default=200, ge=0)
    price_min_sources: int = Field(default=1, ge=1)
    desk_quote_max_age_seconds: int = Field(default=900, ge=1)
    valuation_max_age_seconds: int = Field(default=300, ge=1)
    # A margin call counts towards its cure window only while the signer keeps looking at
    # the loan at least this often (the risk engine asks every pass); a longer gap restarts it.
    cure_watch_gap_seconds: int = Field(default=900, ge=1)

    @field_validator("max_fee_rate_sat_vb")
    @classmethod
    def _finite(cls, value: Decimal) -> Decimal:
        if not value.is_finite():
            raise ValueError("must be a finite number")
        return value
