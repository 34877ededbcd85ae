"""Pre-signed webhook requests for wrk to replay, each ``webhook-id`` used exactly once.

Requests are signed the way OpenAI signs them, with a secret generated for the
run. Ids are a random per-factory prefix plus a counter, so they cannot repeat
within a run (the bridge would answer a repeat from memory without publishing)
and are practically unique across runs.
"""

from __future__ import annotations

import base64
import itertools
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bridge.events import KNOWN_EVENT_TYPES
from bridge.samples import sample_body
from bridge.signature import decode_secret, sign

WEBHOOK_PATH = "/webhooks/openai"
LENGTH_DIGITS = 8
"""Width of the length prefix in front of each record; bench/wrk.lua reads the same width."""

USER_AGENT = "OpenAI/1.0 (+https://platform.openai.com/docs/webhooks)"


def new_secret() -> str:
    """A throwaway ``whsec_`` secret; nothing from a run outlives it."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True, slots=True)
class SignedRequest:
    webhook_id: str
    timestamp: int
    signature: str
    body: bytes

    def headers(self) -> dict[str, str]:
        return {
            "content-type": "application/json",
            "webhook-id": self.webhook_id,
            "webhook-timestamp": str(self.timestamp),
            "webhook-signature": self.signature,
        }

    def raw(self, host: str) -> bytes:
        """The complete HTTP/1.1 request, as wrk writes it to the socket."""
        head = (
            f"POST {WEBHOOK_PATH} HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            f"User-Agent: {USER_AGENT}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(self.body)}\r\n"
            f"webhook-id: {self.webhook_id}\r\n"
            f"webhook-timestamp: {self.timestamp}\r\n"
            f"webhook-signature: {self.signature}\r\n"
            "\r\n"
        )
        return head.encode("ascii") + self.body


class RequestFactory:
    """Fresh sample events over all known types, signed with one secret."""

    def __init__(self, secret: str, *, clock: Callable[[], float] = time.time) -> None:
        self._key = decode_secret(secret)
        self._clock = clock
        # 16 random hex digits plus a 16-digit counter: the 32 hex digits of OpenAI's ids.
        self._prefix = "wh_" + secrets.token_hex(8)
        self._issued = 0
        self._event_types = itertools.cycle(sorted(KNOWN_EVENT_TYPES))

    @property
    def issued(self) -> int:
        return self._issued

    def new(self, timestamp: int | None = None) -> SignedRequest:
        webhook_id = f"{self._prefix}{self._issued:016x}"
        self._issued += 1
        signed_at = int(self._clock()) if timestamp is None else timestamp
        body = sample_body(next(self._event_types), clock=self._clock)
        return SignedRequest(
            webhook_id, signed_at, sign(self._key, webhook_id, signed_at, body), body
        )

    def write_slices(self, prefix: Path, count: int, slices: int, host: str) -> list[Path]:
        """Write ``count`` requests split over ``slices`` files named ``<prefix>.<n>`` (1-based).

        All are signed with the current time: callers generate them right before
        the run that uses them, well within the bridge's timestamp tolerance.
        """
        timestamp = int(self._clock())
        paths = []
        for index in range(1, slices + 1):
            share = count // slices + (1 if index <= count % slices else 0)
            path = prefix.with_name(f"{prefix.name}.{index}")
            with path.open("wb") as file:
                for _ in range(share):
                    raw = self.new(timestamp).raw(host)
                    file.write(b"%0*d" % (LENGTH_DIGITS, len(raw)))
                    file.write(raw)
            paths.append(path)
        return paths


def read_records(path: Path) -> Iterator[bytes]:
    """The raw requests in one slice file, in the order wrk sends them."""
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
        length = int(data[offset : offset + LENGTH_DIGITS])
        offset += LENGTH_DIGITS
        yield data[offset : offset + length]
        offset += length


def parse_raw(raw: bytes) -> tuple[dict[str, str], bytes]:
    """Split a raw request into lower-cased headers and body (for checks, not for speed)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    _request_line, *lines = head.decode("ascii").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers, body
