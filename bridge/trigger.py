"""Sending signed sample webhooks to a running bridge, the way OpenAI sends them."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from bridge.app import WEBHOOK_PATH
from bridge.samples import new_webhook_id, sample_body
from bridge.signature import sign

__all__ = [
    "DEFAULT_URL",
    "SignedWebhook",
    "TriggerResult",
    "post_all",
    "post_webhook",
    "sign_samples",
]

DEFAULT_URL = f"http://localhost:8080{WEBHOOK_PATH}"
_SHOWN_BODY_CHARACTERS = 200


@dataclass(frozen=True, slots=True)
class SignedWebhook:
    """A sample event's exact bytes and the Standard Webhooks headers signing them."""

    event_type: str
    event_id: str
    webhook_id: str
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class TriggerResult:
    """What the bridge answered to one webhook; ``status`` is ``None`` when nothing answered."""

    webhook: SignedWebhook
    status: int | None
    outcome: str

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def line(self) -> str:
        status = "---" if self.status is None else str(self.status)
        return f"{status} {self.webhook.event_type:<25} {self.webhook.webhook_id} {self.outcome}"

    def json_line(self) -> str:
        return json.dumps(
            {
                "status": self.status,
                "type": self.webhook.event_type,
                "webhook_id": self.webhook.webhook_id,
                "event_id": self.webhook.event_id,
                "outcome": self.outcome,
            }
        )


def sign_samples(
    event_types: Iterable[str],
    key: bytes,
    *,
    overrides: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
) -> list[SignedWebhook]:
    """One fresh sample event per type, signed with ``key``.

    Raises :class:`bridge.samples.UnknownEventTypeError` for a type without a
    sample, and ``ValueError`` for an override path that leads nowhere, before
    anything is signed.
    """
    bodies = [
        (event_type, sample_body(event_type, overrides=overrides, clock=clock))
        for event_type in event_types
    ]
    webhooks = []
    for event_type, body in bodies:
        webhook_id = new_webhook_id()
        timestamp = int(clock())
        event_id = json.loads(body).get("id")
        webhooks.append(
            SignedWebhook(
                event_type=event_type,
                event_id=event_id if isinstance(event_id, str) else "",
                webhook_id=webhook_id,
                headers={
                    "webhook-id": webhook_id,
                    "webhook-timestamp": str(timestamp),
                    "webhook-signature": sign(key, webhook_id, timestamp, body),
                    "content-type": "application/json",
                },
                body=body,
            )
        )
    return webhooks


async def post_webhook(
    session: aiohttp.ClientSession, url: str, webhook: SignedWebhook
) -> TriggerResult:
    """POST one webhook; a failed connection is a result too, never an exception."""
    try:
        async with session.post(url, data=webhook.body, headers=dict(webhook.headers)) as response:
            text = await response.text(errors="replace")
            return TriggerResult(webhook, response.status, _outcome(text))
    except (aiohttp.ClientError, TimeoutError) as error:
        return TriggerResult(webhook, None, f"error: {_describe(error)}")


async def post_all(
    url: str, webhooks: Iterable[SignedWebhook], *, request_timeout: float = 10.0
) -> AsyncIterator[TriggerResult]:
    """POST the webhooks one after the other, in order, yielding each answer as it comes."""
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for webhook in webhooks:
            yield await post_webhook(session, url, webhook)


def _outcome(text: str) -> str:
    try:
        answer: Any = json.loads(text)
    except ValueError:
        return text.strip()[:_SHOWN_BODY_CHARACTERS]
    if not isinstance(answer, dict):
        return text.strip()[:_SHOWN_BODY_CHARACTERS]
    if "outcome" in answer:
        return str(answer["outcome"])
    return ": ".join(str(answer[key]) for key in ("error", "detail") if key in answer)


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no answer in time"
    return str(error) or type(error).__name__
