"""The interface every deduplication store implements, and the words it answers in."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Protocol


class ClaimState(enum.Enum):
    NEW = "new"
    """Nobody had the id: it is ours to process, then confirm or release."""
    CONFIRMED = "confirmed"
    """The id was processed (for the bridge: its publish was confirmed) within the window."""
    IN_FLIGHT = "in_flight"
    """Someone else claimed the id and has neither confirmed nor released it yet."""


@dataclass(slots=True)  # built per request: a frozen one costs five times as much
class Claim:
    key: str
    state: ClaimState
    token: bytes = b""
    """What the store holds for a claim of ours, so that only its owner releases it."""


class StoreUnavailable(Exception):
    """The store did not answer within its timeout, refused the command, or is known down."""


class DedupStore(Protocol):
    """Where confirmed ``webhook-id``\\ s are remembered: this process's memory, or Redis."""

    @property
    def available(self) -> bool:
        """False while the store is known to be unreachable (claims then fail at once)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def claim(self, key: str) -> Claim:
        """Claim ``key`` atomically, or say who has it. Raises :class:`StoreUnavailable`."""
        ...

    def confirm(self, claim: Claim) -> asyncio.Future[None]:
        """Remember ``claim.key`` as confirmed for the window, without waiting: a shared
        store is sent the confirm in this turn's pipeline, and the returned future tells
        when it landed. It never fails: a failure is logged and costs at most a later
        duplicate, so nobody need wait for it (the bridge answers 2xx without)."""
        ...

    async def release(self, claim: Claim) -> None:
        """Drop our claim if the store still holds it, so a retry may publish. Never raises."""
        ...

    async def wait_confirmed(self, key: str, within: float) -> bool:
        """Whether ``key``, in flight elsewhere, becomes confirmed within ``within`` seconds."""
        ...
