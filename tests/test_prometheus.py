"""A real Prometheus on loopback scraping a real ``webhook-bridge serve``.

Webhooks of several outcomes go to the bridge; Prometheus's HTTP API must then return,
for the queries the alert rules and the dashboard use, exactly what happened. The
metric names those queries read must all be offered by the live ``/metrics`` (or, for
the replay counters, by what ``replay --pushgateway`` pushes).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import ExchangeType
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from bridge.events import KNOWN_EVENT_TYPES
from bridge.hydrate import HydrateSettings
from bridge.hydrate.service import openai_fetcher
from bridge.hydrate.worker import HydrationWorker, operations_app
from bridge.metrics import HydrationMetrics
from bridge.replay.pushgateway import push_summary
from bridge.replay.run import ReplaySummary
from bridge.samples import sample_body
from tests.conftest import (
    AMQP_URL,
    BridgeProcess,
    Broker,
    Signer,
    free_port,
    post_webhook,
    unique_name,
)
from tests.monitoring import (
    dashboard_queries,
    dashboard_recording_rules,
    exposed_series_names,
    queried_metric_names,
    rule_groups,
    write_yaml,
)
from tests.openai_standin import OpenAIStandIn

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed"),
]

JOB = "webhook-bridge"
TARGET_LABELS = {
    "namespace": "test",
    "pod": "webhook-bridge-0",
    "app_kubernetes_io_name": "webhook-bridge",
}
EVENT_TYPES = ("batch.completed", "response.completed", "fine_tuning.job.succeeded")
# The dashboard's only panel fed by another process: `replay --pushgateway`.
PUSHED_ONLY_PANELS = {"Replay runs (last push per source)"}
# The Hydration row reads the hydration worker's /metrics, which the bridge's Prometheus
# does not scrape: test_prometheus_sees_what_the_hydration_worker_did checks it.
WORKER_PANELS = {
    "Hydrations by result",
    "Hydration backlog",
    "API latency",
    "API retries",
    "Rate-limit waits",
}


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    url: str

    async def query(self, expr: str) -> list[dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.url}/api/v1/query", params={"query": expr}) as response,
        ):
            answer = await response.json()
        assert answer["status"] == "success", f"{expr}: {answer}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    async def by_label(self, expr: str, label: str) -> dict[str, float]:
        return {
            sample["metric"].get(label, ""): float(sample["value"][1])
            for sample in await self.query(expr)
        }

    async def api(self, path: str) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.url}/api/v1/{path}") as response,
        ):
            answer = await response.json()
        assert answer["status"] == "success", answer
        return answer["data"]

    async def wait_for(
        self, expr: str, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 30
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, "prometheus exited"
            with contextlib.suppress(aiohttp.ClientError):
                result = await self.query(expr)
                if done(result):
                    return result
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus never answered as expected for {expr}")
            await asyncio.sleep(0.25)


@contextlib.contextmanager
def _prometheus(tmp_path: Path, bridge_port: int, job: str = JOB) -> Iterator[Prometheus]:
    rules = write_yaml(tmp_path / "alerts.yaml", rule_groups())
    dashboard_rules = write_yaml(tmp_path / "dashboard.yaml", dashboard_recording_rules())
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(rules), str(dashboard_rules)],
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [
                    {"targets": [f"127.0.0.1:{bridge_port}"], "labels": TARGET_LABELS}
                ],
            }
        ],
    }
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={write_yaml(tmp_path / 'prometheus.yml', config)}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        yield Prometheus(process, f"http://127.0.0.1:{port}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.asynccontextmanager
async def _pushgateway_recorder() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A loopback stand-in that keeps what a Pushgateway client PUTs."""
    bodies: list[bytes] = []

    async def receive(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/metrics/{path:.*}", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", bodies
    finally:
        await runner.cleanup()


async def _replay_series_names() -> set[str]:
    summary = ReplaySummary(source="q", queue="q", unrouted_queue="q.unrouted", dry_run=True)
    async with _pushgateway_recorder() as (url, bodies):
        await asyncio.to_thread(push_summary, url, summary, timeout=10)
    (body,) = bodies
    return exposed_series_names(body.decode())


async def _send_every_outcome(bridge: BridgeProcess, signer: Signer) -> list[str]:
    """3 published (one per type), 1 duplicate, 2 unauthorized, 1 bad request, 1 quarantined,
    1 unsupported encoding."""
    published_ids = []
    for event_type in EVENT_TYPES:
        body = sample_body(event_type)
        headers = signer.headers(body)
        assert await post_webhook(bridge.url, body, headers) == 200
        published_ids.append(headers["webhook-id"])
        if event_type == EVENT_TYPES[0]:
            assert await post_webhook(bridge.url, body, headers) == 200  # the duplicate
    for _ in range(2):
        body = sample_body("batch.failed")
        assert await post_webhook(bridge.url, body, Signer().headers(body)) == 401
    assert await post_webhook(bridge.url, b"{}", {"content-type": "application/json"}) == 400
    assert await bridge.post_signed(signer, b"not json") == 200
    compressed = {**signer.headers(b"{}"), "content-encoding": "gzip"}
    assert await post_webhook(bridge.url, b"{}", compressed) == 415
    return published_ids


async def test_prometheus_sees_what_the_bridge_did(
    start_bridge: Callable[..., BridgeProcess], broker: Broker, signer: Signer, tmp_path: Path
) -> None:
    bridge = start_bridge()
    await bridge.wait_ready()
    queue = await broker.bind_queue(bridge.exchange, "#")
    with _prometheus(tmp_path, bridge.port) as prometheus:
        # Counters must be seen at zero first, or rate() and increase() miss the first events.
        await prometheus.wait_for(
            f'webhook_bridge_requests_total{{job="{JOB}", outcome="published"}}',
            lambda result: len(result) == 1,
        )
        published_ids = await _send_every_outcome(bridge, signer)

        outcomes_expr = f'sum by (outcome) (webhook_bridge_requests_total{{job="{JOB}"}})'
        await prometheus.wait_for(
            outcomes_expr,
            lambda result: (
                {s["metric"]["outcome"]: s["value"][1] for s in result}.get("quarantined") == "1"
            ),
        )
        assert await prometheus.by_label(outcomes_expr, "outcome") == {
            "published": 3,
            "duplicate": 1,
            "unauthorized": 2,
            "bad_request": 1,
            "quarantined": 1,
            "unrouted": 0,
            "too_large": 0,
            "unavailable": 0,
            "unsupported_encoding": 1,
            "over_buffer_budget": 0,
        }
        buckets = await prometheus.by_label(
            f'sum by (le) (webhook_bridge_publish_seconds_bucket{{job="{JOB}"}})', "le"
        )
        assert buckets["+Inf"] == 4, "three published and one quarantined were confirmed"
        assert buckets["5.0"] == 4, "every confirm came within the publish timeout"
        cumulative = [buckets[le] for le in sorted(buckets, key=float)]
        assert cumulative == sorted(cumulative)
        by_type = await prometheus.by_label(
            f'sum by (event_type) (webhook_bridge_published_total{{job="{JOB}"}})', "event_type"
        )
        assert {event_type: n for event_type, n in by_type.items() if n} == dict.fromkeys(
            EVENT_TYPES, 1
        )
        assert set(by_type) == KNOWN_EVENT_TYPES, "every known type is exported from zero"
        assert await prometheus.by_label(
            f'sum by (secret_index) (webhook_bridge_secret_matches_total{{job="{JOB}"}})',
            "secret_index",
        ) == {"0": 5}
        dedup = await prometheus.by_label(
            f'sum by (result) (webhook_bridge_dedup_results_total{{job="{JOB}"}})', "result"
        )
        assert dedup["duplicate"] == 1
        assert dedup["new"] == 4
        assert await prometheus.by_label(
            f'webhook_bridge_broker_node_info{{job="{JOB}"}} == 1', "node"
        ) == {f"{URL(AMQP_URL).host}:{URL(AMQP_URL).port}": 1}

        await _check_dashboard_queries(prometheus)
        await _check_rules_and_alerts(prometheus)

    messages = await broker.drain(queue)
    assert sorted(message.message_id or "" for message in messages) == sorted(published_ids)
    quarantined = await broker.drain(f"{bridge.exchange}.quarantine")
    assert [message.body for message in quarantined] == [b"not json"]


async def _check_dashboard_queries(prometheus: Prometheus) -> None:
    results: dict[str, list[list[dict[str, Any]]]] = {}
    for title, expr in dashboard_queries(rate_interval="1m"):
        results.setdefault(title, []).append(await prometheus.query(expr))
    empty = {title for title, answers in results.items() if not any(answers)}
    assert empty <= PUSHED_ONLY_PANELS | WORKER_PANELS, (
        f"panels without data from a live bridge: {empty}"
    )

    def values(title: str, label: str) -> dict[str, float]:
        (answer,) = results[title]
        return {sample["metric"].get(label, ""): float(sample["value"][1]) for sample in answer}

    by_outcome = values("Requests by outcome", "outcome")
    happened = {outcome for outcome, rate in by_outcome.items() if rate > 0}
    assert happened == {
        *("published", "duplicate", "unauthorized", "bad_request", "quarantined"),
        "unsupported_encoding",
    }
    for answer in results["Publish latency (request to broker confirm)"]:
        (sample,) = answer
        latency = float(sample["value"][1])
        assert math.isfinite(latency)
        assert 0 < latency <= 5
    by_type = values("Events published by type", "event_type")
    assert {event_type for event_type, rate in by_type.items() if rate > 0} == set(EVENT_TYPES)
    assert values("Broker connection", "pod") == {TARGET_LABELS["pod"]: 1}
    assert values("In flight", "pod") == {TARGET_LABELS["pod"]: 0}
    assert set(values("Deduplication results", "result")) >= {"new", "duplicate"}


async def _check_rules_and_alerts(prometheus: Prometheus) -> None:
    """Every rule evaluates without error; the quarantine alert fires; nothing critical does."""
    deadline = time.monotonic() + 30
    while True:
        alerts = (await prometheus.api("alerts"))["alerts"]
        firing = {alert["labels"]["alertname"] for alert in alerts if alert["state"] == "firing"}
        if "WebhookBridgeQuarantineReceiving" in firing:
            break
        assert time.monotonic() < deadline, f"the quarantine alert did not fire: {alerts}"
        await asyncio.sleep(0.5)
    quarantine = next(
        a for a in alerts if a["labels"]["alertname"] == "WebhookBridgeQuarantineReceiving"
    )
    assert quarantine["labels"]["namespace"] == "test"
    assert quarantine["labels"]["job"] == JOB
    assert not {alert["labels"]["severity"] for alert in alerts} & {"critical"}, alerts
    rules = [rule for group in (await prometheus.api("rules"))["groups"] for rule in group["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in rule_groups()["groups"]) + len(
        dashboard_queries()
    )
    unhealthy = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert unhealthy == {}


async def test_rules_and_dashboard_name_only_exported_metrics(
    start_bridge: Callable[..., BridgeProcess], signer: Signer
) -> None:
    bridge = start_bridge()
    await bridge.wait_ready()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{bridge.port}/metrics") as response,
    ):
        exposition = await response.text()
    hydration = exposed_series_names(HydrationMetrics().exposition().decode())
    exported = exposed_series_names(exposition) | await _replay_series_names() | hydration
    queried = queried_metric_names()
    assert "webhook_bridge_replay_messages_total" in queried
    assert "webhook_bridge_hydrate_backlog" in queried
    assert queried - exported == set()


async def test_prometheus_sees_what_the_hydration_worker_did(
    broker: Broker, tmp_path: Path
) -> None:
    """One object published and one recorded as failed, seen by a real Prometheus scraping
    a real worker: every panel of the Hydration row has data, and no alert fires."""
    standin = OpenAIStandIn()
    api = TestServer(standin.app(), host="127.0.0.1")
    await api.start_server()
    exchange = unique_name("test.hydrate")
    await broker.channel.declare_exchange(exchange, ExchangeType.TOPIC, durable=True)
    settings = HydrateSettings(
        amqp_url=AMQP_URL,
        exchange=exchange,
        openai_api_key=standin.api_key,
        openai_base_url=str(api.make_url("/v1")),
        hydrate_metrics_port=0,
    )
    names = settings.names
    broker.created_exchanges += [exchange, names.objects, names.objects_unrouted, names.failed]
    broker.created_queues += [names.queue, names.objects_unrouted, names.failed]
    standin.store_object(
        "/batches/batch_found", b'{"id":"batch_found","object":"batch","status":"completed"}'
    )
    worker = HydrationWorker(settings, openai_fetcher(settings))
    running = asyncio.create_task(worker.run())
    port = free_port()
    operations = web.AppRunner(operations_app(worker))
    await operations.setup()
    await web.TCPSite(operations, "127.0.0.1", port).start()
    try:
        while not worker.ready:
            assert not running.done()
            await asyncio.sleep(0.05)
        with _prometheus(tmp_path, port, job="webhook-bridge-hydrate") as prometheus:
            published = (
                'webhook_bridge_hydrations_total{event_type="batch.completed", result="published"}'
            )
            await prometheus.wait_for(published, lambda result: len(result) == 1)
            target = await broker.channel.get_exchange(exchange, ensure=False)
            for object_id in ("batch_found", "batch_missing"):
                body = sample_body("batch.completed", overrides={"data.id": object_id})
                await target.publish(
                    aio_pika.Message(body, message_id=f"wh_{object_id}"), "batch.completed"
                )
            await prometheus.wait_for(
                'sum by (result) (webhook_bridge_hydrations_total{event_type="batch.completed"})',
                lambda result: (
                    {s["metric"]["result"]: s["value"][1] for s in result}
                    == {"published": "1", "stale": "0", "failed": "1", "requeued": "0"}
                ),
            )
            await prometheus.wait_for(
                "sum(webhook_bridge_hydrate_api_seconds_count)",
                lambda result: bool(result) and result[0]["value"][1] == "2",
            )
            panels = [
                (t, e) for t, e in dashboard_queries(rate_interval="1m") if t in WORKER_PANELS
            ]
            assert {title for title, _ in panels} == WORKER_PANELS
            for _, expr in panels:
                await prometheus.wait_for(expr, bool)
            firing = await _firing(prometheus)
            assert not {
                "WebhookBridgeHydrationBacklogGrowing",
                "WebhookBridgeHydrationKeyRefused",
            } & set(firing)
    finally:
        worker.stop()
        await asyncio.wait_for(running, 60)
        await operations.cleanup()
        await api.close()


async def _firing(prometheus: Prometheus) -> list[str]:
    answer = await prometheus.api("alerts")
    return [alert["labels"]["alertname"] for alert in answer["alerts"]]
