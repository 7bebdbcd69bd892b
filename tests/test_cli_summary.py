"""The start-up summary of `rabbitflow run`, and the warning when nothing will be consumed."""

from __future__ import annotations

import json

from structlog.testing import capture_logs

from rabbitflow import App
from rabbitflow._summary import build, log_summary, warn_if_idle
from rabbitflow._worker import Worker, WorkerOptions
from rabbitflow.topology import parse_topology

TOPOLOGY = """
[queues.billing]
prefetch = 10
concurrency = 4
timeout = "30s"
retry = { delays = ["5s", "1m"] }

[queues.audit]
retry = false
dead_letter = false

[queues.unused]
"""


def worker(toml: str = TOPOLOGY, queues: tuple[str, ...] = ("billing", "audit")) -> Worker:
    app = App()
    for queue in queues:

        async def handle(body: dict[str, object]) -> None:
            """A handler."""

        app.consumer(queue)(handle)
    options = WorkerOptions(url="amqp://svc:hunter2@broker:5672/prod", metrics_port=9100)
    return Worker(app, parse_topology(toml, "topology.toml"), options)


def test_the_summary_lists_each_consumer_and_masks_the_password() -> None:
    text = "\n".join(build(worker(), "3.13.1").lines())
    assert "hunter2" not in text
    assert "broker    amqp://svc:***@broker:5672/prod (RabbitMQ 3.13.1)" in text
    assert "consumer  billing -> " in text
    assert "prefetch 10, concurrency 4, timeout 30s" in text
    assert "retries after 5s, 1m (billing.retry.*), at most 3 attempts" in text
    assert "dead letters: billing.dlq" in text
    assert "dead letters: dropped (no DLQ)" in text
    assert "not consumed  unused (no handler)" in text
    assert "metrics   http://127.0.0.1:9100/metrics" in text
    assert "tracing   off" in text


def test_the_json_event_carries_the_same_facts() -> None:
    fields = build(worker(), None).fields()
    json.dumps(fields)  # one JSON event: every field serialisable
    billing = next(c for c in fields["consumers"] if c["queue"] == "billing")
    assert billing["retry_tiers"] == ("billing.retry.5s", "billing.retry.1m")
    assert billing["concurrency"] == 4
    assert fields["broker"] == "amqp://svc:***@broker:5672/prod"


def test_console_summary_is_one_block() -> None:
    with capture_logs() as logs:
        log_summary(worker(), "3.13.1")
    assert len(logs) == 1
    assert logs[0]["event"].startswith("started\n  broker ")


def test_no_consumers_is_a_warning() -> None:
    with capture_logs() as logs:
        warn_if_idle(worker(queues=()))
    assert [entry["log_level"] for entry in logs] == ["warning"]
    assert "nothing will be consumed" in logs[0]["event"]


def test_no_queues_is_a_warning() -> None:
    with capture_logs() as logs:
        warn_if_idle(worker("[defaults]\nprefetch = 5\n", queues=()))
    assert logs[0]["event"] == "topology.toml has no queues: nothing will be consumed"


def test_a_busy_worker_gets_no_warning() -> None:
    with capture_logs() as logs:
        warn_if_idle(worker())
    assert logs == []
