"""The benchmark harness still works: signed requests, the wrk script, the reference server.

Nothing here measures speed; it checks that what the benchmark measures is sound.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import aiormq
import pytest
from aiohttp import web

from bench.broker import BrokerProbe, unique_name
from bench.load import LUA_SCRIPT, parse_output, run_wrk, wrk_path
from bench.processes import Server, clean_environment, free_port, start_server
from bench.signed_requests import RequestFactory, new_secret, parse_raw, read_records
from bridge.events import KNOWN_EVENT_TYPES, webhook_event_adapter
from bridge.signature import SignatureVerifier, WebhookHeaders, decode_secret

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("BRIDGE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def test_request_files_hold_unique_ids_with_valid_signatures(tmp_path: Path) -> None:
    secret = new_secret()
    factory = RequestFactory(secret)
    paths = factory.write_slices(tmp_path / "requests", 31, 2, "127.0.0.1:9")
    verifier = SignatureVerifier([decode_secret(secret)])

    assert [path.name for path in paths] == ["requests.1", "requests.2"]
    per_slice = [list(read_records(path)) for path in paths]
    assert [len(records) for records in per_slice] == [16, 15]
    ids, types = Counter[str](), Counter[str]()
    for raw in (raw for records in per_slice for raw in records):
        headers, body = parse_raw(raw)
        assert int(headers["content-length"]) == len(body)
        verifier.verify(WebhookHeaders.from_mapping(headers), body)
        ids[headers["webhook-id"]] += 1
        types[webhook_event_adapter.validate_json(body).type] += 1
    assert len(ids) == 31
    assert set(ids.values()) == {1}
    assert set(types) == KNOWN_EVENT_TYPES
    assert factory.issued == 31


def test_a_second_batch_never_reuses_an_id(tmp_path: Path) -> None:
    factory = RequestFactory(new_secret())
    first = factory.write_slices(tmp_path / "first", 10, 1, "h")
    second = factory.write_slices(tmp_path / "second", 10, 1, "h")
    ids = [parse_raw(raw)[0]["webhook-id"] for path in first + second for raw in read_records(path)]
    assert len(set(ids)) == 20


def test_wrk_script_has_the_hooks_the_harness_reads() -> None:
    script = LUA_SCRIPT.read_text()
    hooks = ["setup(", "init(", "request(", "response(", "done("]
    for needed in [f"function {hook}" for hook in hooks] + [
        "latency:percentile(",
        "summary.errors",
    ]:
        assert needed in script, needed


def test_wrk_result_line_is_parsed() -> None:
    line = (
        'BENCH_RESULT {"duration_us":2000000,"requests":100,"bytes":1,'
        '"errors":{"connect":0,"read":0,"write":0,"status":0,"timeout":0},'
        '"latency_us":{"p50":1500,"p90":2000,"p99":3000,"p999":4000,"mean":1600.0,"max":5000},'
        '"issued":102,"responses":100,"non2xx":1,"exhausted_threads":0}'
    )
    result = parse_output(f"Running 2s test\n{line}\n", connections=2, threads=1)

    assert result.rps == 50
    assert result.p99_ms == 3.0
    assert result.problems() == ["1 non-2xx answers"]


@pytest.fixture
async def probe() -> AsyncIterator[BrokerProbe]:
    instance = await BrokerProbe.connect(AMQP_URL)
    try:
        yield instance
    finally:
        await instance.close()


async def test_counting_queues_carry_the_extra_arguments() -> None:
    lazy = await BrokerProbe.connect(AMQP_URL, "classic", (("x-queue-mode", "lazy"),))
    try:
        exchange = unique_name("test.bench.lazy")
        await lazy.declare_topic_exchange(exchange)
        queue = await lazy.bind_counting_queue(exchange)
        connection = await aiormq.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            # The broker refuses a declaration that differs in x-queue-mode: so it has it.
            await channel.queue_declare(
                queue, durable=True, arguments={"x-queue-type": "classic", "x-queue-mode": "lazy"}
            )
            with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
                await channel.queue_declare(
                    queue, durable=True, arguments={"x-queue-type": "classic"}
                )
        finally:
            await connection.close()
    finally:
        await lazy.close()


@pytest.fixture
async def reference(tmp_path: Path, probe: BrokerProbe) -> AsyncIterator[tuple[Server, str, str]]:
    secret, exchange, port = new_secret(), unique_name("test.bench"), free_port()
    probe.forget_exchange(exchange)
    server = start_server(
        "reference",
        [
            sys.executable,
            "-m",
            "bench.reference",
            "--port",
            str(port),
            "--exchange",
            exchange,
            "--amqp-url",
            AMQP_URL,
        ],
        port=port,
        ready_path="/healthz",
        environment=clean_environment(BENCH_WEBHOOK_SECRET=secret),
        log_dir=tmp_path,
        cwd=ROOT,
    )
    try:
        await server.wait_ready()
        yield server, secret, exchange
    finally:
        await server.stop()


@pytest.mark.broker
async def test_reference_publishes_a_signed_request(
    reference: tuple[Server, str, str], probe: BrokerProbe
) -> None:
    server, secret, exchange = reference
    queue = await probe.bind_counting_queue(exchange)
    request = RequestFactory(secret).new()

    async with aiohttp.ClientSession() as session:
        async with session.post(server.url, data=request.body, headers=request.headers()) as reply:
            assert reply.status == 200, await reply.text()
        forged = {**request.headers(), "webhook-id": request.webhook_id + "x"}
        async with session.post(server.url, data=request.body, headers=forged) as reply:
            assert reply.status == 401

    assert await probe.settled_count(queue, 1) == 1
    assert server.peak_rss_mb() > 0


@pytest.mark.broker
@pytest.mark.skipif(wrk_path() is None, reason="wrk is not installed")
async def test_wrk_replays_each_request_once_and_every_one_arrives(
    reference: tuple[Server, str, str], probe: BrokerProbe, tmp_path: Path
) -> None:
    server, secret, exchange = reference
    queue = await probe.bind_counting_queue(exchange)
    factory = RequestFactory(secret)
    factory.write_slices(tmp_path / "requests", 5000, 2, server.host_header)

    result = await run_wrk(
        server.url, connections=2, threads=2, duration_s=1, request_prefix=tmp_path / "requests"
    )

    # Running out of requests early is allowed here; sending one twice never is.
    assert result.problems() == []
    assert await probe.settled_count(queue, result.issued) == result.issued


@pytest.mark.skipif(wrk_path() is None, reason="wrk is not installed")
async def test_paced_wrk_catches_up_after_a_stall(tmp_path: Path) -> None:
    stalled_until = 0.0

    async def answer(request: web.Request) -> web.Response:
        nonlocal stalled_until
        await request.read()
        loop = asyncio.get_running_loop()
        if not stalled_until:
            stalled_until = loop.time() + 1.0
        if loop.time() < stalled_until:
            await asyncio.sleep(stalled_until - loop.time())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/webhooks/openai", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        RequestFactory(new_secret()).write_slices(
            tmp_path / "requests", 3000, 2, f"127.0.0.1:{port}"
        )
        rate = 300
        result = await run_wrk(
            f"http://127.0.0.1:{port}/webhooks/openai",
            connections=8,
            threads=2,
            duration_s=4,
            request_prefix=tmp_path / "requests",
            paced_rate=rate,
        )
    finally:
        await runner.cleanup()
    # The first second answers nothing; the schedule makes it up in the next three
    # (pausing after each answer instead would have sent about three quarters).
    assert result.problems() == []
    assert result.completed >= 0.9 * rate * 4
    assert result.completed <= 1.1 * rate * 4
