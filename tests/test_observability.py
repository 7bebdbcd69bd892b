"""Traces, logs, metrics and health endpoints, seen the way a user sees them, on a real RabbitMQ.

Each test gets its own vhost, writes its topology into ``tmp_path`` and runs the worker in the
test's event loop. Spans go to an in-memory exporter installed as rabbitflow's tracing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest
import structlog
from opentelemetry import trace
from opentelemetry.instrumentation.aio_pika import AioPikaInstrumentor
from opentelemetry.trace import SpanKind, StatusCode

from rabbitflow import App, Message, Reject, Retry
from rabbitflow._logging import configure_logging
from rabbitflow._outcome import Action
from rabbitflow._tracing import Tracing, set_tracing
from rabbitflow._worker import Worker
from tests.support.broker import Rabbit
from tests.support.network import BrokerGate, free_port, http_get
from tests.support.output import body_of, forget_cached_loggers, json_lines, parse_metrics, sample
from tests.support.processes import ROOT
from tests.support.spans import Spans, capture_spans
from tests.support.topology import write_topology
from tests.support.waiting import wait_for
from tests.support.worker import running

pytestmark = pytest.mark.broker


@pytest.fixture
def spans() -> Iterator[Spans]:
    with capture_spans() as captured:
        yield captured


def attributes(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def scope(span: Any) -> str:
    """Name of the instrumentation (the tracer) that made ``span``."""
    return span.instrumentation_scope.name if span.instrumentation_scope else ""


def by_attempt(consumer_spans: list[Any]) -> list[Any]:
    return sorted(consumer_spans, key=lambda span: attributes(span)["rabbitflow.attempt"])


# -- traces ----------------------------------------------------------------------------------


async def test_consumer_span_is_a_child_of_the_publish_span(
    tmp_path: Path, vhost_url: str, spans: Spans
) -> None:
    # given a worker consuming "orders"
    app = App(write_topology(tmp_path, "orders"))
    bodies: list[bytes] = []

    @app.consumer("orders")
    async def handle(message: Message) -> None:
        bodies.append(message.body)

    async with running(app, vhost_url):
        # when a caller publishes inside a span of its own
        with spans.provider.get_tracer("caller").start_as_current_span("checkout") as parent:
            message_id = await app.publish(
                "events", "orders", {"order_id": 7}, correlation_id="conversation-1"
            )
        [consumer] = await wait_for(lambda: spans.consumers("orders"), "the consumer span")

    # then checkout → publish events → process orders, all in one trace
    [publish] = spans.named("publish events")
    trace_id = parent.get_span_context().trace_id
    assert publish.kind is SpanKind.PRODUCER
    assert publish.parent is not None
    assert publish.parent.span_id == parent.get_span_context().span_id
    assert consumer.kind is SpanKind.CONSUMER
    assert consumer.parent is not None
    assert consumer.parent.span_id == publish.context.span_id
    assert {publish.context.trace_id, consumer.context.trace_id} == {trace_id}
    assert consumer.status.status_code is StatusCode.UNSET
    assert attributes(consumer) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "events",
        "messaging.rabbitmq.destination.routing_key": "orders",
        "messaging.rabbitmq.queue": "orders",
        "messaging.message.id": message_id,
        "messaging.message.conversation_id": "conversation-1",
        "messaging.message.body.size": len(bodies[0]),
        "rabbitflow.attempt": 1,
        "rabbitflow.outcome": "ack",
    }
    assert attributes(publish)["messaging.message.id"] == message_id


async def test_a_retry_beyond_the_largest_tier_stays_in_one_trace_across_its_hops(
    tmp_path: Path, vhost_url: str, spans: Spans
) -> None:
    # given a handler that asks for a retry in 0.5 s while the largest tier is 200 ms
    app = App(write_topology(tmp_path, "patient"))
    runs: list[int] = []

    @app.consumer("patient")
    async def handle(message: Message) -> None:
        runs.append(message.attempt)
        if message.attempt == 1:
            raise Retry(0.5)

    async with running(app, vhost_url):
        # when one message is published
        await app.publish("events", "patient", {"n": 1})
        await wait_for(lambda: len(runs) == 2, "the second run", timeout=10)
        await wait_for(
            lambda: any(attributes(s)["rabbitflow.outcome"] == "ack" for s in spans.consumers()),
            "the acked span",
        )

    # then every span, the deferral hops included, is in the trace of the original publish
    [publish] = spans.named("publish events")
    consumers = spans.consumers("patient")
    outcomes = [attributes(span)["rabbitflow.outcome"] for span in consumers]
    assert outcomes[0] == "retry"
    assert outcomes[-1] == "ack"
    assert "deferred" in outcomes, outcomes
    assert {span.context.trace_id for span in consumers} == {publish.context.trace_id}
    # and each hop is parented on the copy published by the hop before it
    copies = {span.context.span_id: span for span in spans.named("publish amq.default")}
    for span in consumers[1:]:
        assert span.parent is not None
        assert span.parent.span_id in copies


async def test_retries_and_dead_letter_stay_in_one_trace(
    tmp_path: Path, vhost_url: str, spans: Spans
) -> None:
    # given a handler that fails until fixed, 3 attempts, retry tiers of 100ms and 200ms
    app = App(write_topology(tmp_path, "flaky"))
    fixed = False

    @app.consumer("flaky")
    async def handle(message: Message) -> None:
        if not fixed:
            raise ValueError(f"boom on attempt {message.attempt}")

    async with running(app, vhost_url):
        # when one message is published, dead-lettered, and replayed from the DLQ once fixed
        await app.publish("events", "flaky", {"n": 1})
        await wait_for(
            lambda: len(spans.consumers("flaky")) == 3 and spans.named("publish dlx"),
            "three attempts and the dead-letter publish",
        )
        consumers = spans.consumers("flaky")
        fixed = True
        replay = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rabbitflow", "dlq", "replay", "flaky", "--url", vhost_url,
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        replay_output, _ = await replay.communicate()
        assert replay.returncode == 0, replay_output.decode()
        [replayed] = await wait_for(
            lambda: [s for s in spans.consumers() if attributes(s)["rabbitflow.outcome"] == "ack"],
            "the replayed delivery",
        )

    # then three consumer spans share the trace of the original publish
    first, second, third = by_attempt(consumers)
    [publish] = spans.named("publish events")
    assert {span.context.trace_id for span in consumers} == {publish.context.trace_id}
    assert [attributes(span)["rabbitflow.attempt"] for span in (first, second, third)] == [1, 2, 3]
    assert [attributes(span)["rabbitflow.outcome"] for span in (first, second, third)] == [
        "retry",
        "retry",
        "dead_letter",
    ]
    # each attempt is parented on the retry publish of the attempt before it
    retries = {span.context.span_id: span for span in spans.named("publish amq.default")}
    for earlier, later in ((first, second), (second, third)):
        assert later.parent is not None
        retry_publish = retries[later.parent.span_id]
        assert retry_publish.kind is SpanKind.PRODUCER
        assert retry_publish.parent is not None
        assert retry_publish.parent.span_id == earlier.context.span_id
    [dead_letter] = spans.named("publish dlx")
    assert dead_letter.parent is not None
    assert dead_letter.parent.span_id == third.context.span_id
    # and the failure is on the span: ERROR status and the exception event
    assert third.status.status_code is StatusCode.ERROR
    [event] = [event for event in third.events if event.name == "exception"]
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"
    assert event.attributes["exception.message"] == "boom on attempt 3"
    assert all(span.status.status_code is StatusCode.ERROR for span in (first, second))
    # the replayed copy starts a fresh cycle in the same trace, under the dead-letter publish
    assert replayed.context.trace_id == publish.context.trace_id
    assert attributes(replayed)["rabbitflow.attempt"] == 1
    assert replayed.parent is not None
    assert replayed.parent.span_id == dead_letter.context.span_id


async def test_handler_spans_nest_under_the_consumer_span(
    tmp_path: Path, vhost_url: str, spans: Spans
) -> None:
    # given an async and a sync handler that each open a span of their own
    app = App(write_topology(tmp_path, "async-work", "sync-work"))
    tracer = trace.get_tracer("handler", tracer_provider=spans.provider)
    threads: list[str] = []

    @app.consumer("async-work")
    async def handle_async(message: Message) -> None:
        with tracer.start_as_current_span("async step"):
            await asyncio.sleep(0)

    @app.consumer("sync-work")
    def handle_sync(message: Message) -> None:
        with tracer.start_as_current_span("sync step"):
            threads.append(threading.current_thread().name)

    async with running(app, vhost_url):
        # when each gets a message
        await app.publish("events", "async-work", {"n": 1})
        await app.publish("events", "sync-work", {"n": 2})
        await wait_for(
            lambda: len(spans.consumers()) == 2 and len(spans.all()) == 6, "both consumer spans"
        )

    # then each handler span is a child of its delivery's consumer span
    for queue, step in (("async-work", "async step"), ("sync-work", "sync step")):
        [consumer] = spans.consumers(queue)
        [child] = spans.named(step)
        assert child.parent is not None, step
        assert child.parent.span_id == consumer.context.span_id, step
        assert child.context.trace_id == consumer.context.trace_id, step
    # the sync handler really ran in a worker thread
    assert len(threads) == 1
    assert threads[0].startswith("rabbitflow-handler")


async def test_invalid_traceparent_starts_a_new_trace(
    tmp_path: Path, vhost_url: str, spans: Spans
) -> None:
    # given messages whose traceparent header is junk of several types, and one valid as bytes
    # (AMQP field type "x", byte array, which Java clients send for byte[])
    app = App(write_topology(tmp_path, "inbox"))
    handled: list[str | None] = []

    @app.consumer("inbox")
    async def handle(message: Message) -> None:
        handled.append(message.message_id)

    valid_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers: dict[str, Any] = {
        "garbage": {"traceparent": "not a traceparent", "tracestate": "!!!"},
        "bytes": {"traceparent": bytearray(b"\x00\xff\xfe junk")},
        "int": {"traceparent": 42},
        "valid-bytes": {"traceparent": bytearray(f"00-{valid_trace}-00f067aa0ba902b7-01".encode())},
    }
    async with running(app, vhost_url):
        # when they are published by a client that is not rabbitflow
        connection = await aio_pika.connect(vhost_url)
        async with connection:
            channel = await connection.channel()
            for message_id, header in headers.items():
                message = aio_pika.Message(b'{"n": 1}', headers=header, message_id=message_id)
                await channel.default_exchange.publish(message, routing_key="inbox")
        await wait_for(lambda: len(spans.consumers("inbox")) == 4, "four consumer spans")

    # then each was processed, junk starting a trace of its own
    assert sorted(handled, key=str) == sorted(headers)
    consumers = {attributes(span)["messaging.message.id"]: span for span in spans.consumers()}
    for message_id in ("garbage", "bytes", "int"):
        span = consumers[message_id]
        assert span.parent is None, message_id
        assert span.context.trace_id != 0, message_id
        assert attributes(span)["rabbitflow.outcome"] == "ack", message_id
    assert len({consumers[m].context.trace_id for m in ("garbage", "bytes", "int")}) == 3
    # and a well-formed traceparent that arrives as bytes is still honoured
    honoured = consumers["valid-bytes"]
    assert format(honoured.context.trace_id, "032x") == valid_trace
    assert honoured.parent is not None
    assert honoured.parent.span_id == 0x00F067AA0BA902B7


async def test_aio_pika_instrumentation_adds_no_duplicate_spans(
    tmp_path: Path, vhost_url: str, spans: Spans
) -> None:
    # given aio-pika's OpenTelemetry instrumentation active on the same provider. It declares
    # aio_pika < 10 and refuses to instrument aio-pika 10 unless forced, so force it.
    app = App(write_topology(tmp_path, "audit"))

    @app.consumer("audit")
    async def handle(message: Message) -> None:
        pass

    instrumentor = AioPikaInstrumentor()
    instrumentor.instrument(tracer_provider=spans.provider, skip_dep_check=True)
    try:
        async with running(app, vhost_url):
            # when three messages come through rabbitflow and one through aio-pika's API
            ids = [await app.publish("events", "audit", {"n": n}) for n in range(3)]
            connection = await aio_pika.connect(vhost_url)
            async with connection:
                channel = await connection.channel()
                exchange = await channel.get_exchange("events")
                await exchange.publish(
                    aio_pika.Message(b'{"n": 3}', message_id="via-aio-pika"), routing_key="audit"
                )
            ids.append("via-aio-pika")
            await wait_for(lambda: len(spans.consumers()) >= 4, "four consumer spans")
            await asyncio.sleep(0.3)  # room for a duplicate to show up
    finally:
        instrumentor.uninstrument()

    # then there is exactly one consumer span per delivery, all rabbitflow's
    consumers = spans.consumers()
    assert sorted(attributes(span)["messaging.message.id"] for span in consumers) == sorted(ids)
    assert {span.name for span in consumers} == {"process audit"}
    assert {scope(span) for span in consumers} == {"test"}
    # the instrumentation was live: it traced aio-pika's own publish, and the consumer span of
    # that message continues its trace
    [aio_pika_publish] = [
        span for span in spans.all() if scope(span) == "opentelemetry.instrumentation.aio_pika"
    ]
    assert aio_pika_publish.kind is SpanKind.PRODUCER
    [continued] = [s for s in consumers if attributes(s)["messaging.message.id"] == "via-aio-pika"]
    assert continued.parent is not None
    assert continued.parent.span_id == aio_pika_publish.context.span_id


async def test_tracing_off_creates_no_spans_and_processes_messages(
    tmp_path: Path, vhost_url: str
) -> None:
    # given tracing switched off
    set_tracing(Tracing(None))
    app = App(write_topology(tmp_path, "plain"))
    seen: list[tuple[bool, dict[str, Any]]] = []

    @app.consumer("plain")
    async def handle(message: Message) -> None:
        seen.append((trace.get_current_span().get_span_context().is_valid, message.headers))

    try:
        async with running(app, vhost_url) as worker:
            # when rabbitflow publishes one message and a traced client another
            await app.publish("events", "plain", {"n": 1}, headers={"k": "v"})
            connection = await aio_pika.connect(vhost_url)
            async with connection:
                channel = await connection.channel()
                traced: dict[str, Any] = {
                    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                }
                await channel.default_exchange.publish(
                    aio_pika.Message(b'{"n": 2}', headers=traced), routing_key="plain"
                )
            acked = worker.metrics.consumed.labels("plain", Action.ACK.value)
            await wait_for(lambda: acked.value == 2, "two acks")
    finally:
        set_tracing(None)

    # then both were handled with no span current, and rabbitflow added no trace header
    assert [valid for valid, _ in seen] == [False, False]
    published = next(headers for _, headers in seen if "k" in headers)
    assert "traceparent" not in published


# -- logs ------------------------------------------------------------------------------------


@pytest.fixture
def fresh_logging() -> Iterator[None]:
    """Loggers that follow the configuration of this test, and structlog's defaults after it."""
    forget_cached_loggers()
    try:
        yield
    finally:
        structlog.reset_defaults()
        forget_cached_loggers()


async def test_log_lines_carry_the_delivery_and_only_failures_are_logged(
    tmp_path: Path,
    vhost_url: str,
    spans: Spans,
    capsys: pytest.CaptureFixture[str],
    fresh_logging: None,
) -> None:
    # given a handler that logs for some messages and fails for others, JSON logs at INFO
    configure_logging("json", "info")
    app = App(write_topology(tmp_path, "logs"))
    user_log = structlog.get_logger("user")

    @app.consumer("logs")
    async def handle(message: Message) -> None:
        kind = body_of(message)["kind"]
        if kind == "log":
            user_log.info("handler says hello")
        elif kind == "fail":
            raise ValueError("boom")

    async with running(app, vhost_url) as worker:
        # when three messages succeed quietly, one logs and one fails on every attempt
        quiet = [await app.publish("events", "logs", {"kind": "ok"}) for _ in range(3)]
        talking = await app.publish("events", "logs", {"kind": "log"})
        failing = await app.publish("events", "logs", {"kind": "fail"})
        dead = worker.metrics.consumed.labels("logs", Action.DEAD_LETTER.value)
        await wait_for(lambda: dead.value == 1, "the dead letter")
    lines = json_lines(capsys.readouterr().err)

    # then the handler's line carries the delivery and its consumer span
    [hello] = [line for line in lines if line["event"] == "handler says hello"]
    [consumer] = [s for s in spans.consumers() if attributes(s)["messaging.message.id"] == talking]
    assert hello["level"] == "info"
    assert hello["queue"] == "logs"
    assert hello["message_id"] == talking
    assert hello["attempt"] == 1
    assert hello["trace_id"] == format(consumer.context.trace_id, "032x")
    assert hello["span_id"] == format(consumer.context.span_id, "016x")
    # successful messages log nothing
    assert not [line for line in lines if line.get("message_id") in quiet]
    assert not [line for line in lines if any(q in json.dumps(line) for q in quiet)]
    # a retry is a WARNING, the dead letter an ERROR, each with the attempt it failed on
    failures = [
        (line["level"], line["event"], line["attempt"])
        for line in lines
        if line.get("message_id") == failing
    ]
    assert failures == [
        ("warning", "retry scheduled", 1),
        ("warning", "retry scheduled", 2),
        ("error", "message dead-lettered", 3),
    ]
    assert all(
        line["queue"] == "logs" and len(line["trace_id"]) == 32
        for line in lines
        if line.get("message_id") == failing
    )


def rabbitflow_run(
    tmp_path: Path, name: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    out = (tmp_path / f"{name}.log").open("wb")
    command = [sys.executable, "-m", "rabbitflow", *args]
    environment = {k: v for k, v in os.environ.items() if k != "RABBITFLOW_URL"}
    environment.update({"OTEL_TRACES_EXPORTER": "none", **(env or {})})
    with out:
        return subprocess.Popen(
            command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=environment
        )


@pytest.mark.slow
async def test_passwords_never_reach_the_logs(tmp_path: Path, vhost_url: str) -> None:
    # given broker URLs with the password "sekret": unreachable, or refusing the login
    topology = str(write_topology(tmp_path, "cli.work"))
    target = "tests.apps.obs_cli:cli_app"
    unreachable = "amqp://guest:sekret@127.0.0.1:1/"
    refusing = vhost_url.replace("guest:guest@", "guest:sekret@")
    assert "sekret" in refusing
    runs = {
        "json": rabbitflow_run(
            tmp_path, "json", "run", target, "--url", unreachable, "--topology", topology,
            "--log-format", "json",
        ),
        "console": rabbitflow_run(
            tmp_path, "console", "run", target, "--topology", topology, "--log-format", "console",
            env={"RABBITFLOW_URL": unreachable},
        ),
        "refused": rabbitflow_run(
            tmp_path, "refused", "--debug", "run", target, "--url", refusing, "--topology",
            topology, "--log-format", "json",
        ),
    }  # fmt: skip
    try:
        # when they run for three seconds (and have tried to connect a few times), then get SIGTERM
        await asyncio.sleep(3)
        await wait_for(
            lambda: (
                all(
                    (tmp_path / f"{name}.log").read_text().count("broker unreachable") >= 2
                    for name in ("json", "console")
                )
                and runs["refused"].poll() is not None
            ),  # it exits by itself on ACCESS_REFUSED
            "the workers to retry connecting, and the refused one to exit",
            timeout=20,
        )
        codes = {}
        for name, process in runs.items():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            codes[name] = await asyncio.to_thread(process.wait, 15)
    except AssertionError as exc:
        states = {name: process.poll() for name, process in runs.items()}
        logs = {name: (tmp_path / f"{name}.log").read_text() for name in runs}
        raise AssertionError(f"{exc}; exit codes {states}; output {logs}") from None
    finally:
        for process in runs.values():
            if process.poll() is None:
                process.kill()
                process.wait(5)
    output = {name: (tmp_path / f"{name}.log").read_text() for name in runs}

    # then no output line shows the password, and the masked URL is there instead
    for name, text in output.items():
        assert "sekret" not in text, f"{name} run leaked the password:\n{text}"
    assert codes == {"json": 0, "console": 0, "refused": 1}, output
    json_events = json_lines(output["json"])
    # every line of --log-format json is a JSON object, aiormq's own log records included
    assert len(json_events) == len(output["json"].splitlines()), output["json"]
    [starting] = [line for line in json_events if line["event"] == "starting"]
    assert starting["url"] == "amqp://guest:***@127.0.0.1:1/"
    assert [line for line in json_events if line["event"] == "broker unreachable; retrying"]
    assert "amqp://guest:***@127.0.0.1:1/" in output["console"]
    assert "broker unreachable; retrying" in output["console"]
    assert "guest:***@" in output["refused"]


@pytest.mark.slow
async def test_spans_are_exported_before_rabbitflow_run_exits(
    tmp_path: Path, vhost_url: str
) -> None:
    # given `rabbitflow run` with OTEL_TRACES_EXPORTER=console (spans are batched, every 5s)
    topology = str(write_topology(tmp_path, "cli.work"))
    worker = rabbitflow_run(
        tmp_path, "worker", "run", "tests.apps.obs_cli:cli_app", "--url", vhost_url,
        "--topology", topology, "--log-format", "json",
        env={"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "obs-test"},
    )  # fmt: skip
    output = tmp_path / "worker.log"
    try:
        await wait_for(lambda: '"consuming"' in output.read_text(), "the worker", timeout=20)
        # when a message is processed and the worker gets SIGTERM right away
        connection = await aio_pika.connect(vhost_url)
        async with connection:
            channel = await connection.channel()
            await channel.default_exchange.publish(
                aio_pika.Message(b"{}", message_id="last-one"), routing_key="cli.work"
            )
            for _ in range(200):  # until the broker has delivered it
                queue = await channel.declare_queue("cli.work", passive=True)
                if queue.declaration_result.message_count == 0:
                    break
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.wait, 15)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(5)

    # then its consumer span was printed before the process left
    text = output.read_text()
    assert code == 0, text
    assert '"name": "process cli.work"' in text, text
    assert '"messaging.message.id": "last-one"' in text, text


# -- metrics and health ----------------------------------------------------------------------


@pytest.mark.slow
async def test_metrics_and_health_endpoints(
    tmp_path: Path, rabbit: Rabbit, vhost: str, vhost_url: str
) -> None:
    # given a worker serving /metrics on a free port, its handler succeeding, failing or rejecting
    app = App(write_topology(tmp_path, "metered"))

    @app.consumer("metered")
    async def handle(message: Message) -> None:
        kind = body_of(message)["kind"]
        if kind == "fail":
            raise ValueError("boom")
        if kind == "reject":
            raise Reject("unprocessable")

    port = free_port()
    async with (
        BrokerGate(port=urlsplit(rabbit.url).port or 5672) as gate,
        running(app, gate.url(vhost_url), metrics_port=port, max_reconnect_wait=1.0) as worker,
    ):
        assert await http_get(port, "/healthz") == (200, "ok\n")
        assert await http_get(port, "/readyz") == (200, "ready\n")

        # when 5 messages succeed, 1 fails 3 times and 1 is rejected
        for kind in ["ok"] * 5 + ["fail", "reject"]:
            await app.publish("events", "metered", {"kind": kind})
        dead = worker.metrics.consumed.labels("metered", Action.DEAD_LETTER.value)
        await wait_for(lambda: dead.value == 2, "two dead letters")
        status, text = await http_get(port, "/metrics")

        # then the counters say so, and the histogram counted every delivery
        assert status == 200
        metrics = parse_metrics(text)
        assert sample(metrics, "rabbitflow_messages_total", queue="metered", outcome="ack") == 5
        assert sample(metrics, "rabbitflow_messages_total", queue="metered", outcome="retry") == 2
        assert (
            sample(metrics, "rabbitflow_messages_total", queue="metered", outcome="dead_letter")
            == 2
        )
        assert sample(metrics, "rabbitflow_retries_total", queue="metered", tier="100ms") == 1
        assert sample(metrics, "rabbitflow_retries_total", queue="metered", tier="200ms") == 1
        assert (
            sample(
                metrics, "rabbitflow_dead_lettered_total", queue="metered", error_type="ValueError"
            )
            == 1
        )
        assert (
            sample(
                metrics,
                "rabbitflow_dead_lettered_total",
                queue="metered",
                error_type="rabbitflow.errors.Reject",
            )
            == 1
        )
        assert sample(metrics, "rabbitflow_handler_duration_seconds_count", queue="metered") == 9
        assert (
            sample(
                metrics, "rabbitflow_handler_duration_seconds_bucket", queue="metered", le="+Inf"
            )
            == 9
        )
        assert sample(metrics, "rabbitflow_in_flight_messages", queue="metered") == 0
        assert sample(metrics, "rabbitflow_ready") == 1
        assert sample(metrics, "rabbitflow_reconnections_total") == 0

        # when the broker closes the worker's connection and cannot be reached for a while
        gate.shut()
        pids = [pid for pid, name in await connections(rabbit) if name == vhost]
        assert pids
        for pid in pids:
            await ctl(rabbit, "close_connection", pid, "test")
        # then /readyz says 503 for as long as that lasts, while /healthz stays 200
        await wait_for_status(port, "/readyz", 503)
        await asyncio.sleep(0.5)
        assert await http_get(port, "/readyz") == (503, "not ready\n")
        assert await http_get(port, "/healthz") == (200, "ok\n")
        assert sample(parse_metrics((await http_get(port, "/metrics"))[1]), "rabbitflow_ready") == 0

        # and once the broker can be reached again, the worker is ready and consuming
        await gate.open()
        await wait_for_status(port, "/readyz", 200, timeout=15)
        await app.publish("events", "metered", {"kind": "ok"})
        acked = worker.metrics.consumed.labels("metered", Action.ACK.value)
        await wait_for(lambda: acked.value == 6, "the ack after reconnecting")
        metrics = parse_metrics((await http_get(port, "/metrics"))[1])
        reconnections = sample(metrics, "rabbitflow_reconnections_total")
        assert reconnections is not None
        assert reconnections >= 1
        assert sample(metrics, "rabbitflow_ready") == 1


async def test_circuit_breaker_gauge_follows_the_breaker(tmp_path: Path, vhost_url: str) -> None:
    # given a consumer whose breaker opens after 2 failures out of 2 and cools down for 1s
    breaker = (
        'circuit_breaker = { failure_ratio = 1.0, window = "10s", min_calls = 2, cooldown = "1s" }'
    )
    app = App(write_topology(tmp_path, "fragile", extra=breaker))
    down = True

    @app.consumer("fragile")
    async def handle(message: Message) -> None:
        if down:
            raise ConnectionError("downstream is down")

    def gauge(worker: Worker) -> float | None:
        metrics = parse_metrics(worker.metrics.render())
        return sample(metrics, "rabbitflow_circuit_breaker_open", queue="fragile")

    async with running(app, vhost_url) as worker:
        assert gauge(worker) == 0
        # when the handler fails twice
        for n in range(2):
            await app.publish("events", "fragile", {"n": n})
        # then the gauge says open
        await wait_for(lambda: gauge(worker) == 1, "rabbitflow_circuit_breaker_open 1")
        # and once downstream is back, the trial call closes the breaker and the gauge
        down = False
        acked = worker.metrics.consumed.labels("fragile", Action.ACK.value)
        await wait_for(lambda: acked.value == 2, "both messages acked", timeout=15)
        assert gauge(worker) == 0


async def ctl(rabbit: Rabbit, *args: str) -> str:
    """``rabbitmqctl`` off the event loop, which the worker under test shares."""
    return await asyncio.to_thread(rabbit.ctl, *args)


async def connections(rabbit: Rabbit) -> list[tuple[str, str]]:
    """(pid, vhost) of every client connection of the broker."""
    out = await ctl(rabbit, "list_connections", "pid", "vhost", "--no-table-headers", "--quiet")
    rows = [line.split("\t") for line in out.splitlines() if "\t" in line]
    return [(row[0], row[1]) for row in rows]


async def wait_for_status(port: int, path: str, status: int, timeout: float = 10.0) -> None:
    seen: list[int] = []

    async def poll() -> None:
        while not seen or seen[-1] != status:
            seen.append((await http_get(port, path))[0])
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"{path} never answered {status}; saw {sorted(set(seen))}") from None
