"""The one settings object every process (API, consumers, trainer) is built from."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The longest horizon a forecast may ask for (ten years).
MAX_HORIZON_DAYS = 3650


class Settings(BaseSettings):
    """Read from the environment with the prefix ``CLV_``; built once in an entry point and
    passed inward (nothing builds one at import time)."""

    # `model_dir` is a setting, not pydantic API: older pydantic-settings reserve "model_"
    model_config = SettingsConfigDict(
        env_prefix="CLV_", frozen=True, extra="ignore", protected_namespaces=("settings_",)
    )

    kafka_bootstrap: str = "localhost:9092"
    redis_url: str = "redis://localhost:6379/0"
    orders_topic: str = "orders"
    alerts_topic: str = "churn-alerts"
    dlq_topic: str = "orders.dlq"
    consumer_group: str = "clv-features"
    archiver_group: str = "clv-archiver"
    model_dir: Path = Path("./models")
    event_log_dir: Path = Path("./data/events")
    horizon_days: int = Field(365, ge=1, le=MAX_HORIZON_DAYS)
    clock: Literal["wall", "event"] = "wall"
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = None

    # Ingestion knobs (not in the contract's table; documented in README "Settings").
    max_event_bytes: int = Field(64 * 1024, ge=256)
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$")  # ISO 4217
    future_tolerance_seconds: int = Field(86_400, ge=0)
    orders_partitions: int = Field(8, ge=1)
    consume_batch: int = Field(5000, ge=1)
    archive_flush_events: int = Field(50_000, ge=1)
    archive_flush_seconds: float = Field(5.0, gt=0)
    key_prefix: str = "clv"

    @field_validator("model_dir", "event_log_dir", mode="before")
    @classmethod
    def _not_empty(cls, v: object) -> object:
        """An empty variable is a mistake, not the current directory."""
        if isinstance(v, str) and not v.strip():
            raise ValueError("must be a directory path, not empty")
        return v

    def as_env(self) -> dict[str, str]:
        """These settings as the ``CLV_`` variables that rebuild them in a child process."""
        return {f"CLV_{k.upper()}": str(v) for k, v in self.model_dump().items() if v is not None}
