"""One typed settings object for the whole service (env vars prefixed ``AIPIC_``).

Nothing here touches the disk at import time: paths are derived, never created, until a
command asks for them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

UNSAFE_SECRETS = {"", "changethis", "secret", "dev", "development"}


class Settings(BaseSettings):
    """Configuration of every stage. ``environment=production`` refuses unsafe defaults."""

    model_config = SettingsConfigDict(env_prefix="AIPIC_", env_file=None, extra="ignore")

    environment: Literal["local", "production"] = "local"
    var_dir: Path = Field(default=Path("var"), description="Where all local state lives.")

    # Stores
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_socket_timeout: float = Field(
        default=0.5,
        gt=0,
        description="Seconds one Redis command may wait for its answer; then it fails (scoring degrades).",
    )
    redis_socket_connect_timeout: float = Field(
        default=0.5, gt=0, description="Seconds to open a Redis connection before giving up."
    )
    redis_retries: int = Field(
        default=1,
        ge=0,
        le=5,
        description="Immediate retries of a Redis command on a connection error or timeout (a stale "
        "pooled connection needs one); serving's event state uses no backoff so a dead Redis costs at "
        "most (1 + retries) timeouts.",
    )
    feast_project: str = Field(
        default="aipic",
        pattern=r"^[a-z][a-z0-9_]*$",
        description="Feast project name: namespaces the registry and every online-store key.",
    )
    feast_registry_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the Feast registry; SQLite file under var/ if unset."
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the service's own tables; SQLite under var/ if unset."
    )
    mlflow_tracking_uri: str | None = Field(
        default=None, description="MLflow backend store; SQLite under var/mlflow if unset."
    )

    # Data
    default_users: int = 2000
    default_days: int = 90
    default_seed: int = 7

    # Fraud labels and decisions
    label_delay_days: int = Field(default=21, ge=0, description="Days whose labels are not yet known.")
    policy_version: str = "2025-02-12"
    fraud_review_budget: float = Field(
        default=0.02, gt=0, lt=1, description="Alert budget: at most this share of payments go to review."
    )
    fraud_chargeback_cost: float = Field(
        default=1.25, gt=0, description="Cost of an approved fraud, in multiples of its amount (loss + fees)."
    )
    fraud_false_decline_cost: float = Field(
        default=3.0, gt=0, description="Cost of declining a good payment, in multiples of its amount (churn)."
    )

    # Privacy (features.privacy): consent needs and retention are configuration, not code
    fraud_device_location_consent: str | None = Field(
        default="fraud_device_location_signals",
        description="ConsentPurpose the fraud tier with device/location signals needs; null = none.",
    )
    adult_age: int = Field(default=18, ge=0, description="People younger than this are never profiled.")
    retention_days: dict[str, int | None] = Field(
        default_factory=lambda: dict[str, int | None](
            {
                "user.device.ip_address": 90,
                "user.device.cookie_id": 180,
                "user.device.device_id": 180,
                "user.location.imprecise": 365,
                "user.financial.credit_card": 540,
                "user.behavior.browsing_history": 730,
                "user.privacy_preferences": 1825,
                "user.payment": 3650,
            }
        ),
        description="Days kept per fideslang data category (longest matching key wins; null = no limit).",
    )
    service_table_retention_days: dict[str, int] = Field(
        default_factory=lambda: {"decision_log": 730},
        description="Days kept per service table (decision logs, reviews) by its time column.",
    )
    erasure_tombstone_retention_days: int = Field(
        default=1095, ge=1, description="Days the minimal proof of an erasure is kept (Art 5(2))."
    )

    # Security
    jwt_secret: SecretStr | None = Field(default=None, description="HMAC key for person tokens (JWT).")
    jwt_audience: str = "aipic-ml"
    jwt_issuer: str = "aipicmarket"
    jwt_ttl_minutes: int = Field(
        default=60, ge=1, description="Lifetime of tokens `aipic auth issue-token` prints."
    )

    # Serving (serving/): limits and operations
    api_rate_limit: str = Field(
        default="2000/second", description="Rate limit per API key (`limits` syntax)."
    )
    person_rate_limit: str = Field(default="20/second", description="Rate limit per person token subject.")
    max_body_bytes: int = Field(
        default=65_536, ge=1024, description="Larger request bodies get 422 (invalid input)."
    )
    model_poll_seconds: float = Field(
        default=30.0, ge=0, description="How often serving checks for a new champion (0 = only on reload)."
    )
    online_retry_seconds: float = Field(
        default=2.0, ge=0, description="After an online-store failure, score degraded this long, then retry."
    )
    decision_threads: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Worker threads computing recommendation decisions at once (each a batch of up to 8 "
        "waiting requests): two overlap one's database round trip with the other's ranking; more only "
        "contend for the GIL (8 threads: p99 at 100 req/s 44-686 ms against 32-77 ms with 2, measured "
        "side by side). Also sizes the database connection pool.",
    )
    score_batch_workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Scoring batches decided at once, each in its own thread. One thread used 8-13 % less "
        "server CPU per request than two in side-by-side runs (less contention with the event loop for the "
        "GIL), and requests that arrive during a batch form the next one.",
    )
    score_max_batch: int = Field(
        default=64,
        ge=1,
        le=1024,
        description="Most scoring requests decided together (they share one ledger query, one online-store "
        "round trip and one model call).",
    )
    bench_noop_endpoint: bool = Field(
        default=False, description="Expose POST /v1/bench/noop (benchmark ceiling)."
    )

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.environment == "production":
            secret = self.jwt_secret.get_secret_value() if self.jwt_secret else ""
            if secret.lower() in UNSAFE_SECRETS or len(secret) < 32:
                raise ValueError(
                    "AIPIC_JWT_SECRET must be set to a random value of 32+ characters in production"
                )
            if self.database_url is None or self.database_url.startswith("sqlite"):
                raise ValueError("AIPIC_DATABASE_URL must point to PostgreSQL in production")
        return self

    # Derived locations -------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.var_dir / "data"

    @property
    def events_dir(self) -> Path:
        return self.data_dir / "marketplace"

    @property
    def feature_repo_dir(self) -> Path:
        return self.var_dir / "feature_repo"

    @property
    def mlflow_dir(self) -> Path:
        return self.var_dir / "mlflow"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.var_dir / 'aipic.db').resolve()}"

    @property
    def resolved_mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{(self.mlflow_dir / 'mlflow.db').resolve()}"

    @property
    def mlflow_artifacts_uri(self) -> str:
        return (self.mlflow_dir / "artifacts").resolve().as_uri()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()
