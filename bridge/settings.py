"""All configuration, read once at start-up from ``BRIDGE_*`` variables and secret files."""

from __future__ import annotations

import os
import ssl
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from yarl import URL

from bridge.signature import InvalidSecretError, decode_secret

ENV_PREFIX = "BRIDGE_"
DEFAULT_SECRETS_DIR = Path("/run/secrets/webhook-bridge")
DEFAULT_EXCHANGE = "openai.webhooks"

def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)]
LogFormat = Literal["auto", "json", "text"]
Seconds = Annotated[float, Field(gt=0)]


class SettingsError(Exception):
    """Configuration that must stop the process, as one line naming the setting."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,
    )

    webhook_secret: Annotated[SecretStr, NoDecode] = Field(
        description="One or more whsec_ secrets, comma-separated; any one matching passes."
    )
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672/")
    amqp_ca_file: Path | None = None
    exchange: Annotated[str, Field(min_length=1, max_length=200)] = DEFAULT_EXCHANGE
    quarantine_exchange: str = ""
    unrouted_exchange: str = ""
    declare_topology: bool = True
    host: str = "0.0.0.0"  # noqa: S104  # a container must listen beyond loopback
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    timestamp_tolerance: Annotated[int, Field(ge=1, le=86_400)] = 300
    max_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 256 * 1024
    publish_timeout: Seconds = 5.0
    body_timeout: Seconds = 10.0
    max_publishes_in_flight: Annotated[int, Field(ge=1, le=10_000)] = 32
    drain_timeout: Seconds = 20.0
    retry_after: Annotated[int, Field(ge=1)] = 5
    dedup_window: Annotated[float, Field(ge=0)] = 600.0
    dedup_max_ids: Annotated[int, Field(ge=0)] = 100_000
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    log_level: LogLevel = "INFO"
    log_format: LogFormat = "auto"

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: SecretStr) -> SecretStr:
        url = URL(value.get_secret_value())
        if url.scheme not in ("amqp", "amqps") or not url.host:
            raise ValueError("must be an amqp:// or amqps:// URL with a host")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _usable_secrets(cls, value: SecretStr) -> SecretStr:
        _decode_secrets(value)
        return value

    @model_validator(mode="after")
    def _default_exchange_names(self) -> Settings:
        self.quarantine_exchange = self.quarantine_exchange or f"{self.exchange}.quarantine"
        self.unrouted_exchange = self.unrouted_exchange or f"{self.exchange}.unrouted"
        return self

    @cached_property
    def signing_keys(self) -> tuple[bytes, ...]:
        return _decode_secrets(self.webhook_secret)

    @property
    def amqp_url_redacted(self) -> str:
        url = URL(self.amqp_url.get_secret_value())
        return str(url.with_password("***")) if url.password else str(url)

    def amqp_ssl_context(self) -> ssl.SSLContext | None:
        """TLS context for ``amqps://``: the system CAs, or the configured CA bundle."""
        if URL(self.amqp_url.get_secret_value()).scheme != "amqps":
            return None
        return ssl.create_default_context(
            cafile=str(self.amqp_ca_file) if self.amqp_ca_file else None
        )


def _decode_secrets(value: SecretStr) -> tuple[bytes, ...]:
    keys = []
    for position, secret in enumerate(value.get_secret_value().split(","), start=1):
        try:
            keys.append(decode_secret(secret))
        except InvalidSecretError as error:
            raise ValueError(f"secret #{position} {error}") from None
    return tuple(keys)


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def default_secrets_dir() -> Path:
    return Path(os.environ.get(f"{ENV_PREFIX}SECRETS_DIR", DEFAULT_SECRETS_DIR))


def load_settings(secrets_dir: Path | None = None, **overrides: Any) -> Settings:
    """Read ``overrides`` (command-line flags), the environment and secret files, in that
    order of precedence.

    Secret files are read from ``secrets_dir`` (default ``$BRIDGE_SECRETS_DIR`` or
    ``/run/secrets/webhook-bridge``) if it exists: one file per setting, named like its
    variable. Raises :class:`SettingsError` with one line per bad setting, never a value.
    """
    secrets_dir = secrets_dir or default_secrets_dir()
    directory = secrets_dir if secrets_dir.is_dir() else None
    try:
        return Settings(_secrets_dir=directory, **overrides)
    except ValidationError as error:
        problems = []
        for detail in error.errors(include_url=False, include_input=False):
            field = str(detail["loc"][0]) if detail["loc"] else "settings"
            message = detail["msg"].removeprefix("Value error, ")
            if detail["type"] == "missing":
                message = "is required"
            problems.append(f"{env_name(field)} {message}")
        raise SettingsError("; ".join(problems)) from None
