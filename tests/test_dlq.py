"""``rabbitflow dlq list|replay|purge`` against a real broker, one fresh vhost per test."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
from click.testing import CliRunner, Result

from rabbitflow import _headers as h
from rabbitflow import dlq
from rabbitflow.cli import _register, cli
from rabbitflow.connection import connect
from rabbitflow.dlq import ReplayReport, preview, replay_headers
from rabbitflow.topology import derive, parse_topology
from rabbitflow.topology._declare import declare

Q = "billing.order-created"
DLQ = f"{Q}.dlq"
DECLINED = "app.billing.PaymentDeclined"
TIMEOUT = "app.clients.UpstreamTimeout"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass(frozen=True)
class Got:
    """A message read back from a queue."""

    message_id: str | None
    correlation_id: str | None
    content_type: str | None
    delivery_mode: int
    headers: dict[str, Any]
    body: bytes


@pytest.fixture(autouse=True)
def _no_topology_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty directory, so the repository's topology.toml is not picked up, and
    make a forgotten --url fail instead of touching the broker's default vhost."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RABBITFLOW_URL", "amqp://guest:guest@127.0.0.1:1/")


def invoke(*args: str) -> Result:
    _register()
    return CliRunner().invoke(cli, list(args))


def topology(queue_type: str = "quorum") -> str:
    return f'[queues."{Q}"]\nqueue_type = "{queue_type}"\nretry = false\n'


def failed(number: int, error_type: str, **extra: Any) -> aio_pika.Message:
    """A message the way the worker dead-letters it after its 4th attempt."""
    headers: dict[str, Any] = {
        h.ATTEMPT: 4,
        h.ORIGIN_QUEUE: Q,
        h.ORIGIN_EXCHANGE: "orders",
        h.ORIGIN_ROUTING_KEY: "order.created",
        h.FIRST_FAILED_AT: (datetime.now(UTC) - timedelta(minutes=5)).isoformat(),
        h.ERROR_TYPE: error_type,
        h.ERROR_MESSAGE: f"{error_type.rsplit('.', 1)[-1]} for order {number}",
        h.ERROR_STACK: 'Traceback (most recent call last):\n  File "app.py", line 3\n',
        "traceparent": TRACEPARENT,
        "tenant": "acme",
        **extra,
    }
    return aio_pika.Message(
        f'{{"order_id": {number}}}'.encode(),
        headers=headers,
        content_type="application/json",
        message_id=f"m-{number}",
        correlation_id=f"c-{number}",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def seed(url: str, messages: list[aio_pika.Message], queue_type: str = "quorum") -> None:
    """Declare the topology of Q and dead-letter ``messages`` into Q.dlq through the DLX."""

    async def run() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            await declare(connection, derive(parse_topology(topology(queue_type))))
            channel = await connection.channel()
            dlx = await channel.get_exchange("dlx")
            for message in messages:
                await dlx.publish(message, routing_key=Q)

    asyncio.run(run())


def drain(url: str, queue: str) -> list[Got]:
    """Take every message off ``queue``, in order."""

    async def run() -> list[Got]:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            source = await channel.get_queue(queue)
            got: list[Got] = []
            while (message := await source.get(no_ack=True, fail=False)) is not None:
                got.append(
                    Got(
                        message.message_id,
                        message.correlation_id,
                        message.content_type,
                        int(message.delivery_mode or 0),
                        dict(message.headers),
                        message.body,
                    )
                )
            return got

    return asyncio.run(run())


def ids(messages: list[Got]) -> list[str | None]:
    return [message.message_id for message in messages]


def two_error_types(count: int = 6) -> Iterator[aio_pika.Message]:
    """m-1 declined, m-2 timeout, m-3 declined..."""
    for number in range(1, count + 1):
        yield failed(number, DECLINED if number % 2 else TIMEOUT)


# --- list -----------------------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_list_shows_the_head_of_the_dlq_and_leaves_it_unchanged(
    vhost_url: str, queue_type: str
) -> None:
    seed(vhost_url, list(two_error_types(5)), queue_type)

    result = invoke("dlq", "list", Q, "--limit", "3", "--url", vhost_url)

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{DLQ}: 5 messages, showing the first 3"
    assert "#1  message_id: m-1" in lines
    assert f"    error:       {DECLINED}: PaymentDeclined for order 1" in lines
    assert f"    error:       {TIMEOUT}: UpstreamTimeout for order 2" in lines
    assert "    attempt:     4" in lines
    assert f"    origin:      {Q}" in lines
    assert "    replays:     0" in lines
    assert '    body:        15 bytes, application/json: {"order_id": 1}' in lines
    assert any(line.startswith("    age:         5m0") for line in lines)
    assert "m-4" not in result.output
    assert ids(drain(vhost_url, DLQ)) == ["m-1", "m-2", "m-3", "m-4", "m-5"]


@pytest.mark.broker
def test_repeated_lists_of_a_long_quorum_dlq_keep_its_order(vhost_url: str) -> None:
    # Quorum queues give unacked messages back ahead of the others, so a short list after a
    # longer one must read every message given back, or it would move them to the back.
    seed(vhost_url, list(two_error_types(80)))

    for limit in ("50", "3", "80", "1", "10"):
        result = invoke("dlq", "list", Q, "--limit", limit, "--url", vhost_url)
        assert result.exit_code == 0, result.output
    replayed = invoke(
        "dlq", "replay", Q, "--error-type", "PaymentDeclined", "--limit", "5", "--url", vhost_url
    )
    assert replayed.exit_code == 0, replayed.output
    assert invoke("dlq", "list", Q, "--limit", "2", "--url", vhost_url).exit_code == 0

    moved = {f"m-{n}" for n in (1, 3, 5, 7, 9)}
    assert ids(drain(vhost_url, Q)) == sorted(moved)
    expected = [f"m-{n}" for n in range(1, 81) if f"m-{n}" not in moved]
    assert ids(drain(vhost_url, DLQ)) == expected


@pytest.mark.broker
def test_list_json_has_decoded_headers_and_a_bounded_body_preview(vhost_url: str) -> None:
    seed(vhost_url, [failed(1, DECLINED), failed(2, TIMEOUT)])

    result = invoke("dlq", "list", DLQ, "--json", "--url", vhost_url)

    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert (document["queue"], document["dlq"], document["count"]) == (Q, DLQ, 2)
    first = document["messages"][0]
    assert first["message_id"] == "m-1"
    assert first["error_type"] == DECLINED
    assert first["attempt"] == 4
    assert first["replay_count"] == 0
    assert first["age_source"] == h.FIRST_FAILED_AT
    assert 290 < first["age_seconds"] < 600
    assert first["headers"][h.ERROR_STACK].startswith("Traceback")
    assert first["headers"]["traceparent"] == TRACEPARENT
    assert (first["body_size"], first["body_preview"]) == (15, '{"order_id": 1}')
    assert document["messages"][1]["error_type"] == TIMEOUT


@pytest.mark.broker
def test_list_escapes_binary_bodies_and_never_prints_a_whole_large_one(vhost_url: str) -> None:
    pickled = aio_pika.Message(b"\x80\x04\x95\nline\x00" + b"x" * 100_000, message_id="bin")
    seed(vhost_url, [pickled])

    result = invoke("dlq", "list", Q, "--url", vhost_url)

    assert result.exit_code == 0, result.output
    body = next(line for line in result.output.splitlines() if "body:" in line)
    assert body.startswith("    body:        100009 bytes: \\x80\\x04\\x95\\nline\\x00xxx")
    assert body.endswith("x...")
    assert len(body) < 200
    assert "(no rabbitflow-error-type header)" in result.output


@pytest.mark.broker
def test_list_of_a_message_the_broker_dead_lettered(vhost_url: str) -> None:
    seed(vhost_url, [])
    _reject_from_work_queue(vhost_url, aio_pika.Message(b"{}", message_id="rejected-1"))

    result = invoke("dlq", "list", Q, "--url", vhost_url)

    assert result.exit_code == 0, result.output
    assert "(no rabbitflow-error-type) dead-lettered by the broker: rejected" in result.output
    assert "(from the broker's x-death time; no rabbitflow-first-failed-at" in result.output
    assert f"    origin:      {Q}" in result.output


@pytest.mark.broker
def test_a_queue_without_dlq_is_one_line_and_exit_1(vhost_url: str) -> None:
    result = invoke("dlq", "list", "nope", "--url", vhost_url)

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: queue 'nope.dlq' does not exist in vhost 'rf-test-")


@pytest.mark.broker
def test_topology_file_explains_a_queue_declared_without_dlq(vhost_url: str) -> None:
    with open("topology.toml", "w") as file:
        file.write('[queues."audit.all"]\ndead_letter = false\n')

    result = invoke("dlq", "list", "audit.all", "--url", vhost_url)

    assert result.exit_code == 1
    assert "'audit.all' has dead_letter = false in topology.toml" in result.stderr


@pytest.mark.broker
def test_the_broker_url_can_come_from_the_topology_file(
    vhost_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RABBITFLOW_URL")
    seed(vhost_url, [failed(1, DECLINED)])
    with open("topology.toml", "w") as file:
        file.write(f'[broker]\nurl = "{vhost_url}"\n\n{topology()}')

    result = invoke("dlq", "list", Q)

    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{DLQ}: 1 message\n")


def test_unreachable_broker_is_one_line_with_the_password_masked() -> None:
    result = invoke("dlq", "list", Q, "--url", "amqp://guest:s3cret@127.0.0.1:1/")

    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot connect to amqp://guest:***@127.0.0.1:1/")
    assert result.stderr.count("\n") == 1
    assert "s3cret" not in result.output


# --- replay ---------------------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize("error_type", ["PaymentDeclined", DECLINED])
def test_replay_by_error_type_moves_only_those_and_resets_them(
    vhost_url: str, error_type: str
) -> None:
    seed(vhost_url, list(two_error_types(6)))

    result = invoke("dlq", "replay", Q, "--error-type", error_type, "--url", vhost_url)

    assert result.exit_code == 0, result.output
    assert result.output == (
        f"moved 3 messages from {DLQ} to {Q}, skipped 3 (error type is not {error_type}); "
        f"3 left in {DLQ}\n"
    )
    back = drain(vhost_url, Q)
    assert ids(back) == ["m-1", "m-3", "m-5"]
    for number, message in zip((1, 3, 5), back, strict=True):
        assert message.correlation_id == f"c-{number}"
        assert message.headers[h.REPLAY_COUNT] == 1
        # a fresh cycle: attempt 1, which also tells a later failure the origin is rabbitflow's
        assert message.headers[h.ATTEMPT] == 1
        assert not [name for name in message.headers if name.startswith("rabbitflow-error-")]
        # The quorum work queue itself adds x-delivery-count to every delivery.
        assert {name for name in message.headers if name.startswith("x-")} <= {"x-delivery-count"}
        assert message.headers["traceparent"] == TRACEPARENT
        assert message.headers["tenant"] == "acme"
        assert message.headers[h.ORIGIN_QUEUE] == Q
        assert (message.content_type, message.delivery_mode) == ("application/json", 2)
    assert back[0].body == b'{"order_id": 1}'
    assert ids(drain(vhost_url, DLQ)) == ["m-2", "m-4", "m-6"]


@pytest.mark.broker
def test_replay_dry_run_changes_nothing(vhost_url: str) -> None:
    seed(vhost_url, list(two_error_types(4)))

    result = invoke(
        "dlq", "replay", Q, "--error-type", "UpstreamTimeout", "--dry-run", "--url", vhost_url
    )

    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"dry run, nothing changed: would move 2 messages from {DLQ} to {Q}, "
        "skip 2 (error type is not UpstreamTimeout)",
        f"  #2  m-2  {TIMEOUT}: UpstreamTimeout for order 2",
        f"  #4  m-4  {TIMEOUT}: UpstreamTimeout for order 4",
    ]
    assert drain(vhost_url, Q) == []
    assert ids(drain(vhost_url, DLQ)) == ["m-1", "m-2", "m-3", "m-4"]


@pytest.mark.broker
def test_replay_select_from_python_moves_the_picked_messages_as_plain_copies(
    vhost_url: str,
) -> None:
    # given six failed messages, m-3 and m-5 with a per-message TTL and a user_id
    extra = {"expiration": 600_000, "user_id": "guest", "app_id": "shop", "priority": 3}
    messages = list(two_error_types(6))
    for number in (3, 5):
        message = messages[number - 1]
        messages[number - 1] = aio_pika.Message(
            message.body,
            headers=dict(message.headers),
            content_type=message.content_type,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            **extra,
        )
    seed(vhost_url, messages)

    # when a replay picks m-3, m-4 and m-5 by id, of the declined ones only
    async def run() -> tuple[ReplayReport, list[aio_pika.abc.AbstractIncomingMessage]]:
        connection = await connect(vhost_url)
        async with connection:
            report = await dlq.replay(
                connection,
                Q,
                error_type=DECLINED,
                select=lambda m: m.message_id in {"m-3", "m-4", "m-5"},
            )
            channel = await connection.channel()
            work = await channel.get_queue(Q)
            got = []
            while (message := await work.get(no_ack=True, fail=False)) is not None:
                got.append(message)
            return report, got

    report, back = asyncio.run(run())

    # then only m-3 and m-5 moved, the rest stayed in order, and the copies keep their
    # properties but neither the TTL nor the user_id
    assert (report.moved, report.skipped) == (2, 4)
    assert [m.message_id for m in back] == ["m-3", "m-5"]
    for number, message in zip((3, 5), back, strict=True):
        assert (message.app_id, message.priority) == ("shop", 3)
        assert message.correlation_id == f"c-{number}"
        assert message.expiration is None
        assert message.user_id is None
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert ids(drain(vhost_url, DLQ)) == ["m-1", "m-2", "m-4", "m-6"]


@pytest.mark.broker
@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_replay_limit_moves_the_oldest_first(vhost_url: str, queue_type: str) -> None:
    # The messages left behind keep their order: on 4.3 a quorum DLQ gets them back by one
    # basic.nack, which must not miss the ones the moved messages' acks have just let through.
    seed(vhost_url, list(two_error_types(5)), queue_type)

    result = invoke("dlq", "replay", Q, "--limit", "2", "--url", vhost_url)

    assert result.exit_code == 0, result.output
    assert result.output == f"moved 2 messages from {DLQ} to {Q}; 3 left in {DLQ}\n"
    assert ids(drain(vhost_url, Q)) == ["m-1", "m-2"]
    assert ids(drain(vhost_url, DLQ)) == ["m-3", "m-4", "m-5"]


@pytest.mark.broker
def test_a_message_replayed_twice_has_replay_count_2_and_no_x_death(vhost_url: str) -> None:
    seed(vhost_url, [failed(1, DECLINED)])
    assert invoke("dlq", "replay", Q, "--url", vhost_url).exit_code == 0
    # It fails again: this time the broker dead-letters it (basic.reject), adding x-death.
    _reject_from_work_queue(vhost_url, None)

    result = invoke("dlq", "replay", Q, "--url", vhost_url)

    assert result.exit_code == 0, result.output
    [message] = drain(vhost_url, Q)
    assert message.message_id == "m-1"
    assert message.headers[h.REPLAY_COUNT] == 2
    assert "x-death" not in message.headers


@pytest.mark.broker
def test_a_refused_publish_stops_the_replay_and_keeps_the_message(vhost_url: str) -> None:
    # A work queue that refuses every publish (max length 0, overflow reject-publish): the
    # broker nacks the copy, so the DLQ copy must not be acked.
    seed(vhost_url, list(two_error_types(3)))
    asyncio.run(_declare_full_queue(vhost_url, "full"))
    asyncio.run(_copy_dlq(vhost_url, DLQ, "full.dlq"))

    result = invoke("dlq", "replay", "full", "--url", vhost_url)

    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "refused by the broker" in result.stderr
    assert "stopped after moving 0, message 'm-1' and the rest stay in the DLQ" in result.stderr
    assert ids(drain(vhost_url, "full.dlq")) == ["m-1", "m-2", "m-3"]


@pytest.mark.broker
def test_replay_into_a_missing_work_queue_moves_nothing(vhost_url: str) -> None:
    seed(vhost_url, [failed(1, DECLINED)])
    asyncio.run(_copy_dlq(vhost_url, DLQ, "gone.dlq"))

    result = invoke("dlq", "replay", "gone", "--url", vhost_url)

    assert result.exit_code == 1
    assert "queue 'gone' does not exist" in result.stderr
    assert ids(drain(vhost_url, "gone.dlq")) == ["m-1"]


# --- purge ----------------------------------------------------------------------------------


@pytest.mark.broker
def test_purge_without_yes_refuses_with_exit_2(vhost_url: str) -> None:
    seed(vhost_url, list(two_error_types(3)))

    result = invoke("dlq", "purge", Q, "--url", vhost_url)

    assert result.exit_code == 2
    assert "pass --yes" in result.output
    assert len(drain(vhost_url, DLQ)) == 3


@pytest.mark.broker
def test_purge_with_yes_empties_the_dlq(vhost_url: str) -> None:
    seed(vhost_url, list(two_error_types(3)))

    result = invoke("dlq", "purge", Q, "--yes", "--url", vhost_url)

    assert result.exit_code == 0, result.output
    assert result.output == f"purged 3 messages from {DLQ}\n"
    assert drain(vhost_url, DLQ) == []
    assert invoke("dlq", "list", Q, "--url", vhost_url).output == f"{DLQ}: empty\n"


# --- pure helpers ---------------------------------------------------------------------------


def test_replay_headers_reset_the_failure_and_keep_the_rest() -> None:
    old = {
        h.ATTEMPT: 3,
        h.ERROR_TYPE: DECLINED,
        h.ERROR_MESSAGE: "declined",
        h.ERROR_STACK: "Traceback",
        h.NOT_BEFORE: "2026-01-01T00:00:00+00:00",
        h.REPLAY_COUNT: 4,
        h.FIRST_FAILED_AT: "2026-01-01T00:00:00Z",
        "x-death": [{"count": 1}],
        "x-delivery-count": 2,
        "traceparent": TRACEPARENT,
        "tenant": "acme",
    }

    assert replay_headers(old) == {
        h.ATTEMPT: 1,
        h.REPLAY_COUNT: 5,
        h.FIRST_FAILED_AT: "2026-01-01T00:00:00Z",
        "traceparent": TRACEPARENT,
        "tenant": "acme",
    }


def test_preview_cuts_at_a_character_boundary() -> None:
    assert preview("é".encode() * 100, size=5) == "éé..."
    assert preview(b"a\tb\r\n") == "a\\tb\\r\\n"


# --- helpers that play the broker's or the worker's part -------------------------------------


def _reject_from_work_queue(url: str, message: aio_pika.Message | None) -> None:
    """Publish ``message`` to Q (if given), then reject Q's head without requeue: the broker
    dead-letters it to Q.dlq through Q's x-dead-letter-exchange, adding x-death."""

    async def run() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            if message is not None:
                await channel.default_exchange.publish(message, routing_key=Q)
            work = await channel.get_queue(Q)
            delivered = await work.get(timeout=5)
            await delivered.reject(requeue=False)
        await _until_ready(url, DLQ, 1)

    asyncio.run(run())


async def _until_ready(url: str, queue: str, count: int) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for _ in range(100):
            declared = await channel.declare_queue(queue, passive=True)
            if (declared.declaration_result.message_count or 0) >= count:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{queue} never had {count} ready messages")


async def _declare_full_queue(url: str, name: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        arguments: dict[str, Any] = {"x-max-length": 0, "x-overflow": "reject-publish"}
        await channel.declare_queue(name, durable=True, arguments=arguments)


async def _copy_dlq(url: str, source: str, target: str) -> None:
    """Move every message of ``source`` to a new queue ``target``, in order."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(target, durable=True)
        queue = await channel.get_queue(source)
        while (message := await queue.get(fail=False)) is not None:
            copy = aio_pika.Message(
                message.body, headers=message.headers, message_id=message.message_id
            )
            await channel.default_exchange.publish(copy, routing_key=target)
            await message.ack()
