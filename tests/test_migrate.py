"""``rabbitflow topology migrate`` on the real broker, while a confirming publisher publishes
and a ``rabbitflow run`` worker consumes (issue 28, contract section 15)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import aiormq
import pytest

from tests.support.broker import Rabbit
from tests.support.processes import ROOT, Workers, run_cli
from tests.support.waiting import wait_progressing

pytestmark = [pytest.mark.broker, pytest.mark.management]

WORK = """
[exchanges.jobs]
type = "direct"

[queues.work]
queue_type = "{queue_type}"
bindings = [{{ exchange = "jobs", routing_key = "work" }}]
prefetch = 10
retry = {{ delays = ["1s"], max_attempts = 2 }}
{extra}
"""


def topology(tmp_path: Path, queue_type: str, extra: str = "", name: str = "old.toml") -> Path:
    path = tmp_path / name
    path.write_text(WORK.format(queue_type=queue_type, extra=extra), encoding="utf-8")
    return path


@pytest.fixture
def workers(tmp_path: Path, vhost_url: str) -> Iterator[Workers]:
    started = Workers(tmp_path, vhost_url)
    yield started
    started.cleanup()


@dataclass
class Publisher:
    """Publishes to ``jobs``/``work`` with confirms until stopped; keeps the confirmed ids."""

    url: str
    prefix: str
    confirmed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def publish(self, count: int, *, batch: int = 500) -> None:
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel(on_return_raises=True)
            exchange = await channel.get_exchange("jobs")
            for start in range(0, count, batch):
                ids = [f"{self.prefix}-{n}" for n in range(start, min(count, start + batch))]
                await asyncio.gather(*(self._one(exchange, i) for i in ids))

    async def run(self, rate: float = 200.0) -> None:
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel(on_return_raises=True)
            exchange = await channel.get_exchange("jobs")
            n = 0
            while not self._stop.is_set():
                await self._one(exchange, f"{self.prefix}-{n}")
                n += 1
                await asyncio.sleep(1 / rate)

    def stop(self) -> None:
        self._stop.set()

    async def _one(self, exchange: aio_pika.abc.AbstractExchange, message_id: str) -> None:
        message = aio_pika.Message(b"{}", message_id=message_id, delivery_mode=2)
        try:
            await exchange.publish(message, routing_key="work", mandatory=True)
        except (aiormq.exceptions.DeliveryError, aio_pika.exceptions.PublishError):
            self.refused.append(message_id)
        else:
            self.confirmed.append(message_id)


async def migrate(*args: str) -> tuple[int, str]:
    """``rabbitflow topology migrate ARGS`` in a subprocess, the event loop free meanwhile."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rabbitflow", "topology", "migrate", *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != "RABBITFLOW_URL"},
    )  # fmt: skip
    out, _ = await process.communicate()
    return int(process.returncode or 0), out.decode()


def queue_types(rabbit: Rabbit, vhost: str) -> dict[str, str]:
    rows = json.loads(rabbit.ctl("list_queues", "-p", vhost, "name", "type", "--formatter", "json"))
    return {row["name"]: row["type"] for row in rows}


def bindings(rabbit: Rabbit, vhost: str) -> set[tuple[str, str, str]]:
    rows = rabbit.list(vhost, "bindings", "source_name", "destination_name", "routing_key")
    return {(r[0], r[1], r[2]) for r in rows if r[0]}


async def drain_ids(url: str, queue: str) -> list[str]:
    """Every message id left in ``queue`` (taken and acked)."""
    ids: list[str] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        while (message := await declared.get(fail=False)) is not None:
            ids.append(str(message.message_id))
            await message.ack()
    return ids


def declare(path: Path, url: str) -> None:
    result = run_cli("topology", "declare", str(path), "--url", url)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
async def test_classic_to_quorum_with_10000_waiting_loses_nothing(
    rabbit: Rabbit, vhost: str, vhost_url: str, tmp_path: Path, workers: Workers
) -> None:
    # Given a classic queue with 10,000 messages waiting, a worker consuming it slowly and a
    # publisher publishing with confirms
    old, new = topology(tmp_path, "classic"), topology(tmp_path, "quorum", name="new.toml")
    declare(old, vhost_url)
    waiting = Publisher(vhost_url, "waiting")
    await waiting.publish(10_000)
    worker = workers.start("tests.apps.work:app", old, sleep=0.02)
    live = Publisher(vhost_url, "live")
    publishing = asyncio.create_task(live.run())

    # When the queue is migrated to quorum
    code, output = await migrate(str(new), "--url", vhost_url, "--yes")
    await asyncio.sleep(1.0)
    live.stop()
    await publishing
    print(output)

    # Then it is a quorum queue (its tier and DLQ too), bound as before, the temporary gone
    assert code == 0, output
    types = queue_types(rabbit, vhost)
    assert types == {"work": "quorum", "work.retry.1s": "quorum", "work.dlq": "quorum"}
    assert ("jobs", "work", "work") in bindings(rabbit, vhost)
    assert ("jobs", "work.migrating", "work") not in bindings(rabbit, vhost)
    # and every confirmed message is handled by the worker, which kept running; none was
    # refused or returned for want of a route
    assert live.refused == []
    assert waiting.refused == []
    confirmed = set(waiting.confirmed) | set(live.confirmed)
    assert len(confirmed) >= 10_000

    def handled() -> tuple[set[str] | None, int]:
        done = set(workers.records.ids("done"))
        return (done if confirmed <= done else None), len(done)

    try:
        # The worker handles at most 500 messages a second; on a loaded machine far fewer.
        wait_progressing(handled, 30, "every confirmed message to be handled")
    except AssertionError:
        missing = sorted(confirmed - set(workers.records.ids("done")))
        started = set(workers.records.ids("start"))
        columns = ("name", "messages_ready", "messages_unacknowledged", "consumers")
        raise AssertionError(
            f"{len(missing)} confirmed messages not handled"
            f" ({sum(m in started for m in missing)} started), e.g. {missing[:10]};"
            f" queues {columns}: {rabbit.list(vhost, 'queues', *columns)};"
            f" worker alive: {worker.process is not None and worker.process.poll() is None}"
            f"\n{worker.output()[-4000:]}"
        ) from None
    counts = workers.records.ids("done")
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    # A copy handled twice is one published while both queues were bound (steps 2-3 and 7-8,
    # bound before unbound so that nothing is unroutable): milliseconds at 200 messages/s.
    # Nothing is redelivered by the move itself (that takes a kill between confirm and ack).
    twice = sorted(i for i, n in counts.items() if n > 1)
    assert duplicates <= 20, f"{duplicates} duplicates: {twice[:20]}"
    assert worker.process is not None
    assert worker.process.poll() is None
    # it followed the queue through the broker's basic.cancel (waiting for it while it was
    # gone, when it saw it gone), and never redeclared
    followed = ("the queue is back after a migration; consuming again",
                "the broker cancelled the consumer; consuming again")  # fmt: skip
    assert any(worker.has_event(event) for event in followed), worker.output()[-3000:]
    assert not worker.has_event("reconnected")
    assert "moved" in output
    assert "migrated 3 queues" in output


async def test_quorum_to_stream_is_refused(
    rabbit: Rabbit, vhost: str, vhost_url: str, tmp_path: Path
) -> None:
    old = topology(tmp_path, "quorum")
    declare(old, vhost_url)
    await Publisher(vhost_url, "m").publish(10)
    stream = topology(tmp_path, "stream", name="stream.toml")

    code, output = await migrate(str(stream), "--url", vhost_url, "--yes")

    assert code == 1, output
    assert (
        "error: queue 'work' cannot be migrated: x-queue-type: broker 'quorum', file 'stream'"
        in output
    )
    assert "a stream is not a work queue" in output
    assert queue_types(rabbit, vhost)["work"] == "quorum"
    assert len(await drain_ids(vhost_url, "work")) == 10


async def test_a_max_length_is_a_policy_and_moves_no_message(
    rabbit: Rabbit, vhost: str, vhost_url: str, tmp_path: Path
) -> None:
    declare(topology(tmp_path, "quorum"), vhost_url)
    await Publisher(vhost_url, "m").publish(100)
    limited = topology(tmp_path, "quorum", 'arguments = { "x-max-length" = 500 }', "new.toml")

    dry_code, dry = await migrate(str(limited), "--url", vhost_url, "--dry-run")
    code, output = await migrate(str(limited), "--url", vhost_url, "--yes")

    assert dry_code == 0, dry
    assert "work: policy rabbitflow.work: max-length = 500 (no message moves)" in dry
    assert code == 0, output
    assert "applied policy rabbitflow.work" in output
    assert "0 messages moved" in output
    assert "rabbitflow.work" in rabbit.ctl("list_policies", "-p", vhost)
    assert len(await drain_ids(vhost_url, "work")) == 100


async def test_dry_run_prints_each_step_and_changes_nothing(
    rabbit: Rabbit, vhost: str, vhost_url: str, tmp_path: Path
) -> None:
    declare(topology(tmp_path, "classic"), vhost_url)
    new = topology(tmp_path, "quorum", name="new.toml")

    code, output = await migrate(str(new), "work", "--url", vhost_url, "--dry-run")

    assert code == 0, output
    assert "work: x-queue-type: broker 'classic', file 'quorum'" in output
    for number in range(1, 11):
        assert f"step {number}/10: " in output
    assert "step 1/10: declare work.migrating (quorum, as the file says work)" in output
    assert queue_types(rabbit, vhost)["work"] == "classic"
    assert "work.migrating" not in queue_types(rabbit, vhost)


@pytest.mark.chaos
@pytest.mark.parametrize("step", range(1, 11))
async def test_killed_at_each_step_resumes_and_loses_nothing(
    rabbit: Rabbit, vhost: str, vhost_url: str, tmp_path: Path, step: int
) -> None:
    # Given a classic queue (no tier, no DLQ: one queue to migrate) with 1,500 messages and a
    # publisher publishing
    bare = "dead_letter = false"
    old = topology(tmp_path, "classic", bare)
    new = topology(tmp_path, "quorum", bare, name="new.toml")
    for path in (old, new):
        path.write_text(
            path.read_text().replace(
                'retry = { delays = ["1s"], max_attempts = 2 }', "retry = false"
            )
        )
    declare(old, vhost_url)
    waiting = Publisher(vhost_url, "waiting")
    await waiting.publish(1_500)
    live = Publisher(vhost_url, "live")
    publishing = asyncio.create_task(live.run(rate=100))

    # When the migration is killed (SIGKILL) as it prints step N, then run again
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rabbitflow", "topology", "migrate", str(new), "work",
        "--url", vhost_url, "--yes",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    seen = []
    while line := await process.stdout.readline():
        seen.append(line.decode())
        if f"work: step {step}/10:" in seen[-1]:
            process.send_signal(signal.SIGKILL)
            break
    await process.wait()
    killed_at = "".join(seen)
    code, output = await migrate(str(new), "work", "--url", vhost_url, "--yes")
    live.stop()
    await publishing

    # Then the re-run completes and every confirmed message is in the new queue
    assert code == 0, killed_at + output
    assert queue_types(rabbit, vhost)["work"] == "quorum"
    assert "work.migrating" not in queue_types(rabbit, vhost)
    assert ("jobs", "work", "work") in bindings(rabbit, vhost)
    ids = await drain_ids(vhost_url, "work")
    confirmed = set(waiting.confirmed) | set(live.confirmed)
    assert live.refused == []
    assert confirmed - set(ids) == set(), f"lost after a kill at step {step}"
    assert len(ids) - len(set(ids)) <= 1000  # the mover's prefetch


async def test_a_binding_made_by_hand_is_kept(
    rabbit: Rabbit, vhost: str, vhost_url: str, tmp_path: Path
) -> None:
    declare(topology(tmp_path, "classic"), vhost_url)
    connection = await aio_pika.connect(vhost_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue("work")
        await queue.bind("jobs", "by-hand")
    await Publisher(vhost_url, "m").publish(200)

    code, output = await migrate(
        str(topology(tmp_path, "quorum", name="new.toml")), "work", "--url", vhost_url, "--yes"
    )

    assert code == 0, output
    assert {("jobs", "work", "work"), ("jobs", "work", "by-hand")} <= bindings(rabbit, vhost)
    assert not any(b[1].endswith(".migrating") for b in bindings(rabbit, vhost))
    assert sorted(await drain_ids(vhost_url, "work")) == sorted(f"m-{n}" for n in range(200))
