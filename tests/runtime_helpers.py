"""Helpers of the runtime tests: worker subprocesses, handler records, publishing, broker counts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from tests.rabbit import Rabbit

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_until(
    probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- topology files --------------------------------------------------------------------------


def work_topology(
    directory: Path,
    *,
    prefetch: int = 10,
    concurrency: int | None = None,
    timeout: str | None = None,
    queue_type: str = "classic",
) -> Path:
    """A topology like ``tests/apps/work.toml`` with the queue settings a test needs.

    Classic by default because rabbitmqctl reports the message counts of a classic queue as
    they are, but those of a quorum queue only as of the queue's last tick (every 5 s); tests
    that watch counts while the worker runs need classic queues.
    """
    settings = [f"prefetch = {prefetch}", f'queue_type = "{queue_type}"']
    if concurrency is not None:
        settings.append(f"concurrency = {concurrency}")
    if timeout is not None:
        settings.append(f'timeout = "{timeout}"')
    path = directory / "topology.toml"
    path.write_text(
        '[exchanges.jobs]\ntype = "direct"\n\n'
        "[queues.work]\n"
        'bindings = [{ exchange = "jobs", routing_key = "work" }]\n'
        'retry = { delays = ["1s"], max_attempts = 2 }\n' + "\n".join(settings) + "\n"
    )
    return path


# -- handler records -------------------------------------------------------------------------


@dataclass
class Records:
    """The lines the test apps append to ``$RF_RECORD`` (see ``tests/apps/recording.py``)."""

    path: Path

    def lines(self) -> list[list[str]]:
        if not self.path.exists():
            return []
        return [line.split() for line in self.path.read_text().splitlines() if line]

    def of(self, kind: str) -> list[list[str]]:
        return [fields[1:] for fields in self.lines() if fields[0] == kind]

    def ids(self, kind: str) -> Counter[str]:
        """How many times each id (the first field after ``kind``) was recorded."""
        return Counter(fields[0] for fields in self.of(kind))

    def wait_for(self, kind: str, count: int, timeout: float) -> list[list[str]]:
        def enough() -> list[list[str]] | None:
            found = self.of(kind)
            return found if len(found) >= count else None

        return wait_until(enough, timeout, f"{count} {kind!r} records")


# -- worker subprocesses ---------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """``rabbitflow run TARGET`` in a subprocess, its output (JSON log lines) in a file."""

    target: str
    url: str
    topology: Path | None
    log_path: Path
    env: dict[str, str]
    extra: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    _log_offset: int = field(default=0, repr=False)

    def start(self) -> WorkerProcess:
        command = [sys.executable, "-m", "rabbitflow", "run", self.target, "--url", self.url]
        if self.topology is not None:
            command += ["--topology", str(self.topology)]
        command += ["--log-format", "json", *self.extra]
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=self.env
            )
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        """Everything this run printed (after earlier runs that shared the log file)."""
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines of this run."""
        found = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
        return found

    def has_event(self, event: str) -> bool:
        return any(entry.get("event") == event for entry in self.events())

    def wait_for_event(self, event: str, timeout: float = 15.0) -> None:
        def seen() -> bool:
            if self.has_event(event):
                return True
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"worker exited ({self.process.returncode}) before logging {event!r}:\n"
                    + self.output()
                )
            return False

        wait_until(seen, timeout, f"the worker to log {event!r}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker still running {timeout}s later:\n{self.output()}"
            ) from None

    def stop(self, timeout: float = 10.0) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took to exit."""
        sent = time.monotonic()
        self.signal(signal.SIGTERM)
        code = self.wait(timeout)
        return code, time.monotonic() - sent

    def kill(self) -> None:
        """SIGKILL if still running (test teardown); only this process, by its pid."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class Workers:
    """Starts worker subprocesses for one test and kills any left running afterwards."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        self.tmp_path = tmp_path
        self.url = url
        self.records = Records(tmp_path / "records.txt")
        self.started: list[WorkerProcess] = []

    def start(
        self,
        target: str,
        topology: Path | None,
        *extra: str,
        sleep: float = 0.0,
        wait_ready: bool = True,
    ) -> WorkerProcess:
        env = {
            **os.environ,
            "RF_RECORD": str(self.records.path),
            "RF_SLEEP": str(sleep),
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("RABBITFLOW_URL", None)
        worker = WorkerProcess(
            target, self.url, topology, self.tmp_path / "worker.log", env, extra
        ).start()
        self.started.append(worker)
        if wait_ready:
            worker.wait_for_event("consuming")
        return worker

    def cleanup(self) -> None:
        for worker in self.started:
            worker.kill()


def run_cli(
    *args: str, timeout: float = 30.0, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m rabbitflow ARGS`` from the repository root."""
    env = {**os.environ}
    env.pop("RABBITFLOW_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "rabbitflow", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
        env=env,
        check=False,
    )


# -- publishing and reading back -------------------------------------------------------------


async def publish_async(
    url: str,
    exchange: str,
    routing_key: str,
    messages: Iterable[tuple[str, bytes]],
    *,
    headers: Callable[[str], dict[str, Any]] | None = None,
) -> int:
    """Publish ``(message_id, JSON body)`` pairs with confirms, mandatory; return the count."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        target = await channel.get_exchange(exchange, ensure=False) if exchange else None
        sends = [
            (target or channel.default_exchange).publish(
                aio_pika.Message(
                    body,
                    message_id=message_id,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    headers=headers(message_id) if headers else None,
                ),
                routing_key,
                mandatory=True,
            )
            for message_id, body in messages
        ]
        await asyncio.gather(*sends)
        return len(sends)
    finally:
        await connection.close()


def publish(
    url: str,
    exchange: str,
    routing_key: str,
    messages: Iterable[tuple[str, bytes]],
    **kwargs: Any,
) -> int:
    return asyncio.run(publish_async(url, exchange, routing_key, messages, **kwargs))


def jobs(prefix: str, count: int) -> list[tuple[str, bytes]]:
    """``count`` messages for the ``work`` queue, ids ``prefix-0`` ..."""
    return [(f"{prefix}-{i}", json.dumps({"n": i}).encode()) for i in range(count)]


async def drain_async(url: str, queue: str, limit: int = 1000) -> list[AbstractIncomingMessage]:
    """Take (and ack) every message of ``queue``."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        source = await channel.get_queue(queue, ensure=False)
        taken: list[AbstractIncomingMessage] = []
        while len(taken) < limit:
            message = await source.get(no_ack=True, fail=False)
            if message is None:
                break
            taken.append(message)
        return taken
    finally:
        await connection.close()


def drain(url: str, queue: str) -> list[AbstractIncomingMessage]:
    return asyncio.run(drain_async(url, queue))


# -- broker state ----------------------------------------------------------------------------


def queue_counts(rabbit: Rabbit, vhost: str) -> dict[str, tuple[int, int, int]]:
    """``{queue: (messages, ready, unacknowledged)}`` as rabbitmqctl reports them."""
    rows = rabbit.list(
        vhost, "queues", "name", "messages", "messages_ready", "messages_unacknowledged"
    )
    return {row[0]: (int(row[1]), int(row[2]), int(row[3])) for row in rows}


def wait_queues_empty(rabbit: Rabbit, vhost: str, timeout: float = 15.0) -> dict[str, Any]:
    """Wait until no queue of ``vhost`` holds a message (ready or unacked)."""

    def empty() -> dict[str, Any] | None:
        counts = queue_counts(rabbit, vhost)
        return counts if all(total == 0 for total, _, _ in counts.values()) else None

    return wait_until(empty, timeout, f"every queue of {vhost} to be empty", interval=0.3)


def worker_connections(rabbit: Rabbit, vhost: str) -> list[tuple[str, str]]:
    """``(pid, timeout)`` of the connections open on ``vhost``."""
    out = rabbit.ctl("list_connections", "--no-table-headers", "--quiet", "pid", "vhost", "timeout")
    rows = [line.split("\t") for line in out.splitlines() if line.strip()]
    return [(row[0], row[2]) for row in rows if len(row) == 3 and row[1] == vhost]


async def message_counts_async(url: str, queues: Iterable[str]) -> dict[str, int]:
    """Messages in each queue from a passive declare: exact for quorum queues too, but without
    the unacked ones (use it once no consumer holds any)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        counts = {}
        for name in queues:
            declared = await channel.declare_queue(name, passive=True)
            counts[name] = declared.declaration_result.message_count or 0
        return counts
    finally:
        await connection.close()


def message_counts(url: str, queues: Iterable[str]) -> dict[str, int]:
    return asyncio.run(message_counts_async(url, queues))


def queue_names(rabbit: Rabbit, vhost: str) -> list[str]:
    return [row[0] for row in rabbit.list(vhost, "queues", "name")]
