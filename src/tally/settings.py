"""One settings object, read from `TALLY_*` environment variables and checked at start-up."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tally.events.validation import Name
from tally.ratelimit.interface import MAX_BURST, MAX_RATE


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TALLY_", extra="ignore", frozen=True)

    database_url: str = Field(
        default="sqlite:///tally.db",
        description="sqlite:///PATH (embedded, the default) or postgresql://USER@HOST/DB",
    )
    # Least privilege on PostgreSQL (store/grants.py): the owner migrates and grants, the
    # service runs as TALLY_DATABASE_URL's role. Unset, that one role does both (development).
    owner_database_url: str | None = Field(
        default=None,
        validate_default=True,
        description="postgresql://OWNER@HOST/DB: the role that owns the schema and migrates it",
    )
    service_role: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_$-]{0,62}$",
        description="The service's PostgreSQL role (default: the one TALLY_DATABASE_URL uses)",
    )
    keyring: str | None = Field(
        default=None,
        description=(
            "The master keys: a keyring file, or command:PROGRAM ARGS printing one. Unset on "
            "SQLite: PATH.keyring beside the database, made on first start."
        ),
    )
    region: Name = Field(default="local", description="The region this server stores events in.")
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_batch_events: int = Field(default=1000, ge=1, le=10_000)
    commit_max_events: int = Field(default=5000, ge=1, le=100_000)
    pool_size: int = Field(default=10, ge=1, le=200)
    log_level: str = Field(default="info", pattern="^(debug|info|warning|error)$")
    log_json: bool = Field(default=True, description="JSON log lines (false: human-readable).")
    # Encryption in transit: with a certificate and its key the server speaks HTTPS only.
    tls_cert: Path | None = Field(default=None, description="PEM certificate chain (HTTPS).")
    tls_key: Path | None = Field(
        default=None, validate_default=True, description="PEM private key of tls_cert."
    )
    tls_client_ca: Path | None = Field(
        default=None,
        validate_default=True,
        description="PEM CA bundle: clients must present a certificate it signed (mutual TLS).",
    )
    # Resource limits (OWASP API4), so one client cannot exhaust the server. The server-side
    # ones apply per worker process.
    max_header_bytes: int = Field(default=16 * 1024, ge=4 * 1024, le=1024 * 1024)
    request_timeout_seconds: int = Field(default=30, ge=1, le=600)
    keepalive_timeout_seconds: int = Field(default=5, ge=1, le=300)
    max_connections: int = Field(default=1000, ge=1, le=100_000)
    # Drain (api/drain.py): after SIGTERM, how long in-flight requests have to finish, and
    # how long at least the listener stays open answering 503 (for health-checking balancers).
    drain_seconds: int = Field(default=10, ge=1, le=600)
    drain_notice_seconds: int = Field(default=0, ge=0, le=600)
    # X-Forwarded-For/-Proto name the client's address (the audit log's source) and scheme;
    # anyone can send them, so they count only from these peers. Empty: from nobody.
    trusted_proxies: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="IP addresses or CIDR networks, comma-separated, whose proxy headers count",
    )
    # Rate limits (ratelimit/): requests and events per second, per API key and per tenant,
    # each with a burst (the most units at once; unset: one second's worth, and for events at
    # least max_batch_events). A rate of 0 turns that limit off. Without redis_url each
    # process limits on its own; with it, every worker and replica shares the limits.
    redis_url: str | None = Field(
        default=None, description="redis://[:PASSWORD@]HOST:PORT/DB holding shared rate limits"
    )
    redis_key_prefix: str = Field(default="tally:ratelimit:", min_length=1, max_length=64)
    redis_timeout_ms: int = Field(default=250, ge=10, le=10_000)
    rate_key_requests_per_second: int = Field(default=10_000, ge=0, le=MAX_RATE)
    rate_key_requests_burst: int | None = Field(default=None, ge=1, le=MAX_BURST)
    rate_key_events_per_second: int = Field(default=100_000, ge=0, le=MAX_RATE)
    rate_key_events_burst: int | None = Field(default=None, ge=1, le=MAX_BURST)
    rate_tenant_requests_per_second: int = Field(default=10_000, ge=0, le=MAX_RATE)
    rate_tenant_requests_burst: int | None = Field(default=None, ge=1, le=MAX_BURST)
    rate_tenant_events_per_second: int = Field(default=100_000, ge=0, le=MAX_RATE)
    rate_tenant_events_burst: int | None = Field(default=None, ge=1, le=MAX_BURST)
    # How long a process may answer from its copy of a key or a tenant (freshness.py): a
    # revocation, shred or tenant change made through another process or replica is seen by
    # this one within it; one made through this process at once. 0: read the store per request.
    cache_seconds: float = Field(default=1.0, ge=0, le=60)
    # Metrics (metrics.py): on a port of their own, not exposed with the API; unset, on the
    # API port at /metrics for admin keys.
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="Serve /metrics on this port, not the API's"
    )
    metrics_host: str = Field(
        default="127.0.0.1", min_length=1, description="The address TALLY_METRICS_PORT binds"
    )

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

    @field_validator("tls_cert", "tls_key", "tls_client_ca")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                value.open("rb").close()
            except OSError as error:
                raise ValueError(f"cannot read {value}: {error.strerror or error}") from None
        return value

    @field_validator("tls_key", "tls_client_ca")
    @classmethod
    def _with_cert(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if "tls_cert" not in info.data:  # tls_cert itself was refused; that error says it
            return value
        cert = info.data["tls_cert"]
        if info.field_name == "tls_key" and (cert is None) != (value is None):
            missing = (
                "TALLY_TLS_KEY (--tls-key)" if value is None else "TALLY_TLS_CERT (--tls-cert)"
            )
            raise ValueError(f"a certificate and its private key go together: set {missing} too")
        if info.field_name == "tls_client_ca" and value is not None and cert is None:
            raise ValueError(
                "client certificates need HTTPS: set TALLY_TLS_CERT and TALLY_TLS_KEY too"
            )
        return value

    @field_validator("owner_database_url")
    @classmethod
    def _owner_on_postgresql(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        if not value.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
            raise ValueError("must be postgresql://OWNER@HOST:PORT/DATABASE")
        if str(info.data.get("database_url", "")).startswith("sqlite:"):
            raise ValueError("is for PostgreSQL: set TALLY_DATABASE_URL to a postgresql:// URL")
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: object) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ValueError("TALLY_TRUSTED_PROXIES must be IP addresses or CIDR networks")
        networks: list[str] = []
        for item in (str(item).strip() for item in items):
            if not item:
                continue
            try:
                network = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"TALLY_TRUSTED_PROXIES must be IP addresses or CIDR networks separated "
                    f"by commas (e.g. 10.0.0.5,10.1.0.0/16): {item!r} is neither"
                ) from None
            networks.append(str(network))
        return tuple(networks)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None or value.startswith(("redis://", "rediss://", "unix://")):
            return value
        raise ValueError("TALLY_REDIS_URL must be redis://HOST:PORT/DB, rediss://… or unix://PATH")

    @model_validator(mode="after")
    def _notice_within_drain(self) -> Settings:
        if self.drain_notice_seconds >= self.drain_seconds:
            raise ValueError(
                f"TALLY_DRAIN_NOTICE_SECONDS ({self.drain_notice_seconds}) must be below "
                f"TALLY_DRAIN_SECONDS ({self.drain_seconds}), which bounds the whole drain: "
                "raise TALLY_DRAIN_SECONDS or lower the notice"
            )
        return self

    @model_validator(mode="after")
    def _full_batches_fit_event_limits(self) -> Settings:
        holders: tuple[Literal["key", "tenant"], ...] = ("key", "tenant")
        for holder in holders:
            rate, burst = self.rate_limit(holder, "events")
            if rate > 0 and burst < self.max_batch_events:
                name = f"TALLY_RATE_{holder.upper()}_EVENTS_BURST"
                raise ValueError(
                    f"{name} ({burst}) is below TALLY_MAX_BATCH_EVENTS "
                    f"({self.max_batch_events}), so a full batch could never pass: raise "
                    f"{name} or lower TALLY_MAX_BATCH_EVENTS"
                )
        return self

    def rate_limit(
        self, holder: Literal["key", "tenant"], unit: Literal["requests", "events"]
    ) -> tuple[int, int]:
        """(per second, burst) of one rate limit; per second 0 means the limit is off."""
        rate = int(getattr(self, f"rate_{holder}_{unit}_per_second"))
        burst: int | None = getattr(self, f"rate_{holder}_{unit}_burst")
        if burst is None:
            burst = max(rate, self.max_batch_events if unit == "events" else 1)
        return rate, burst

    @property
    def sqlite_path(self) -> Path | None:
        if self.database_url.startswith("sqlite:///"):
            return Path(self.database_url.removeprefix("sqlite:///"))
        return None
