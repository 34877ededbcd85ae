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
from bridge.setting_docs import variable_name
from bridge.settings import ENV_PREFIX, SECRETS_DIR_VARIABLE, Settings, SettingsError, env_name


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
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in valid:
            raise SettingsError(_unknown(f"environment variable {name}", name, valid))
    for name in sorted(_visible_entries(secrets_dir)):
        if name.upper() not in valid:
            raise SettingsError(_unknown(f"file {name} in {secrets_dir}", name, valid))


def _visible_entries(directory: Path) -> Iterable[str]:
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    except OSError as error:
        raise SettingsError(
            f"cannot list {directory} ({SECRETS_DIR_VARIABLE}): {error.strerror}"
        ) from None
    return [entry.name for entry in entries if not entry.name.startswith(".")]


def _unknown(what: str, name: str, valid: frozenset[str]) -> str:
    closest = difflib.get_close_matches(name.upper(), sorted(valid), n=1, cutoff=0.6)
    hint = f"; did you mean {closest[0]}?" if closest else "; no setting has a similar name"
    return f"unknown setting: {what}{hint}"
