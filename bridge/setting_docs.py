"""What each setting is, as a person reads it: variable, kind, default, allowed values.

Read from the settings models themselves, so ``--help`` and the settings reference page
describe the same settings the code reads, and cannot drift from them.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings
from yarl import URL

from bridge.settings import SHOWN_DEFAULT, Settings, env_name, redact_url


@dataclass(frozen=True, slots=True)
class SettingDoc:
    field: str
    variable: str
    kind: str
    default: str
    choices: tuple[str, ...]
    description: str
    is_switch: bool


def setting_docs(model: type[BaseSettings] = Settings) -> list[SettingDoc]:
    """One entry per field of ``model``, in the model's order."""
    return [_document(name, field) for name, field in model.model_fields.items()]


def _document(name: str, field: FieldInfo) -> SettingDoc:
    annotation = _unwrap(field.annotation)
    choices = _choices(annotation)
    return SettingDoc(
        field=name,
        variable=variable_name(name, field),
        kind="one of" if choices else _kind(annotation),
        default=_default(field),
        choices=choices,
        description=field.description or "",
        is_switch=annotation is bool,
    )


def variable_name(name: str, field: FieldInfo) -> str:
    """The variable a field is read from: ``BRIDGE_<FIELD>``, or the name it is read by
    instead (``OPENAI_API_KEY``: OpenAI's own, and the first of several)."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    if isinstance(alias, str):
        return alias
    return env_name(name)


def _unwrap(annotation: Any) -> Any:
    """The type without ``Annotated`` metadata and without ``| None``."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return annotation


def _choices(annotation: Any) -> tuple[str, ...]:
    if typing.get_origin(annotation) is Literal:
        return tuple(str(value) for value in typing.get_args(annotation))
    return ()


_KINDS: dict[Any, str] = {
    bool: "true or false",
    int: "integer",
    float: "number",
    str: "text",
    Path: "path",
    SecretStr: "secret",
    tuple[str, ...]: "names, comma-separated",
}


def _kind(annotation: Any) -> str:
    return _KINDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "(required)"
    extra = field.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get(SHOWN_DEFAULT), str):
        return str(extra[SHOWN_DEFAULT])
    value = field.default
    if isinstance(value, SecretStr):
        text = value.get_secret_value()
        return redact_url(URL(text)) if "://" in text else ("(empty)" if not text else "(set)")
    if value is None or value == "" or value == ():
        return "(empty)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
