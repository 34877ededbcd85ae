"""The hydration worker's settings: ``BRIDGE_*`` shared with the bridge, ``hydrate_*`` fields
of its own, and OpenAI's own variable names for the API (``OPENAI_API_KEY``,
``OPENAI_BASE_URL``, ``OPENAI_ORG_ID`` and ``OPENAI_PROJECT_ID``, as openai-python reads
them; ``OPENAI_ORGANIZATION`` and ``OPENAI_PROJECT`` are taken too)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AliasChoices,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from bridge.hydrate.fetching import UnknownSource
from bridge.redis_url import redact_redis_url
from bridge.settings import (
    ENV_PREFIX,
    LogFormat,
    LogLevel,
    QueueType,
    Seconds,
    SettingsError,
    SourceNames,
    bridge_setting,
    checked_redis_url,
    default_secrets_dir,
    settings_error,
)
from bridge.sources import SourceError, source_api_key

__all__ = ["HydrateSettings", "HydrationNames", "load_hydrate_settings"]

API_KEY_VARIABLE = "OPENAI_API_KEY"


class HydrationNames:
    """The queue and exchanges of hydration, named after the main exchange."""

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        self.queue = f"{exchange}.hydrate"
        self.objects = f"{exchange}.objects"
        self.objects_unrouted = f"{exchange}.objects.unrouted"
        self.failed = f"{exchange}.objects.failed"


class HydrateSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,
        populate_by_name=True,
    )

    amqp_url: SecretStr = bridge_setting("amqp_url")
    amqp_ca_file: Path | None = bridge_setting("amqp_ca_file")
    exchange: str = bridge_setting("exchange")
    queue_type: QueueType = Field(
        default="quorum",
        description="Type of the queues of unroutable objects and failure records (the "
        "hydration queue itself is always a quorum queue).",
    )
    declare_topology: bool = bridge_setting("declare_topology")
    publish_timeout: Seconds = Field(
        default=5.0,
        description="Seconds to wait for the broker's confirm of a publish, and for each "
        "broker call.",
    )
    log_level: LogLevel = "INFO"
    log_format: LogFormat = bridge_setting("log_format")
    openai_api_key: SecretStr = Field(
        default=SecretStr(""),
        validation_alias=AliasChoices(API_KEY_VARIABLE),
        description="The API key objects are fetched with (OpenAI's own variable name). "
        "Required without BRIDGE_SOURCES; with it, each source's own key is used "
        "(OPENAI_API_KEY_<NAME>, or the file <name>/OPENAI_API_KEY in BRIDGE_SECRETS_DIR) "
        "and this one, if set, only for events without a source.",
    )
    sources: SourceNames = Field(
        default=(),
        description="The bridge's BRIDGE_SOURCES: each source's events are fetched with that "
        "project's API key; an event of a source not listed is recorded as failed "
        "(unknown_source).",
    )
    openai_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENAI_BASE_URL"),
        description="The API's base URL; unset: https://api.openai.com/v1.",
    )
    openai_organization: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENAI_ORG_ID", "OPENAI_ORGANIZATION"),
        description="The organization the calls are made for (OpenAI-Organization header); "
        "also read from OPENAI_ORGANIZATION.",
    )
    openai_project: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENAI_PROJECT_ID", "OPENAI_PROJECT"),
        description="The project the calls are made for (OpenAI-Project header); also read "
        "from OPENAI_PROJECT.",
    )
    hydrate_rate: Annotated[float, Field(gt=0, le=10_000)] = Field(
        default=5.0,
        description="API calls per second, for the whole worker; a 429 pauses every call "
        "for its Retry-After.",
    )
    hydrate_concurrency: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=8,
        description="Events hydrated at once (and unacknowledged messages held) per worker.",
    )
    hydrate_api_timeout: Annotated[float, Field(gt=0, le=600)] = Field(
        default=30.0,
        description="Seconds one API call may take before it counts as a timeout.",
    )
    hydrate_attempts: Annotated[int, Field(ge=1, le=100)] = Field(
        default=5,
        description="Calls for one event answered 5xx or timing out before the event is "
        "handed back to the queue, BRIDGE_HYDRATE_REQUEUE_DELAY later.",
    )
    hydrate_requeue_delay: Annotated[float, Field(gt=0, le=86_400)] = Field(
        default=60.0,
        description="Seconds an event the API kept failing for waits (in a retry queue) "
        "before it is tried again.",
    )
    hydrate_requeues: Annotated[int, Field(ge=0, le=10_000)] = Field(
        default=60,
        description="Hand-backs of one event before it is recorded as failed "
        "(<exchange>.objects.failed).",
    )
    hydrate_stale_attempts: Annotated[int, Field(ge=0, le=20)] = Field(
        default=3,
        description="Fetches again, with back-off, of an object that does not yet show what "
        "its event says; then it is published with x-object-stale: true.",
    )
    hydrate_backoff: Annotated[float, Field(gt=0, le=600)] = Field(
        default=0.5,
        description="Seconds before the first retry of a failed or stale fetch; doubled at "
        "each next one (with jitter), at most 30 s.",
    )
    hydrate_auth_retry: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=60.0,
        description="While the API refuses the key (401), seconds between tries of it.",
    )
    hydrate_idempotency_url: SecretStr = Field(
        default=SecretStr(""),
        description="A Redis shared by all workers, to skip events whose object was "
        "published, in any form BRIDGE_DEDUP_URL takes (redis://, rediss://, "
        "redis+sentinel://, redis+cluster://); empty: this process only.",
    )
    hydrate_claim_ttl: Annotated[float, Field(gt=0, le=86_400)] = Field(
        default=600.0,
        description="Seconds a worker's claim on an event outlives the worker (Redis "
        "store): a redelivered copy waits this long after a crash before it is fetched.",
    )
    hydrate_host: str = Field(
        default="0.0.0.0",  # noqa: S104  # a container must listen beyond loopback
        description="The address of the worker's /healthz, /readyz and /metrics.",
    )
    hydrate_metrics_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=8082,
        description="The port of the worker's /healthz, /readyz and /metrics; 0: none.",
    )

    @field_validator("hydrate_idempotency_url")
    @classmethod
    def _redis_url(cls, value: SecretStr) -> SecretStr:
        return checked_redis_url(value)

    _source_keys: dict[str, SecretStr] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _a_key_without_sources(self) -> HydrateSettings:
        if not self.sources and not self.openai_api_key.get_secret_value().strip():
            raise ValueError(f"{API_KEY_VARIABLE} is required (the key objects are fetched with)")
        return self

    def load_source_keys(self, secrets_dir: Path, environment: Mapping[str, str]) -> None:
        """Read each source's API key; raises :class:`SettingsError` for a source without
        one (an API key belongs to one project: another's would read nothing of it)."""
        try:
            self._source_keys = {
                name: SecretStr(source_api_key(name, secrets_dir, environment))
                for name in self.sources
            }
        except SourceError as error:
            raise SettingsError(str(error)) from None

    def api_key_for(self, source: str | None) -> str:
        """The API key for the events of ``source`` (their ``x-webhook-source`` header, or
        ``None``); raises :class:`UnknownSource` when there is none for it."""
        key = self.openai_api_key if source is None else self._source_keys.get(source)
        if key is None or not key.get_secret_value().strip():
            raise UnknownSource(source)
        return key.get_secret_value()

    @property
    def names(self) -> HydrationNames:
        return HydrationNames(self.exchange)

    @property
    def idempotency_url_redacted(self) -> str:
        return redact_redis_url(self.hydrate_idempotency_url.get_secret_value())


def load_hydrate_settings(secrets_dir: Path | None = None, **overrides: Any) -> HydrateSettings:
    """Read ``overrides``, the environment and secret files (``OPENAI_API_KEY`` among them)."""
    secrets_dir = secrets_dir or default_secrets_dir()
    directory = secrets_dir if secrets_dir.is_dir() else None
    try:
        settings = HydrateSettings(_secrets_dir=directory, **overrides)
    except ValidationError as error:
        raise settings_error(error) from None
    settings.load_source_keys(secrets_dir, os.environ)
    return settings
