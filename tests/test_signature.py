"""Signature verification against public vectors, the reference package, and hostile headers."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
import standardwebhooks
from hypothesis import given
from hypothesis import strategies as st

from bridge.signature import (
    InvalidSecretError,
    MalformedWebhookHeaders,
    SignatureMismatch,
    SignatureVerifier,
    TimestampOutOfTolerance,
    WebhookHeaders,
    decode_secret,
    sign,
)
from tests.conftest import new_secret


@dataclass(frozen=True)
class Vector:
    secret: str
    webhook_id: str
    timestamp: int
    body: bytes
    signature: str

    def headers(self, signature: str | None = None) -> WebhookHeaders:
        return WebhookHeaders(self.webhook_id, str(self.timestamp), signature or self.signature)

    def verifier(self, *secrets: str, skew: int = 0) -> SignatureVerifier:
        return verifier_at(self.timestamp + skew, *(secrets or (self.secret,)))


STANDARD_WEBHOOKS = Vector(
    secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    webhook_id="msg_p5jXN8AQM9LWM0D4loKWxJek",
    timestamp=1614265330,
    body=b'{"test": 2432232314}',
    signature="v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
)
OPENAI_PYTHON = Vector(
    secret="whsec_RdvaYFYUXuIFuEbvZHwMfYFhUf7aMYjYcmM24+Aj40c=",
    webhook_id="wh_685c059ae39c8190af8c71ed1022a24d",
    timestamp=1750861210,
    body=(
        b'{"id": "evt_685c059ae3a481909bdc86819b066fb6", "object": "event", '
        b'"created_at": 1750861210, "type": "response.completed", "data": {"id": "resp_123"}}'
    ),
    signature="v1,gUAg4R2hWouRZqRQG4uJypNS8YK885G838+EHb4nKBY=",
)
VECTORS = pytest.mark.parametrize(
    "vector", [STANDARD_WEBHOOKS, OPENAI_PYTHON], ids=["standard-webhooks", "openai-python"]
)


def verifier_at(now: float, *secrets: str, tolerance: int = 300) -> SignatureVerifier:
    return SignatureVerifier(
        [decode_secret(secret) for secret in secrets],
        tolerance_seconds=tolerance,
        clock=lambda: now,
    )


@VECTORS
def test_known_answer_vectors_sign_and_verify(vector: Vector) -> None:
    key = decode_secret(vector.secret)
    assert sign(key, vector.webhook_id, vector.timestamp, vector.body) == vector.signature
    assert vector.verifier().verify(vector.headers(), vector.body) == 0


@VECTORS
def test_any_changed_byte_fails(vector: Vector) -> None:
    with pytest.raises(SignatureMismatch):
        vector.verifier().verify(vector.headers(), vector.body + b" ")
    tampered_id = WebhookHeaders("msg_other", str(vector.timestamp), vector.signature)
    with pytest.raises(SignatureMismatch):
        vector.verifier().verify(tampered_id, vector.body)


def test_agrees_with_reference_package() -> None:
    secret = new_secret()
    body = b'{"type":"batch.completed"}'
    timestamp = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    reference = standardwebhooks.Webhook(secret).sign("wh_1", timestamp, body.decode())
    ours = sign(decode_secret(secret), "wh_1", int(timestamp.timestamp()), body)
    assert ours == reference


def test_any_of_several_signature_entries_passes() -> None:
    vector = OPENAI_PYTHON
    entries = f"v1,{base64.b64encode(b'x' * 32).decode()} v2,whatever  {vector.signature}"
    assert vector.verifier().verify(vector.headers(entries), vector.body) == 0


def test_rotation_reports_which_secret_matched() -> None:
    vector = OPENAI_PYTHON
    verifier = vector.verifier(new_secret(), vector.secret, new_secret())
    assert verifier.verify(vector.headers(), vector.body) == 1


@pytest.mark.parametrize("skew", [-301, 301, 10**9])
def test_timestamp_outside_tolerance_is_refused_both_ways(skew: int) -> None:
    vector = OPENAI_PYTHON
    with pytest.raises(TimestampOutOfTolerance):
        vector.verifier(skew=skew).verify(vector.headers(), vector.body)


@pytest.mark.parametrize("skew", [-300, 300])
def test_timestamp_at_the_tolerance_edge_passes(skew: int) -> None:
    vector = OPENAI_PYTHON
    assert vector.verifier(skew=skew).verify(vector.headers(), vector.body) == 0


@pytest.mark.parametrize(
    ("webhook_id", "timestamp", "signature"),
    [
        ("", "1750861210", "v1,abc"),
        ("wh 1", "1750861210", "v1,abc"),
        ("wh_é", "1750861210", "v1,abc"),
        ("w" * 256, "1750861210", "v1,abc"),
        ("wh_1", "1750861210.0", "v1,abc"),
        ("wh_1", "-1750861210", "v1,abc"),
        ("wh_1", "1e9", "v1,abc"),
        ("wh_1", " 1750861210", "v1,abc"),
        ("wh_1", "", "v1,abc"),
        ("wh_1", "1750861210", ""),
        ("wh_1", "1750861210", "   "),
        ("wh_1", "1750861210", "v1"),
        ("wh_1", "1750861210", ",abc"),
        ("wh_1", "1750861210", "v1,not-base64!"),
        ("wh_1", "1750861210", "v1,é"),
        ("wh_1", "1750861210", " ".join(["v1,x"] * 33)),
    ],
)
def test_malformed_headers_are_typed_errors(
    webhook_id: str, timestamp: str, signature: str
) -> None:
    with pytest.raises(MalformedWebhookHeaders):
        verifier_at(1750861210, new_secret()).verify(
            WebhookHeaders(webhook_id, timestamp, signature), b"{}"
        )


def test_missing_header_is_malformed() -> None:
    with pytest.raises(MalformedWebhookHeaders, match="webhook-signature"):
        WebhookHeaders.from_mapping({"webhook-id": "a", "webhook-timestamp": "1"})


def test_only_unknown_versions_is_a_mismatch() -> None:
    with pytest.raises(SignatureMismatch):
        verifier_at(1750861210, new_secret()).verify(
            WebhookHeaders("wh_1", "1750861210", "v1a,abc v2,def"), b"{}"
        )


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("", "empty"),
        ("whsec_", "empty"),
        ("whsec_%%%", "base64"),
        ("whsec_" + base64.b64encode(b"k" * 23).decode(), "23 bytes"),
    ],
)
def test_weak_secrets_are_refused(secret: str, message: str) -> None:
    with pytest.raises(InvalidSecretError, match=message):
        decode_secret(secret)


def test_no_secret_is_refused() -> None:
    with pytest.raises(InvalidSecretError):
        SignatureVerifier([])


header_text = st.one_of(
    st.text(max_size=300),
    st.text(alphabet="v1, =+/aA0", max_size=300),
    st.lists(st.text(alphabet="v1,=+/aA0", max_size=60), max_size=50).map(" ".join),
)


@given(webhook_id=header_text, timestamp=header_text, signature=header_text, body=st.binary())
def test_never_raises_anything_but_verification_errors(
    webhook_id: str, timestamp: str, signature: str, body: bytes
) -> None:
    verifier = verifier_at(1750861210, new_secret())
    with pytest.raises((MalformedWebhookHeaders, SignatureMismatch, TimestampOutOfTolerance)):
        verifier.verify(WebhookHeaders(webhook_id, timestamp, signature), body)
