"""Which events name an object the API can return, and where to fetch it.

OpenAI's webhook events are thin: ``data.id`` names the object the event is about. For
the families below the API has a ``GET`` for that object; the path of each is the one
openai-python's resource uses (``client.batches.retrieve`` and so on), which
tests/test_hydrate.py holds the SDK to. Not hydratable: ``eval.run.*`` (the run's
``eval_id`` is not in the event), ``realtime.call.incoming`` and ``live.*`` (no ``GET``:
the event is the whole story) and ``safety_identifier.blocked`` (it carries no id).
"""

from __future__ import annotations

from dataclasses import dataclass

AGENTS_BETA_HEADER = {"OpenAI-Beta": "agents=v1"}


@dataclass(frozen=True, slots=True)
class Hydration:
    """The object behind one family of events."""

    family: str
    """The binding pattern of the events, e.g. ``batch.*``."""
    path: str
    """The API path, with ``{id}`` for the event's ``data.id``."""
    sdk_method: str
    """The SDK's retrieve method, as attribute names from the client."""
    beta: bool = False
    """Whether the call needs ``OpenAI-Beta: agents=v1``."""
    final_statuses: tuple[str, ...] = ()
    """Event types whose last word is a status the object must show once it caught up
    (``batch.completed``: ``status`` is ``completed``); the others are not checked."""

    def path_for(self, object_id: str) -> str:
        return self.path.format(id=object_id)

    def expected_status(self, event_type: str) -> str | None:
        """The ``status`` the object must have after ``event_type``, if it is checked."""
        status = event_type.rsplit(".", 1)[-1]
        return status if status in self.final_statuses else None


HYDRATIONS: tuple[Hydration, ...] = (
    Hydration(
        "batch.*",
        "/batches/{id}",
        "batches.retrieve",
        final_statuses=("completed", "failed", "cancelled", "expired"),
    ),
    Hydration(
        "response.*",
        "/responses/{id}",
        "responses.retrieve",
        final_statuses=("completed", "failed", "cancelled", "incomplete"),
    ),
    Hydration(
        "fine_tuning.job.*",
        "/fine_tuning/jobs/{id}",
        "fine_tuning.jobs.retrieve",
        final_statuses=("succeeded", "failed", "cancelled"),
    ),
    Hydration("video.*", "/videos/{id}", "videos.retrieve", final_statuses=("completed", "failed")),
    Hydration(
        "agent.session.*", "/agents/sessions/{id}", "beta.agents.sessions.retrieve", beta=True
    ),
    Hydration(
        "agent.environment.*",
        "/agents/environments/{id}",
        "beta.agents.environments.retrieve",
        beta=True,
    ),
    Hydration("safety.alert.created", "/safety/alerts/{id}", "safety.alerts.retrieve"),
    Hydration("safety.org_alert.created", "/safety/alerts/{id}", "safety.alerts.retrieve"),
    Hydration("safety.warning_issued", "/safety/cases/{id}", "safety.cases.retrieve"),
    Hydration("safety.deactivation_issued", "/safety/cases/{id}", "safety.cases.retrieve"),
)

BINDING_PATTERNS: tuple[str, ...] = tuple(hydration.family for hydration in HYDRATIONS)
"""What the hydration queue is bound to on the main exchange: the hydratable types only."""


def hydration_for(event_type: str) -> Hydration | None:
    """The hydration of ``event_type``, or ``None`` when its object cannot be fetched."""
    for hydration in HYDRATIONS:
        family = hydration.family
        if family.endswith(".*"):
            prefix = family[:-1]
            if event_type.startswith(prefix) and "." not in event_type[len(prefix) :]:
                return hydration
        elif event_type == family:
            return hydration
    return None
