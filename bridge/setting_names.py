"""Unknown setting names stop ``serve``: a typo must not run silently with a default.

The valid names come from :class:`bridge.settings.Settings` and, since one configuration
often serves both, the hydration worker's :class:`bridge.hydrate.HydrateSettings` at run
time, so every setting added there is valid here without a second list to keep in step.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path

from bridge.hydrate.settings import HydrateSettings
from bridge.secrets import SECRET_FILE_NAME
from bridge.setting_docs import variable_name
from bridge.settings import ENV_PREFIX, SECRETS_DIR_VARIABLE, Settings, SettingsError, env_name

SOURCES_VARIABLE = env_name("sources")


def valid_setting_names() -> frozenset[str]:
    """Every ``BRIDGE_*`` setting, and the hydration worker's ``OPENAI_*`` ones (a secrets
    directory may hold ``OPENAI_API_KEY``)."""
    return (
        frozenset(env_name(field) for field in Settings.model_fields)
        | {SECRETS_DIR_VARIABLE}
        | hydration_setting_names()
    )


def hydration_setting_names() -> frozenset[str]:
    return frozenset(
        variable_name(name, field) for name, field in HydrateSettings.model_fields.items()
    )


def check_setting_names(environment: Mapping[str, str], secrets_dir: Path) -> None:
    """Raise :class:`SettingsError` naming the first unknown ``BRIDGE_*`` variable or
    secrets file, and the closest valid setting.

    Hidden entries of ``secrets_dir`` are not settings: Kubernetes keeps its ``..data``
    link and timestamped ``..2024_...`` directories there.
    """
    valid = valid_setting_names()
    for name in sorted(environment):
        upper = name.upper()
        # Each source's variable is checked against BRIDGE_SOURCES with the sources.
        if upper.startswith(ENV_PREFIX) and upper not in valid and not is_source_secret(upper):
            raise SettingsError(_unknown(f"environment variable {name}", name, valid))
    with_sources = (
        any(name.upper() == SOURCES_VARIABLE for name in environment)
        or (secrets_dir / SOURCES_VARIABLE).is_file()
    )
    for name in sorted(_visible_entries(secrets_dir, with_sources=with_sources)):
        if name.upper() not in valid:
            raise SettingsError(_unknown(f"file {name} in {secrets_dir}", name, valid))


def is_source_secret(variable: str) -> bool:
    return variable.startswith(f"{SECRET_FILE_NAME}_")


def _visible_entries(directory: Path, *, with_sources: bool) -> Iterable[str]:
    """The entries naming settings: with sources, directories hold each source's secrets
    and are checked with the sources."""
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    except OSError as error:
        raise SettingsError(
            f"cannot list {directory} ({SECRETS_DIR_VARIABLE}): {error.strerror}"
        ) from None
    return [
        entry.name
        for entry in entries
        if not entry.name.startswith(".") and not (with_sources and entry.is_dir())
    ]


def _unknown(what: str, name: str, valid: frozenset[str]) -> str:
    closest = difflib.get_close_matches(name.upper(), sorted(valid), n=1, cutoff=0.6)
    hint = f"; did you mean {closest[0]}?" if closest else "; no setting has a similar name"
    return f"unknown setting: {what}{hint}"
