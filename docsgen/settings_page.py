"""docs/reference/settings.md: every ``BRIDGE_*`` variable, from the settings models."""

from __future__ import annotations

from typing import get_args

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from bridge.consumer import ConsumerSettings
from bridge.hydrate import HydrateSettings
from bridge.setting_docs import SettingDoc, setting_docs
from bridge.setting_names import hydration_setting_names, valid_setting_names
from bridge.settings import DEFAULT_SECRETS_DIR, SECRETS_DIR_VARIABLE, Settings, env_name
from docsgen.markdown import bounds, code, page, prose, table

# Names the package reads besides the model fields; the page fails to generate when
# bridge.setting_names knows one that is not described here.
OTHER_NAMES = {
    SECRETS_DIR_VARIABLE: (
        code(DEFAULT_SECRETS_DIR),
        "Directory of secret files, one per setting, each named like its variable "
        f"(e.g. {code(env_name('webhook_secret'))}); read when it exists. A value from the "
        "environment wins over a file.",
    ),
}


def described(field: FieldInfo, name: str, fallback: type[BaseSettings] = Settings) -> str:
    """The field's description, or that of the bridge's setting of the same name."""
    if field.description:
        return field.description
    shared = fallback.model_fields.get(name)
    return shared.description or "" if shared is not None else ""


def undescribed_settings() -> list[str]:
    """Variables whose meaning the code does not say (an empty cell on the page)."""
    return sorted(
        env_name(name)
        for model in (Settings, ConsumerSettings, HydrateSettings)
        for name, field in model.model_fields.items()
        if not described(field, name)
    )


def _allowed(doc: SettingDoc, field: FieldInfo) -> str:
    if doc.choices:
        return ", ".join(code(choice) for choice in doc.choices)
    return prose(", ".join(bounds(field.metadata) or bounds(_inner_metadata(field))))


def _inner_metadata(field: FieldInfo) -> list[object]:
    """Constraints of ``Annotated[int, Field(ge=1)] | None``, inside the union."""
    return [
        item
        for member in get_args(field.annotation)
        for info in get_args(member)[1:]
        if isinstance(info, FieldInfo)
        for item in info.metadata
    ]


def _default(doc: SettingDoc) -> str:
    return doc.default if doc.default.startswith("(") else code(doc.default)


def _rows(model: type[BaseSettings]) -> list[list[str]]:
    return [
        [
            code(doc.variable),
            doc.kind,
            _allowed(doc, model.model_fields[doc.field]),
            _default(doc),
            prose(described(model.model_fields[doc.field], doc.field)),
        ]
        for doc in setting_docs(model)
    ]


def render() -> str:
    other = sorted(
        valid_setting_names()
        - {env_name(name) for name in Settings.model_fields}
        - hydration_setting_names()
    )
    if missing := [name for name in other if name not in OTHER_NAMES]:
        raise ValueError(f"describe {', '.join(missing)} in docsgen/settings_page.py OTHER_NAMES")
    headings = ("Variable", "Type", "Allowed", "Default", "Meaning")
    return page(
        "Settings",
        "Every setting is read once at start-up from its environment variable, or from a "
        f"file named like the variable in {code(SECRETS_DIR_VARIABLE)}. The flags of "
        "[`webhook-bridge serve`](cli.md#serve) override them. An unknown `BRIDGE_*` "
        "variable or file stops `serve`, naming the closest valid one; a bad value stops it "
        "with one line naming the setting, exit status 2. Secrets are never shown.",
        "## The bridge (`webhook-bridge serve`)",
        table(headings, _rows(Settings)),
        "## Consumers (`webhook-bridge consume`, `EventConsumer`)",
        "The consumer library and the `consume` command read these, with the same meaning "
        "as the bridge's; no webhook secret is needed unless signatures are re-checked.",
        table(headings, _rows(ConsumerSettings)),
        "## The hydration worker (`webhook-bridge hydrate`)",
        "The worker reads the bridge's broker settings with the same meaning, its own "
        "hydration settings, and OpenAI's own variables for the API, as "
        "openai-python reads them (see [Hydration](../explanation/hydration.md)). "
        "`OPENAI_API_KEY` may be a file in the secrets directory.",
        table(headings, _rows(HydrateSettings)),
        "## Where settings are read from",
        table(
            ("Variable", "Default", "Meaning"),
            ([code(name), *OTHER_NAMES[name]] for name in other),
        ),
    )
