"""Standard Webhooks signature verification, as OpenAI signs its webhooks.

The signed content is ``{webhook-id}.{webhook-timestamp}.{raw body}``; the
signature header is a whitespace-separated list of ``version,base64`` entries
and any ``v1`` entry matching any configured secret passes. Unlike the
reference ``standardwebhooks`` package, every malformed header is a typed
:class:`MalformedWebhookHeaders` instead of a crash, and the timestamp must be
an integer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

SECRET_PREFIX = "whsec_"  # noqa: S105  # the prefix, not a secret
MIN_SECRET_BYTES = 24
MAX_SIGNATURE_ENTRIES = 32
MAX_WEBHOOK_ID_LENGTH = 255
SIGNATURE_VERSION = "v1"

_WEBHOOK_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_WEBHOOK_ID_LENGTH}}}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_BASE64_SIGNATURE = re.compile(rb"[A-Za-z0-9+/]{43}=")


class InvalidSecretError(ValueError):
    """A configured webhook secret cannot be used as an HMAC key."""


class WebhookVerificationError(Exception):
    """Base of every reason a webhook is refused before it is published."""


class MalformedWebhookHeaders(WebhookVerificationError):
    """A webhook header is missing or not of the Standard Webhooks form."""


class SignatureMismatch(WebhookVerificationError):
    """No signature entry matches any configured secret."""


class TimestampOutOfTolerance(WebhookVerificationError):
    """The signed timestamp is too far in the past or the future."""


def decode_secret(secret: str) -> bytes:
    """Decode a ``whsec_``-prefixed base64 secret into its HMAC key.

    Refuses anything that would weaken the HMAC: an empty or undecodable value,
    or a key shorter than :data:`MIN_SECRET_BYTES`.
    """
    encoded = secret.strip().removeprefix(SECRET_PREFIX)
    if not encoded:
        raise InvalidSecretError("is empty")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSecretError("is not valid base64 after the whsec_ prefix") from None
    if len(key) < MIN_SECRET_BYTES:
        raise InvalidSecretError(
            f"decodes to {len(key)} bytes; at least {MIN_SECRET_BYTES} are required"
        )
    return key


def decode_secret_list(secrets: str) -> tuple[bytes, ...]:
    """Decode comma-separated ``whsec_`` secrets, as ``BRIDGE_WEBHOOK_SECRET`` holds them.

    The error names the position (1-based) of the first unusable secret, never its value.
    """
    keys = []
    for position, secret in enumerate(secrets.split(","), start=1):
        try:
            keys.append(decode_secret(secret))
        except InvalidSecretError as error:
            raise InvalidSecretError(f"secret #{position} {error}") from None
    return tuple(keys)


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``v1,<base64>`` signature entry OpenAI would send for this key."""
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode(), hashlib.sha256)
    mac.update(body)
    return f"{SIGNATURE_VERSION},{base64.b64encode(mac.digest()).decode()}"


@dataclass(slots=True)  # built per request: a frozen one costs five times as much
class WebhookHeaders:
    """The three Standard Webhooks headers, exactly as received."""

    webhook_id: str
    timestamp: str
    signature: str

    @classmethod
    def from_mapping(cls, headers: Mapping[str, str]) -> WebhookHeaders:
        """Read the headers from a case-insensitive mapping such as aiohttp's."""
        try:
            return cls(
                headers["webhook-id"], headers["webhook-timestamp"], headers["webhook-signature"]
            )
        except KeyError as missing:
            raise MalformedWebhookHeaders(f"missing header {missing.args[0]}") from None


class SignatureVerifier:
    """Checks webhooks against one or more secrets (several during a rotation).

    HMAC state keyed with each secret is built once; each request only copies it.
    """

    def __init__(
        self,
        keys: Sequence[bytes],
        *,
        tolerance_seconds: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not keys:
            raise InvalidSecretError("no webhook secret configured")
        self._keyed_macs = tuple(hmac.new(key, digestmod=hashlib.sha256) for key in keys)
        self._tolerance_seconds = tolerance_seconds
        self._clock = clock

    @property
    def secret_count(self) -> int:
        return len(self._keyed_macs)

    def with_keys(self, keys: Sequence[bytes]) -> SignatureVerifier:
        """A verifier for other secrets with the same tolerance and clock."""
        return SignatureVerifier(keys, tolerance_seconds=self._tolerance_seconds, clock=self._clock)

    def verify(self, headers: WebhookHeaders, body: bytes) -> int:
        """Verify ``body`` against the headers and return the matching secret's index.

        Raises :class:`MalformedWebhookHeaders`, :class:`TimestampOutOfTolerance`
        or :class:`SignatureMismatch`; never anything else, whatever the input.
        """
        return self.match(headers, self.check_headers(headers), body)

    def check_headers(self, headers: WebhookHeaders) -> list[bytes]:
        """Everything that needs no body: the headers' form and the timestamp's age.

        Returns the ``v1`` signatures to :meth:`match` the body against. Raises
        :class:`MalformedWebhookHeaders` or :class:`TimestampOutOfTolerance`.
        """
        if _WEBHOOK_ID.fullmatch(headers.webhook_id) is None:
            raise MalformedWebhookHeaders("webhook-id must be 1-255 printable ASCII characters")
        if _TIMESTAMP.fullmatch(headers.timestamp) is None:
            raise MalformedWebhookHeaders("webhook-timestamp must be an integer of seconds")
        candidates = _v1_signatures(headers.signature)

        skew = int(self._clock()) - int(headers.timestamp)
        if abs(skew) > self._tolerance_seconds:
            direction = "old" if skew > 0 else "far in the future"
            raise TimestampOutOfTolerance(f"webhook-timestamp is too {direction} ({skew:+d} s)")
        return candidates

    def match(self, headers: WebhookHeaders, candidates: list[bytes], body: bytes) -> int:
        """The index of the secret whose signature of ``body`` is among ``candidates``
        (from :meth:`check_headers`); raises :class:`SignatureMismatch` if none is."""
        signed_prefix = f"{headers.webhook_id}.{headers.timestamp}.".encode()
        for index, keyed_mac in enumerate(self._keyed_macs):
            mac = keyed_mac.copy()
            mac.update(signed_prefix)
            mac.update(body)
            expected = base64.b64encode(mac.digest())
            # Every candidate is compared, so timing does not reveal which entry matched.
            matched = False
            for candidate in candidates:
                matched |= hmac.compare_digest(expected, candidate)
            if matched:
                return index
        raise SignatureMismatch("no webhook-signature entry matches a configured secret")


def _v1_signatures(header: str) -> list[bytes]:
    # Every entry travels on as an AMQP header, whatever its version: all must be text.
    if not header.isascii():
        raise MalformedWebhookHeaders("webhook-signature must be ASCII")
    entries = header.split()
    if not entries:
        raise MalformedWebhookHeaders("webhook-signature is empty")
    if len(entries) > MAX_SIGNATURE_ENTRIES:
        raise MalformedWebhookHeaders(
            f"webhook-signature has {len(entries)} entries; at most {MAX_SIGNATURE_ENTRIES}"
        )
    signatures = []
    for entry in entries:
        version, comma, signature = entry.partition(",")
        if not comma or not version:
            raise MalformedWebhookHeaders("webhook-signature entries must be version,signature")
        if version != SIGNATURE_VERSION:
            continue
        encoded = signature.encode("ascii", errors="replace")
        if _BASE64_SIGNATURE.fullmatch(encoded) is None:
            raise MalformedWebhookHeaders("a v1 signature is not a base64 HMAC-SHA256 digest")
        signatures.append(encoded)
    return signatures
