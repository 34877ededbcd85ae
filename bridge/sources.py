"""Sources: several OpenAI projects through one bridge, each with its own path and secrets.

``BRIDGE_SOURCES`` names them. Each source's secret list is read like the single one:
from ``BRIDGE_WEBHOOK_SECRET_<NAME>`` (the name upper-cased, ``-`` as ``_``) or from the
file ``BRIDGE_SECRETS_DIR/<name>/BRIDGE_WEBHOOK_SECRET``, which is polled and re-read on
SIGHUP. No secret may belong to two sources: a webhook it signs would not say which
project sent it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from bridge.secrets import (
    SECRET_FILE_NAME,
    SecretReloadError,
    SecretSource,
    find_secret_file,
    read_secret_text,
)
from bridge.signature import InvalidSecretError, decode_secret_list

SOURCE_HEADER = "x-webhook-source"
"""The AMQP header naming the source of a message; absent without ``BRIDGE_SOURCES``."""
SOURCE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
SOURCE_NAME_RULE = "lowercase letters, digits and '-', starting with a letter or digit, at most 63"
API_KEY_FILE_NAME = "OPENAI_API_KEY"
MAX_API_KEY_FILE_BYTES = 4096


class SourceError(Exception):
    """A source configuration that must stop the process; one line, never a secret."""


def parse_source_names(text: str) -> tuple[str, ...]:
    """The names in comma-separated ``text``, checked; raises ValueError naming the bad one."""
    names = [name.strip() for name in text.split(",")] if text.strip() else []
    for position, name in enumerate(names, start=1):
        if SOURCE_NAME.fullmatch(name) is None:
            shown = repr(name) if len(name) <= 70 else f"#{position}"
            raise ValueError(f"source {shown} is not a valid name ({SOURCE_NAME_RULE} characters)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"source {repeated[0]!r} is named twice")
    return tuple(names)


def source_exchange_name(exchange: str, source: str) -> str:
    """The topic exchange of one source's events (``BRIDGE_EXCHANGE`` = ``exchange``)."""
    return f"{exchange}.source.{source}"


def check_source_name(name: str) -> str:
    if SOURCE_NAME.fullmatch(name) is None:
        raise ValueError(f"{name!r} is not a source name ({SOURCE_NAME_RULE} characters)")
    return name


def variable_suffix(name: str) -> str:
    return name.upper().replace("-", "_")


def secret_variable(name: str) -> str:
    return f"{SECRET_FILE_NAME}_{variable_suffix(name)}"


def api_key_variable(name: str) -> str:
    return f"{API_KEY_FILE_NAME}_{variable_suffix(name)}"


def source_directory(secrets_dir: Path, name: str) -> Path:
    return secrets_dir / name


@dataclass(frozen=True, slots=True)
class SourceSecrets:
    """One source's secret list as read at start-up, and where from."""

    name: str
    secret: SecretStr
    origin: SecretSource
    keys: tuple[bytes, ...] = field(repr=False)


def load_source_secrets(
    names: Sequence[str], secrets_dir: Path, environment: Mapping[str, str]
) -> tuple[SourceSecrets, ...]:
    """Every source's secrets: its variable first, then its file; raises :class:`SourceError`
    for a source without usable secrets, a secret given for no source, or a shared secret."""
    _refuse_strays(names, secrets_dir, environment)
    found = tuple(_load_one(name, secrets_dir, environment) for name in names)
    shared = shared_secret(found)
    if shared is not None:
        raise SourceError(
            f"sources {shared[0]!r} and {shared[1]!r} share a webhook secret, so a webhook it "
            "signs could come from either: give each OpenAI project its own endpoint secret"
        )
    return found


def shared_secret(
    sources: Iterable[tuple[str, Sequence[bytes]] | SourceSecrets],
) -> tuple[str, str] | None:
    """The names of two sources holding the same key, if any."""
    owner: dict[bytes, str] = {}
    for source in sources:
        name, keys = (source.name, source.keys) if isinstance(source, SourceSecrets) else source
        for key in keys:
            other = owner.setdefault(key, name)
            if other != name:
                return other, name
    return None


def source_api_key(name: str, secrets_dir: Path, environment: Mapping[str, str]) -> str:
    """The OpenAI API key of one source's project: ``OPENAI_API_KEY_<NAME>``, else the file
    ``<secrets_dir>/<name>/OPENAI_API_KEY``; raises :class:`SourceError` without one."""
    variable = api_key_variable(name)
    given = environment.get(variable, "").strip()
    if given:
        return given
    path = source_directory(secrets_dir, name) / API_KEY_FILE_NAME
    text = ""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read(MAX_API_KEY_FILE_BYTES).strip()
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as error:
        raise SourceError(f"cannot read {path}: {type(error).__name__}") from None
    if text:
        return text
    raise SourceError(
        f"source {name!r} has no OpenAI API key: set {variable}, or write its project's key to "
        f"{path}"
    )


def _load_one(name: str, secrets_dir: Path, environment: Mapping[str, str]) -> SourceSecrets:
    variable = secret_variable(name)
    given = next((value for key, value in environment.items() if key.upper() == variable), None)
    path = find_secret_file(source_directory(secrets_dir, name))
    if given is not None:
        origin, where = SecretSource(f"the {variable} environment variable"), variable
        text = given
    elif path is not None:
        origin, where = SecretSource(f"the file {path}", path), str(path)
        try:
            text = read_secret_text(path)
        except SecretReloadError as error:
            raise SourceError(f"source {name!r}: {where}: {error}") from None
    else:
        raise SourceError(
            f"source {name!r} has no webhook secret: set {variable}, or write its secrets to "
            f"{source_directory(secrets_dir, name) / SECRET_FILE_NAME}"
        )
    try:
        keys = decode_secret_list(text)
    except InvalidSecretError as error:
        raise SourceError(f"source {name!r}: {where}: {error}") from None
    return SourceSecrets(name, SecretStr(text), origin, keys)


def _refuse_strays(names: Sequence[str], secrets_dir: Path, environment: Mapping[str, str]) -> None:
    """A secret for a source that is not configured is a typo or a leftover: stop on it."""
    prefix = f"{SECRET_FILE_NAME}_"
    expected = {secret_variable(name) for name in names}
    for key in sorted(environment):
        if key.upper().startswith(prefix) and key.upper() not in expected:
            raise SourceError(
                f"environment variable {key} names no source in BRIDGE_SOURCES "
                f"({', '.join(names) or 'none set'}): add the source or remove the variable"
            )
    if not names:
        return  # without sources, the directory's entries are checked as settings
    with contextlib.suppress(OSError):
        for entry in sorted(secrets_dir.iterdir()):
            if entry.is_dir() and not entry.name.startswith(".") and entry.name not in names:
                raise SourceError(
                    f"directory {entry} names no source in BRIDGE_SOURCES "
                    f"({', '.join(names)}): "
                    "add the source or remove the directory"
                )
