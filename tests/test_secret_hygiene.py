"""No secret, AMQP password or signature reaches the logs, even in a run full of failures."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bridge.samples import sample_body
from tests.conftest import BridgeProcess, Signer, post_webhook
from tests.rabbitmq import close_connections_of, needs_rabbitmqctl, temporary_user

pytestmark = [pytest.mark.broker, needs_rabbitmqctl]


async def test_logs_of_a_run_with_failures_hold_no_secret(
    start_bridge: Callable[..., BridgeProcess], signer: Signer
) -> None:
    sent_signatures: list[str] = []
    with temporary_user() as user:
        bridge = start_bridge(BRIDGE_AMQP_URL=user.amqp_url, BRIDGE_LOG_LEVEL="DEBUG")
        wrong_password = start_bridge(
            BRIDGE_AMQP_URL=user.amqp_url.replace(user.password, "not-" + user.password),
            BRIDGE_LOG_LEVEL="DEBUG",
        )
        await bridge.wait_ready()

        body = sample_body("batch.completed")
        good = signer.headers(body)
        sent_signatures.append(good["webhook-signature"])
        assert await post_webhook(bridge.url, body, good) == 200

        forged = Signer().headers(body)
        sent_signatures.append(forged["webhook-signature"])
        assert await post_webhook(bridge.url, body, forged) == 401

        stale = signer.headers(body, timestamp=1)
        sent_signatures.append(stale["webhook-signature"])
        assert await post_webhook(bridge.url, body, stale) == 401

        malformed = dict(good, **{"webhook-signature": good["webhook-signature"][:-4]})
        sent_signatures.append(malformed["webhook-signature"])
        assert await post_webhook(bridge.url, body, malformed) == 400

        quarantined_body = b'{"not": "an event"}'
        quarantined = signer.headers(quarantined_body)
        sent_signatures.append(quarantined["webhook-signature"])
        assert await post_webhook(bridge.url, quarantined_body, quarantined) == 200

        assert close_connections_of(user.name) >= 1
        outage = signer.headers(body)
        sent_signatures.append(outage["webhook-signature"])
        await post_webhook(bridge.url, body, outage)
        assert await post_webhook(wrong_password.url, body, signer.headers(body)) == 503

        await bridge.wait_ready()
        assert bridge.stop() == 0
        assert wrong_password.stop() == 0

    logs = bridge.log_path.read_text() + wrong_password.log_path.read_text()
    assert "webhook rejected" in logs, "the run did log its failures"
    assert "broker" in logs
    forbidden = [
        signer.secret,
        signer.secret.removeprefix("whsec_"),
        user.password,
        *sent_signatures,
        *(signature.removeprefix("v1,") for signature in sent_signatures),
    ]
    for value in forbidden:
        assert value not in logs
