"""One settings object, read from `TALLY_*` environment variables and checked at start-up."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tally.events.validation import Name


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TALLY_", extra="ignore", frozen=True)

    database_url: str = Field(
        default="sqlite:///tally.db",
        description="sqlite:///PATH (embedded, the default) or postgresql://USER@HOST/DB",
    )
    region: Name = Field(default="local", description="The region this server stores events in.")
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_batch_events: int = Field(default=1000, ge=1, le=10_000)
    commit_max_events: int = Field(default=5000, ge=1, le=100_000)
    pool_size: int = Field(default=10, ge=1, le=200)
    log_level: str = Field(default="info", pattern="^(debug|info|warning|error)$")
    log_json: bool = Field(default=True, description="JSON log lines (false: human-readable).")

    @field_validator("database_url")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
            return value
        if value.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
            return value
        raise ValueError(
            "TALLY_DATABASE_URL must be sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE"
        )

    @property
    def sqlite_path(self) -> Path | None:
        if self.database_url.startswith("sqlite:///"):
            return Path(self.database_url.removeprefix("sqlite:///"))
        return None
