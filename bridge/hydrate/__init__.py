"""Hydration: the full object behind each thin event, fetched once for every consumer.

``webhook-bridge hydrate`` consumes ``<exchange>.hydrate`` (the hydratable event types,
:mod:`bridge.hydrate.mapping`), fetches each event's object through openai-python
(:mod:`bridge.hydrate.api`, the ``hydrate`` extra) and publishes the API's exact bytes to
the topic exchange ``<exchange>.objects``, routed by event type
(:mod:`bridge.hydrate.worker`, imported from there: it needs the metrics module,
which needs this package's mapping).
"""

from bridge.hydrate.fetching import ApiAnswer, ApiFailure, FailureKind, Fetcher
from bridge.hydrate.mapping import BINDING_PATTERNS, HYDRATIONS, Hydration, hydration_for
from bridge.hydrate.settings import HydrateSettings, HydrationNames, load_hydrate_settings

__all__ = [
    "BINDING_PATTERNS",
    "HYDRATIONS",
    "ApiAnswer",
    "ApiFailure",
    "FailureKind",
    "Fetcher",
    "HydrateSettings",
    "Hydration",
    "HydrationNames",
    "hydration_for",
    "load_hydrate_settings",
]
