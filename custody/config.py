"""Service configuration, read from the environment (12-factor) with safe defaults.

Every variable the service reads is a field here; docker-compose.yml is checked
against this list by a test, so a typo in deployment config fails CI.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pledge.network import NetworkName


class HttpPriceSourceConfig(BaseModel):
    name: str
    url: str
    field_path: str
    time_path: str | None = None
    timeout: float = 5.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CUSTODY_", extra="ignore")

    network: NetworkName = "regtest"
    database_url: str = Field(
        default="sqlite:///./custody.db",
        validation_alias=AliasChoices("DATABASE_URL", "CUSTODY_DATABASE_URL"),
    )

    # Bitcoin node JSON-RPC (Bitcoin Core in production, btcd on regtest).
    node_rpc_url: str = "http://127.0.0.1:18443"
    node_rpc_user: str = "custody"
    node_rpc_password: SecretStr = SecretStr("")
    node_rpc_timeout: float = 30.0
    # Blocks over Bitcoin Core's REST interface (`-rest=1`; binary, no JSON): "auto" asks a
    # node on this machine only (REST has no authentication), "on" any node (one on a
    # private network, reachable through its `-rpcallowip`), "off" never.
    node_rest: Literal["auto", "on", "off"] = "auto"

    # API server. Loopback unless an operator deliberately says otherwise.
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    # Capacity. The API runs its endpoints on `api_threads` threads; each holds at most a
    # database connection or two while it runs, so the pool (`db_pool_size` plus
    # `db_max_overflow`, per pool; PostgreSQL has two per process, writes and reads)
    # should cover them. A request that waits longer than
    # `db_pool_timeout_seconds` for a connection answers 503, and past
    # `api_limit_concurrency` connections and requests in flight uvicorn answers 503 at
    # once: overload is refused fast, never a queue that freezes the service. On
    # PostgreSQL keep every process's pools together under the server's
    # `max_connections`: a connection it refuses is answered 503 too, but only once tried.
    api_threads: int = Field(default=40, ge=1)
    # The GIL switch interval of a `custody serve` process, in ms (custody.api.server:
    # settle_server_process; Python's default is 5)
    api_gil_switch_ms: float = Field(default=0.5, gt=0, le=100)
    # API worker processes of one `custody serve` (each with its own threads and pool)
    api_workers: int = Field(default=1, ge=1, le=64)
    api_limit_concurrency: int = Field(default=200, ge=1)
    # uvicorn's line per request (the audit log already records every change, with who)
    api_access_log: bool = False
    db_pool_size: int = Field(default=40, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    db_pool_timeout_seconds: float = Field(default=5.0, gt=0)

    # The bank's HSM (PKCS#11). The PIN is a secret: never logged, never returned.
    # The bank's signer. Separate process: `hsm serve` at this loopback/https URL with its
    # bearer token. Otherwise it runs in this process from its own HSM_* settings
    # (hsm.settings: token, PIN, registry, node, prices, limits), never from these.
    hsm_url: str | None = None
    hsm_serve_token: SecretStr = SecretStr("")

    # Deposit watcher. A deposit counts after `confirmations_small` blocks, or
    # `confirmations_large` from `large_deposit_sats` up, unless the loan says otherwise.
    confirmations_small: int = 1
    confirmations_large: int = 3
    large_deposit_sats: int = 100_000_000
    watch_start_height: int | None = None  # first block to scan; default: the tip at first start
    watch_poll_seconds: float = 1.0
    # One watcher per database: its lease is renewed every third of this by a thread
    # of its own (so never lost during a slow node call), and a watcher that dies is
    # taken over about this long after. The renewal stops once a step has shown no
    # progress for `watch_stuck_seconds` (longer than any node call may take).
    watch_lease_seconds: float = Field(default=5.0, gt=0)
    watch_stuck_seconds: float = Field(default=120.0, gt=0)
    # A watcher whose steps fail this many polls in a row raises `watcher.stalled`
    # (once, then `watcher.recovered`); /v1/health says `stalled` when its last
    # progress is older than this many polls. The health check asks the node for its
    # tip with this timeout.
    watch_stall_polls: int = Field(default=10, ge=1)
    health_node_timeout_seconds: float = Field(default=2.0, gt=0)
    # Intents whose outcome is unknown (a crash between a call to the node or the signer
    # and the record of its answer) are reconciled by `custody watch` this often, once
    # older than the grace (longer than any call may take).
    reconcile_seconds: float = 30.0
    reconcile_grace_seconds: float = 120.0

    # `custody watch | risk | notify --metrics-port`: the process's own Prometheus metrics
    # on 127.0.0.1 at this port (none when unset). `custody serve` has /v1/metrics.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)

    # Fees for transactions the service builds: the node's estimate, held in these bounds.
    fee_rate_floor_sat_vb: float = 2.0
    fee_rate_ceiling_sat_vb: float = 200.0
    max_fee_sats: int = 1_000_000

    # Risk engine: the manual price plus these HTTP JSON sources (a JSON list in the
    # environment), their median, how old a quote may be and how far sources may disagree.
    price_sources: list[HttpPriceSourceConfig] = Field(default_factory=list)
    price_max_age_seconds: int = 900
    price_max_spread_bps: int = 200
    price_min_sources: int = 1
    risk_poll_seconds: float = 10.0
    # An automatic liquidation still unsigned this long after it was made (the engine died
    # or the signer was away between making it and the signature) is cancelled and rebuilt
    # by the next pass: longer than a call to the signer may take.
    risk_unsigned_grace_seconds: float = Field(default=60.0, gt=0)
    # Loans a risk pass works on at once, each in its own transactions and signer calls:
    # with the bank's signer in its own process (`hsm serve`) their CPU overlaps (default
    # 3 then); 1 with the signer in this process, where more only contend for the GIL.
    risk_concurrency: int | None = Field(default=None, ge=1, le=16)
    # Webhook delivery (`custody notify`): each attempt waits at most `notify_timeout_seconds`
    # for the receiver; a claimed event is someone's for `notify_claim_seconds`, after which
    # another worker takes it (a worker that died mid-delivery: sent again, same event id).
    notify_timeout_seconds: float = Field(default=10.0, gt=0)
    notify_claim_seconds: float = Field(default=300.0, gt=0)
    # `custody risk` and `custody notify` beat after every pass (a long pass beats as it
    # goes): /v1/health shows each process, not alive once it has not beaten for this long.
    worker_stale_seconds: float = Field(default=60.0, gt=0)
    # The manual price (`POST /v1/prices`) is proposed by one person and takes effect only
    # when a second confirms it, within `price_proposal_ttl_seconds`. It is refused (at the
    # proposal, and again at the confirmation) when it is more than
    # `price_manual_max_deviation_bps` away from the HTTP sources' median (when they have
    # one), or dated more than `price_future_skew_seconds` ahead of our clock; the median
    # leaves out quotes from further ahead than that too.
    price_manual_max_deviation_bps: int = Field(default=500, ge=0, le=10_000)
    price_proposal_ttl_seconds: int = Field(default=900, gt=0, le=7 * 24 * 3600)
    price_future_skew_seconds: int = Field(default=30, ge=0, le=3600)

    # The web console (/console). Its origin is what browsers show in the address bar: the
    # passkeys' relying party is its host (WebAuthn takes a domain name, not an IP address:
    # "localhost" on this machine), and every form's Origin header must be it. Default:
    # http://localhost:<api_port>. A session ends after `console_idle_seconds` without a
    # request of the person's own (a page's polling does not count); an invitation link
    # works once, within `console_invitation_hours`.
    console_origin: str | None = None
    console_idle_seconds: int = Field(default=900, gt=0, le=24 * 3600)
    console_invitation_hours: int = Field(default=72, gt=0, le=30 * 24)

    # AML screening (custody/screening): the built-in provider (the bank's lists in the
    # database) always runs; a commercial service's HTTP API too when its URL is set (its
    # key a secret: never logged, never stored). The worst answer wins; an unreachable,
    # slow or garbled service answers `review` (fail closed). A funding transaction with
    # more inputs than `screening_review_inputs_over` goes to review (unset: no such rule).
    screening_http_url: str | None = None
    screening_http_api_key: SecretStr = SecretStr("")
    screening_http_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    screening_review_inputs_over: int | None = Field(default=None, ge=1)

    @field_validator("api_host")
    @classmethod
    def _host_not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("api_host must not be empty")
        return value

    @model_validator(mode="after")
    def _stuck_outlasts_a_node_call(self) -> Settings:
        if self.watch_stuck_seconds <= self.node_rpc_timeout:
            raise ValueError(
                "watch_stuck_seconds must exceed node_rpc_timeout: a step waiting for the "
                "node would otherwise let its lease lapse"
            )
        return self

    @model_validator(mode="after")
    def _claim_outlasts_an_attempt(self) -> Settings:
        if self.notify_claim_seconds <= self.notify_timeout_seconds:
            raise ValueError(
                "notify_claim_seconds must exceed notify_timeout_seconds: an event would "
                "otherwise be taken by a second worker while the first still sends it"
            )
        return self

    @property
    def risk_pass_concurrency(self) -> int:
        """`risk_concurrency`, else 3 with `hsm serve` (`hsm_url`) and 1 without. Measured on
        the liquidation storm (200 loans, 2 cores, hsm serve): 59, 44, 39 and 39 ms a loan
        at 1, 2, 3 and 4 loans at once; in process, 2 at once was slower than 1."""
        if self.risk_concurrency is not None:
            return self.risk_concurrency
        return 3 if self.hsm_url else 1

    @property
    def console_url(self) -> str:
        """The console's origin, without a trailing slash."""
        return (self.console_origin or f"http://localhost:{self.api_port}").rstrip("/")

    @property
    def is_mainnet(self) -> bool:
        return self.network == "mainnet"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
