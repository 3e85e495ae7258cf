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
    default_days: int = 60
    default_seed: int = 7

    # Fraud labels and decisions
    label_delay_days: int = Field(default=30, ge=0, description="Days whose labels are not yet known.")
    policy_version: str = "2025-02-12"

    # Security
    jwt_secret: SecretStr | None = Field(default=None, description="HMAC key for person tokens (JWT).")
    jwt_audience: str = "aipic-ml"
    jwt_issuer: str = "aipicmarket"

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
