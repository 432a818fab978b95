"""Configuration from `BACKOUT_*` environment variables (pydantic-settings)."""

from __future__ import annotations

import re
from functools import cached_property

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sagas.engine import EngineSettings


class Settings(BaseSettings):
    """Every setting of the worker, CLI and web API (DESIGN §5).

    Each field is read from `BACKOUT_<NAME>`; e.g. `BACKOUT_DATABASE_URL`.
    """

    model_config = SettingsConfigDict(env_prefix="BACKOUT_", extra="ignore")

    broker: str = Field(
        default="kafka://localhost:9092",
        description="Kafka bootstrap servers, e.g. kafka://host1:9092;host2:9092.",
    )
    database_url: str = Field(
        default="sqlite+aiosqlite:///backout.db",
        description="Ledger database (SQLAlchemy async URL): SQLite or postgresql+asyncpg.",
    )
    sagas: str = Field(default="", description="Comma-separated saga module paths.")
    event_topics: str = Field(
        default="", description="Comma-separated tracked topics (overrides the pattern)."
    )
    event_topic_pattern: str = Field(
        default=r".*\.events", description="Regex of tracked topics, matched on the whole name."
    )
    topic_prefix: str = Field(default="backout.", description="Prefix of Backout's own topics.")
    app_id: str = Field(
        default="backout", description="faust app id and consumer-group prefix of the worker."
    )
    web_host: str = Field(default="127.0.0.1", description="Address the HTTP API listens on.")
    web_port: int = Field(default=6066, ge=0, le=65535, description="Port of the HTTP API.")
    api_token: str | None = Field(default=None, description="Bearer token of mutating endpoints.")
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest HTTP request body accepted, in bytes."
    )
    alert_deployment_label: str = Field(
        default="deployment_id", description="Alert label naming the deployment to roll back."
    )
    alert_service_label: str = Field(
        default="service", description="Alert label naming the service (with the version label)."
    )
    alert_version_label: str = Field(
        default="version", description="Alert label naming the service version to roll back."
    )
    signal_key: str | None = Field(
        default=None, description="HMAC key; when set, unsigned signals are rejected."
    )
    max_compensations: int = Field(
        default=10_000, ge=1, description="Blast-radius guard: larger rollbacks need force."
    )
    concurrency: int = Field(default=64, ge=1, description="Compensations in flight at once.")
    quarantine_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="How long late events of a rolled-back deployment are compensated.",
    )
    catch_up_seconds: float = Field(
        default=10.0,
        ge=0,
        description="How long a signal waits for tracking to catch up with the event "
        "topics before its blast radius is read (0: not at all).",
    )
    unknown_events: str = Field(
        default="dlq",
        description="What to do with event types no saga declares: 'dlq' or 'track'.",
    )
    topic_partitions: int = Field(default=4, ge=1, description="Partitions of Backout's topics.")
    topic_replication: int = Field(default=1, ge=1, description="Replication of Backout's topics.")
    session_timeout: float = Field(
        default=6.0, gt=0, description="Consumer group session timeout, seconds."
    )
    heartbeat_interval: float = Field(default=0.5, gt=0, description="Heartbeat interval, seconds.")
    commit_interval: float = Field(default=0.5, gt=0, description="faust commit interval, seconds.")
    tracker_batch_size: int = Field(default=2000, ge=1, description="Records per tracking batch.")
    topic_refresh_seconds: float = Field(
        default=5.0, gt=0, description="How often the topic pattern is re-resolved."
    )
    poll_interval: float = Field(
        default=0.5, gt=0, description="How often runs re-read the ledger for outside changes."
    )
    trace_file: str | None = Field(default=None, description="Console span exporter's file.")
    data_dir: str | None = Field(
        default=None,
        description="faust's data folder (it keeps nothing there that matters: no tables); "
        "default: <system temp folder>/backout-<app_id>.",
    )
    log_level: str = Field(default="info", description="Log level of the worker.")

    @field_validator("unknown_events")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in ("dlq", "track"):
            raise ValueError("must be 'dlq' or 'track'")
        return value

    @field_validator("event_topic_pattern")
    @classmethod
    def _valid_regex(cls, value: str) -> str:
        re.compile(value)
        return value

    @field_validator("database_url")
    @classmethod
    def _async_ledger_url(cls, value: str) -> str:
        from sagas.ledger.connection import ledger_url

        return ledger_url(value)

    @property
    def bootstrap_servers(self) -> str:
        """`host:port[,host:port]` for aiokafka, from `kafka://a:1;b:2` or `a:1,b:2`."""
        text = self.broker
        for scheme in ("kafka://", "aiokafka://"):
            text = text.replace(scheme, "")
        return ",".join(part for part in re.split(r"[;,]", text) if part)

    @property
    def faust_broker(self) -> str:
        """The broker URL in faust's form."""
        return ";".join(f"kafka://{s}" for s in self.bootstrap_servers.split(","))

    def topic(self, name: str) -> str:
        """A Backout topic name: `rollbacks` → `backout.rollbacks`."""
        return f"{self.topic_prefix}{name}"

    @property
    def signals_topic(self) -> str:
        """Where rollback signals arrive."""
        return self.topic("rollbacks")

    @property
    def status_topic(self) -> str:
        """Where status records go."""
        return self.topic("status")

    @property
    def dlq_topic(self) -> str:
        """Where dead letters go."""
        return self.topic("dlq")

    @property
    def tracked_topic_names(self) -> list[str]:
        """Explicit tracked topics (empty when the pattern is used)."""
        return [t.strip() for t in self.event_topics.split(",") if t.strip()]

    @cached_property
    def tracked_pattern(self) -> re.Pattern[str]:
        """The topic pattern, anchored on the whole topic name."""
        return re.compile(rf"(?:{self.event_topic_pattern})\Z")

    @property
    def saga_modules(self) -> list[str]:
        """The saga module paths."""
        return [m.strip() for m in self.sagas.split(",") if m.strip()]

    def engine_settings(self) -> EngineSettings:
        """The engine's share of the settings."""
        return EngineSettings(
            max_compensations=self.max_compensations,
            concurrency=self.concurrency,
            quarantine_seconds=self.quarantine_seconds,
            poll_interval=self.poll_interval,
            catch_up_seconds=self.catch_up_seconds,
        )
