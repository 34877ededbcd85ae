"""The bridge's app with a broker that confirms at once, for counting instructions.

``python -m bench.immediate_confirm --port 8082`` serves ``bridge.app.create_app``
with the default settings (a fresh secret from ``BENCH_WEBHOOK_SECRET``, the
in-process deduplication store, metrics, trace propagation) and a publisher that
encodes every message's AMQP frames exactly as the real one does, then counts it as
confirmed. Everything between the socket and the broker connection runs as in
production; what the broker connection itself costs (writing the frames, reading
the confirm, waking the request) does not, because it depends on the broker's timing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.serving import serve
from bridge.app import create_app, dispatch_webhooks_directly
from bridge.frames import FRAME_OVERHEAD
from bridge.publisher import Outcome, OutgoingMessage
from bridge.server import tune_garbage_collection
from bridge.settings import load_settings

FRAME_MAX = 131072
"""RabbitMQ's default ``frame_max``, which the real publisher's channel negotiates."""
CHANNEL = 1


class ImmediateConfirmPublisher:
    """Encodes each publish's frames, then answers as a confirming broker would."""

    ready = True
    connected = True

    def __init__(self) -> None:
        self.confirmed = 0
        self.bytes_encoded = 0

    async def publish(self, message: OutgoingMessage) -> Outcome:
        frames = message.frames(channel=CHANNEL, max_body_frame_size=FRAME_MAX - FRAME_OVERHEAD)
        self.confirmed += 1
        self.bytes_encoded += len(frames)
        return Outcome.QUARANTINED if message.quarantined else Outcome.PUBLISHED


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.immediate_confirm")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    settings = load_settings(
        secrets_dir=Path("/nonexistent"),
        webhook_secret=os.environ["BENCH_WEBHOOK_SECRET"],
        log_level="WARNING",
        metrics_port=0,  # readiness on the port the load goes to
    )
    app = create_app(settings, ImmediateConfirmPublisher())
    tune_garbage_collection()  # as bridge.server does once started
    return serve(app, args.host, args.port, lambda server: dispatch_webhooks_directly(server, app))


if __name__ == "__main__":
    sys.exit(main())
