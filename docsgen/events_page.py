"""docs/reference/events.md: the modelled event types and their ``data`` fields."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from itertools import groupby
from typing import get_args, get_origin

from pydantic import BaseModel

from bridge.events import EVENT_MODELS, KNOWN_EVENT_TYPES, UnknownWebhookEvent
from bridge.events.base import WebhookEventEnvelope
from docsgen.markdown import (
    attribute_docs,
    code,
    describe_type,
    first_paragraph,
    optional_inner,
    page,
    prose,
    table,
)

FIELD_HEADINGS = ("Field", "Type", "Required", "Description")


def _nested_model(annotation: object) -> tuple[type[BaseModel], str] | None:
    """The model a field holds (``SipHeader`` of ``list[SipHeader]``) and its path suffix."""
    inner = optional_inner(annotation)
    suffix = ""
    if get_origin(inner) is list:
        (inner,) = get_args(inner)
        suffix = "[]"
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        return inner, suffix
    return None


def field_rows(
    model: type[BaseModel], prefix: str = "", docs: dict[str, str] | None = None
) -> Iterator[list[str]]:
    """One row per field, and per field of the models it holds (``connect.remote_url``)."""
    docs = docs or attribute_docs(model)
    for name, field in model.model_fields.items():
        yield [
            code(prefix + name),
            prose(describe_type(optional_inner(field.annotation), field.metadata)),
            "yes" if field.is_required() else "no",
            prose(docs.get(name)),
        ]
        nested = _nested_model(field.annotation)
        if nested is not None:
            inner, suffix = nested
            yield from field_rows(inner, f"{prefix}{name}{suffix}.")


def _family(event_type: str) -> str:
    return EVENT_MODELS[event_type].__module__


def _event_section(event_type: str) -> str:
    model = EVENT_MODELS[event_type]
    data = model.model_fields["data"].annotation
    assert isinstance(data, type)
    assert issubclass(data, BaseModel)
    return "\n\n".join(
        (
            f"### `{event_type}`",
            f"{prose(inspect.cleandoc(model.__doc__ or ''))} Model: {code(model.__name__)}; "
            f"`data` is {code(data.__name__)}.",
            table(FIELD_HEADINGS, field_rows(data, "data.")),
        )
    )


def _family_sections() -> Iterator[str]:
    for module_name, types in groupby(sorted(KNOWN_EVENT_TYPES, key=_family_key), key=_family):
        module = importlib.import_module(module_name)
        family = module_name.rsplit(".", 1)[1].replace("_", " ")
        yield f"## {family[:1].upper()}{family[1:]}"
        yield prose(first_paragraph(module.__doc__))
        yield from (_event_section(event_type) for event_type in types)


def _family_key(event_type: str) -> tuple[str, str]:
    return _family(event_type), event_type


def render() -> str:
    return page(
        "Event types",
        f"The bridge models {len(KNOWN_EVENT_TYPES)} event types, as OpenAI's SDK does. The "
        "event's `type` is the routing key of the message that carries it. Every model keeps "
        "fields it does not declare, because OpenAI adds optional fields without notice.",
        "## Every event",
        "Besides `type` and `data`, every event carries these fields:",
        table(FIELD_HEADINGS, field_rows(WebhookEventEnvelope)),
        "## Types the bridge does not model",
        f"{prose(first_paragraph(UnknownWebhookEvent.__doc__))} Such an event is published "
        "like a known one, routed by its `type`, with `x-event-validated: false` (see "
        "[messages](messages.md)); one whose envelope is unusable is quarantined. "
        "[Delivery guarantees](../explanation/delivery-guarantees.md) says why.",
        table(
            FIELD_HEADINGS,
            field_rows(
                UnknownWebhookEvent,
                docs=attribute_docs(WebhookEventEnvelope) | attribute_docs(UnknownWebhookEvent),
            ),
        ),
        *_family_sections(),
    )
