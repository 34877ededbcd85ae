"""One event taken from a queue, and the checks a stored message passes before it is one."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeAlias

from aio_pika.abc import AbstractIncomingMessage

from bridge.consumer.retry import RetryQueues, retry_count, settle
from bridge.consumer.stores import IdempotencyStore
from bridge.dedup.store import StoreUnavailable
from bridge.events import UnknownWebhookEvent, UnwrapWebhookEvent
from bridge.signature import (
    SignatureVerifier,
    WebhookHeaders,
    WebhookVerificationError,
    decode_secret,
)
from bridge.sources import SOURCE_HEADER
from bridge.tracing import TraceContext, message_context

logger = logging.getLogger(__name__)

WebhookEvent: TypeAlias = UnwrapWebhookEvent | UnknownWebhookEvent
"""A known event's model, or the envelope of a type this version does not model."""

Handler: TypeAlias = Callable[[WebhookEvent], Awaitable[None]]

# Queued messages are legitimately old (a consumer may have been down for hours), and the
# bridge already applied the replay window when OpenAI delivered them: only the HMAC is
# re-checked here (a consumer's ``max_age`` is its own, separate limit).
_ANY_AGE = sys.maxsize


class Delivery:
    """One event taken from the queue: acknowledge, retry or reject it exactly once."""

    __slots__ = (
        "_idempotency",
        "_retry_queues",
        "_settle_timeout",
        "event",
        "message",
        "routing_key",
    )

    def __init__(
        self,
        event: WebhookEvent,
        message: AbstractIncomingMessage,
        idempotency: IdempotencyStore | None = None,
        *,
        routing_key: str | None = None,
        retry_queues: RetryQueues | None = None,
        settle_timeout: float = 10.0,
    ) -> None:
        self.event = event
        self.message = message
        # The routing key the message was published with: the event's type.
        self.routing_key = (message.routing_key or "") if routing_key is None else routing_key
        self._idempotency = idempotency
        self._retry_queues = retry_queues
        self._settle_timeout = settle_timeout

    @property
    def body(self) -> bytes:
        """The exact bytes OpenAI sent."""
        return self.message.body

    @property
    def message_id(self) -> str | None:
        """The ``webhook-id``: the same for every copy of one webhook."""
        return self.message.message_id

    @property
    def source(self) -> str | None:
        """The source (OpenAI project) the webhook came from, when the bridge serves several
        (``BRIDGE_SOURCES``); ``None`` otherwise. Not signed: a consumer verifying with
        per-source secrets has it proved by the secret that matched."""
        return message_source(self.message)

    @property
    def validated(self) -> bool:
        """Whether the event is one of the types this version models, valid against its
        model. Worked out from the body here: the ``x-event-validated`` header the bridge
        sets is not covered by the signature, so it is not read."""
        return not isinstance(self.event, UnknownWebhookEvent)

    @property
    def retries(self) -> int:
        """How many times handling this event failed and was retried before (0 at first)."""
        return retry_count(self.message)

    @property
    def trace(self) -> TraceContext | None:
        """The W3C trace context the message carries (the webhook request's, continued)."""
        return message_context(self.message.headers)

    async def ack(self) -> None:
        """Record the message as handled, then remove it from the queue.

        In this order, a crash in between redelivers a message the store skips. If the
        store cannot record it, the message is still acknowledged (it was handled); the
        cost is a possible second handling of a later copy. If the connection was lost
        meanwhile, the broker delivers the message again (and the store skips it): that is
        logged, not raised, here and in :meth:`retry` and :meth:`reject`.
        """
        if self._idempotency is not None and self.message_id is not None:
            try:
                await self._idempotency.done(self.message_id)
            except StoreUnavailable as error:
                logger.warning(
                    "could not record a handled message in the idempotency store",
                    extra={"message_id": self.message_id, "reason": str(error)},
                )
        await settle(self.message.ack(), self.message, self._settle_timeout)

    async def retry(self, delay: float) -> None:
        """Have the event delivered again after ``delay`` seconds, with ``retries`` one more.

        The message goes through the queue's retry queue, so the broker does not count it
        toward the queue's delivery limit. Its claim is released, so a copy may be handled
        meanwhile.
        """
        if self._retry_queues is None:
            raise RuntimeError("only deliveries from an EventConsumer's queue can be retried")
        await self._release()
        await self._retry_queues.hand_back(
            self.message, delay=delay, routing_key=self.routing_key, retries=self.retries + 1
        )

    async def reject(self, *, requeue: bool = False) -> None:
        """Give the message up: dead-letter it (or drop it, without a dead-letter exchange).

        ``requeue=True`` puts it straight back in the queue instead; a quorum queue counts
        that toward its delivery limit, after which the broker dead-letters (or drops) it.
        Prefer :meth:`retry` for failures that a later attempt can fix. Either way the
        claim is released, so the next copy is handled.
        """
        await self._release()
        await settle(self.message.reject(requeue=requeue), self.message, self._settle_timeout)

    async def _release(self) -> None:
        if self._idempotency is not None and self.message_id is not None:
            with contextlib.suppress(StoreUnavailable):  # the claim then expires on its own
                await self._idempotency.release(self.message_id)


def message_source(message: AbstractIncomingMessage) -> str | None:
    source = message.headers.get(SOURCE_HEADER)
    return source if isinstance(source, str) else None


VerifySecrets: TypeAlias = Sequence[str] | Mapping[str, Sequence[str]]
"""The ``whsec_`` secrets to re-check messages with: one list, or one per source."""


class PerSourceVerifier:
    """Verifies each message with the secrets of the source its ``x-webhook-source`` names.

    The header is not signed, but no secret belongs to two sources: a message whose
    signature matches the named source's secrets came from that source.
    """

    def __init__(self, secrets: Mapping[str, Sequence[str]]) -> None:
        self._verifiers = {
            source: _verifier(listed) for source, listed in secrets.items() if listed
        }

    def problem(self, message: AbstractIncomingMessage) -> str | None:
        source = message_source(message)
        if source is None:
            return f"no {SOURCE_HEADER} header to choose the secrets by"
        verifier = self._verifiers.get(source)
        if verifier is None:
            return f"no secrets for source {source!r}"
        return signature_problem(verifier, message)


def _verifier(secrets: Sequence[str]) -> SignatureVerifier:
    keys = [decode_secret(secret) for secret in secrets]
    return SignatureVerifier(keys, tolerance_seconds=_ANY_AGE)


def stored_message_verifier(
    secrets: VerifySecrets,
) -> SignatureVerifier | PerSourceVerifier | None:
    """A verifier for stored messages (no timestamp window), or ``None`` without secrets;
    secrets by source name give a :class:`PerSourceVerifier`."""
    if not secrets:
        return None
    if isinstance(secrets, Mapping):
        return PerSourceVerifier(secrets)
    return _verifier(secrets)


def signature_problem(
    verifier: SignatureVerifier | PerSourceVerifier, message: AbstractIncomingMessage
) -> str | None:
    """Why the message is not what OpenAI signed, or ``None`` when it is."""
    if isinstance(verifier, PerSourceVerifier):
        return verifier.problem(message)
    text_headers = {
        name: value for name, value in message.headers.items() if isinstance(value, str)
    }
    try:
        headers = WebhookHeaders.from_mapping(text_headers)
        verifier.verify(headers, message.body)
    except WebhookVerificationError as error:
        return str(error)
    # Idempotency keys on message_id, so it must be the id the signature covers.
    if message.message_id != headers.webhook_id:
        return "message_id is not the signed webhook-id"
    return None
