"""The hydration queue on the main exchange, and the objects exchange with its companions.

``<exchange>.objects`` is a topic exchange like the main one, with the alternate exchange
and queue ``<exchange>.objects.unrouted`` for objects no queue is bound to, and
``<exchange>.objects.failed`` is a fanout exchange with a queue of the same name, like
the quarantine: :func:`bridge.publisher.declare_topology` declares exactly that shape.
The hydration queue ``<exchange>.hydrate`` is a quorum queue bound to the hydratable
event types only; a message the broker gives up on (its delivery limit reached) is
dead-lettered to the failed exchange, never dropped.
"""

from __future__ import annotations

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from pamqp.common import FieldTable

from bridge.consumer import DEFAULT_DELIVERY_LIMIT
from bridge.consumer.broker import require_exchange
from bridge.hydrate.mapping import BINDING_PATTERNS
from bridge.hydrate.settings import HydrateSettings
from bridge.publisher import Topology, check_topology, declare_topology, declared_elsewhere


def objects_topology(settings: HydrateSettings) -> Topology:
    names = settings.names
    return Topology(names.objects, names.objects_unrouted, names.failed, settings.queue_type)


def hydration_queue_arguments(settings: HydrateSettings) -> FieldTable:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": DEFAULT_DELIVERY_LIMIT,
        "x-dead-letter-exchange": settings.names.failed,
        # The default, at-most-once, loses a dead letter the broker fails to move.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def prepare_topology(connection: AbstractRobustConnection, settings: HydrateSettings) -> None:
    """Declare the hydration topology, or with ``BRIDGE_DECLARE_TOPOLOGY=false`` check it.

    Raises :class:`~bridge.consumer.ExchangeNotFoundError` when the main exchange is
    missing (``serve`` declares it), :class:`RuntimeError` naming what is missing when
    only checking, and :class:`~bridge.publisher.TopologyConflict` for a queue of the
    wrong type.
    """
    names = settings.names
    await require_exchange(connection, names.exchange)
    if not settings.declare_topology:
        async with connection.channel() as channel:
            await check_topology(channel, objects_topology(settings))
        await _check_queue(connection, names.queue)
        return
    async with connection.channel() as channel:
        await declare_hydration_topology(channel, settings)


async def declare_hydration_topology(channel: AbstractChannel, settings: HydrateSettings) -> None:
    """The objects exchanges, then the hydration queue and its bindings."""
    await declare_topology(channel, objects_topology(settings))
    names = settings.names
    queue = await channel.declare_queue(
        names.queue, durable=True, arguments=hydration_queue_arguments(settings)
    )
    for pattern in BINDING_PATTERNS:
        await queue.bind(names.exchange, routing_key=pattern)


async def _check_queue(connection: AbstractRobustConnection, name: str) -> None:
    # A failed passive declare closes its channel, so it gets one of its own.
    async with connection.channel() as channel:
        with declared_elsewhere("queue", name):
            await channel.declare_queue(name, passive=True)
