"""The lost / duplicate checker of the reliability suite.

A :class:`Checker` owns one test's vhost. It writes a topology (exchange ``jobs``, queue
``work`` with its retry tiers and ``work.dlq``), publishes uniquely numbered persistent
messages with publisher confirms at a bounded rate from a background thread (:class:`Feeder`),
runs ``rabbitflow run tests.reliability.app:app`` as subprocesses, and lets the test inject
faults meanwhile. :meth:`Checker.drain` then waits until every confirmed message was processed
or dead-lettered and the broker holds nothing in ``work`` and its tiers, stops the worker,
takes everything out of ``work.dlq`` and checks that nothing is left anywhere.
:meth:`Checker.report` compares the three sets, as RabbitMQ's Jepsen tests do:

- **lost**: confirmed by the broker, yet neither processed nor in the DLQ. Must be empty.
- **unexpected**: processed or dead-lettered but never published, or with a body that does not
  match its message id. Must be empty.
- **duplicates**: processing runs beyond the first per message (a message processed 3 times
  counts 2). At-least-once allows them; a fault may cause at most about ``prefetch`` of them
  (the deliveries in hand when it struck), so a test bounds them by ``prefetch x faults``.

Every report is printed as one ``RELIABILITY`` line (run pytest with ``-s`` to see them) and,
when ``$RF_RELIABILITY_REPORT`` names a file, appended to it as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage

from rabbitflow.topology import derive, load_topology
from tests.reliability.app import DB_ENV, SLEEP_ENV
from tests.support.amqp import drain as take_all
from tests.support.broker import Rabbit
from tests.support.output import text as header_text
from tests.support.processes import ROOT, WorkerProcess, child_env, run_cli
from tests.support.waiting import wait_until

APP = "tests.reliability.app:app"
SYNC_APP = "tests.reliability.app:sync_app"
EXCHANGE = "jobs"
ROUTING_KEY = "work"
QUEUE = "work"
DLQ = "work.dlq"
WORKER_CONNECTION_NAMES = ("rf-reliability", "rf-reliability-sync")
REPORT_ENV = "RF_RELIABILITY_REPORT"

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT NOT NULL,       -- message_id
    body_id INTEGER,         -- the id in the body (NULL when the body was not decoded)
    pid INTEGER NOT NULL,
    redelivered INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    phase TEXT NOT NULL,     -- 'start' or 'done'
    at REAL NOT NULL
)
"""


def job(n: int, **fields: Any) -> bytes:
    """The JSON body of message ``n``."""
    return json.dumps({"id": n, **fields}, separators=(",", ":")).encode()


def topology_text(
    *,
    queue_type: str = "classic",
    prefetch: int = 10,
    concurrency: int | None = None,
    timeout: str | None = None,
    retry: str = '{ delays = ["200ms"], max_attempts = 3 }',
    crash_limit: int | None = None,
    max_body_size: str | None = None,
) -> str:
    """Exchange ``jobs`` and queue ``work`` (bound with key ``work``) with these settings."""
    settings = [f'queue_type = "{queue_type}"', f"prefetch = {prefetch}", f"retry = {retry}"]
    if concurrency is not None:
        settings.append(f"concurrency = {concurrency}")
    if timeout is not None:
        settings.append(f'timeout = "{timeout}"')
    if crash_limit is not None:
        settings.append(f"crash_limit = {crash_limit}")
    if max_body_size is not None:
        settings.append(f'max_body_size = "{max_body_size}"')
    return (
        f'[exchanges.{EXCHANGE}]\ntype = "direct"\n\n[queues.{QUEUE}]\n'
        f'bindings = [{{ exchange = "{EXCHANGE}", routing_key = "{ROUTING_KEY}" }}]\n'
        + "\n".join(settings)
        + "\n"
    )


# -- what the handlers recorded -----------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    key: str
    body_id: int | None
    pid: int
    redelivered: bool
    attempt: int
    phase: str
    at: float


class Records:
    """The SQLite file the worker app writes (see ``tests/reliability/app.py``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def runs(self, phase: str | None = None) -> list[Run]:
        query = "SELECT key, body_id, pid, redelivered, attempt, phase, at FROM runs"
        with contextlib.closing(self._connect()) as db:
            if phase is None:
                rows = db.execute(query + " ORDER BY rowid").fetchall()
            else:
                rows = db.execute(query + " WHERE phase = ? ORDER BY rowid", (phase,)).fetchall()
        return [Run(r[0], r[1], r[2], bool(r[3]), r[4], r[5], r[6]) for r in rows]

    def count(self, phase: str) -> int:
        with contextlib.closing(self._connect()) as db:
            (value,) = db.execute("SELECT COUNT(*) FROM runs WHERE phase = ?", (phase,)).fetchone()
        return int(value)

    def done(self) -> Counter[str]:
        """How many times each message id was processed to the end."""
        with contextlib.closing(self._connect()) as db:
            rows = db.execute("SELECT key, COUNT(*) FROM runs WHERE phase = 'done' GROUP BY key")
            return Counter({key: n for key, n in rows})

    def wait_for(self, phase: str, count: int, timeout: float) -> None:
        wait_until(lambda: self.count(phase) >= count, timeout, f"{count} {phase!r} records")


# -- publishing -----------------------------------------------------------------------------


class Feeder:
    """Publishes messages ``ids`` at ``rate`` per second from a background thread.

    Each message is persistent, mandatory, with ``message_id`` = its number, and counts as
    confirmed only once the broker confirmed it. A publish that fails (connection lost, broker
    down, returned) is *not* retried: it is recorded as unconfirmed, since it may or may not
    have reached a queue. A lost connection is reopened with a short back-off and publishing
    goes on with the next number.
    """

    def __init__(
        self,
        url: str,
        ids: Sequence[int],
        rate: float,
        body: Callable[[int], bytes] = job,
        *,
        exchange: str = EXCHANGE,
        routing_key: str = ROUTING_KEY,
    ) -> None:
        self.url = url
        self.ids = list(ids)
        self.rate = rate
        self.body = body
        self.exchange = exchange
        self.routing_key = routing_key
        self.attempted: set[str] = set()
        self.confirmed: set[str] = set()
        self.failed: dict[str, str] = {}
        self.reconnections = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="feeder", daemon=True)

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.stop()
            self._thread.join(10)
            raise AssertionError(f"the feeder did not finish within {timeout:.0f} s")
        if self.error is not None:
            raise AssertionError(f"the feeder failed: {self.error!r}") from self.error

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def snapshot(self) -> tuple[set[str], set[str], dict[str, str]]:
        with self._lock:
            return set(self.attempted), set(self.confirmed), dict(self.failed)

    def confirmed_count(self) -> int:
        with self._lock:
            return len(self.confirmed)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by join()
            self.error = exc

    async def _run(self) -> None:
        interval = 1.0 / self.rate
        pending: set[asyncio.Task[None]] = set()
        connection: aio_pika.abc.AbstractConnection | None = None
        channel: aio_pika.abc.AbstractChannel | None = None
        target: aio_pika.abc.AbstractExchange | None = None
        started = time.monotonic()
        try:
            for index, n in enumerate(self.ids):
                if self._stop.is_set():
                    break
                delay = started + index * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if channel is None or channel.is_closed or target is None:
                    connection, channel, target = await self._reconnect(connection)
                    if target is None:
                        break
                    started = time.monotonic() - index * interval  # no burst after an outage
                key = str(n)
                with self._lock:
                    self.attempted.add(key)
                task = asyncio.create_task(self._publish(target, key, self.body(n)))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(pending)
        finally:
            if connection is not None and not connection.is_closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(connection.close(), 5)

    async def _reconnect(
        self, old: aio_pika.abc.AbstractConnection | None
    ) -> tuple[
        aio_pika.abc.AbstractConnection | None,
        aio_pika.abc.AbstractChannel | None,
        aio_pika.abc.AbstractExchange | None,
    ]:
        if old is not None:
            self.reconnections += 1
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.close(), 2)
        while not self._stop.is_set():
            try:
                connection = await aio_pika.connect(
                    self.url, timeout=5, client_properties={"connection_name": "rf-feeder"}
                )
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                if self.exchange:
                    target = await channel.get_exchange(self.exchange, ensure=False)
                else:
                    target = channel.default_exchange
                return connection, channel, target
            except (OSError, TimeoutError, aiormq.exceptions.AMQPError, RuntimeError):
                await asyncio.sleep(0.5)
        return None, None, None

    async def _publish(self, target: aio_pika.abc.AbstractExchange, key: str, body: bytes) -> None:
        message = aio_pika.Message(
            body,
            message_id=key,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await target.publish(message, self.routing_key, mandatory=True, timeout=None)
        except Exception as exc:
            with self._lock:
                self.failed[key] = repr(exc)[:200]
            return
        with self._lock:
            self.confirmed.add(key)


async def publish_async(
    url: str,
    messages: Iterable[aio_pika.Message],
    *,
    exchange: str = EXCHANGE,
    routing_key: str = ROUTING_KEY,
) -> None:
    """Publish ready-made messages with confirms (mandatory); raise on any failure."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        target = await channel.get_exchange(exchange, ensure=False)
        await asyncio.gather(
            *(target.publish(message, routing_key, mandatory=True) for message in messages)
        )
    finally:
        await connection.close()


# -- broker state ---------------------------------------------------------------------------


async def _counts_async(url: str, queues: Sequence[str]) -> dict[str, int]:
    connection = await aio_pika.connect(url, timeout=10)
    try:
        counts: dict[str, int] = {}
        channel = await connection.channel()
        for name in queues:
            try:
                declared = await channel.declare_queue(name, passive=True)
                counts[name] = declared.declaration_result.message_count or 0
            except aiormq.exceptions.ChannelNotFoundEntity:
                counts[name] = -1  # missing; the 404 closed the channel
                channel = await connection.channel()
        return counts
    finally:
        await connection.close()


def ready_counts(url: str, queues: Sequence[str]) -> dict[str, int]:
    """Ready messages per queue from passive declares (exact for quorum queues; -1: missing)."""
    return asyncio.run(_counts_async(url, queues))


def death_reasons(headers: dict[str, Any]) -> list[str]:
    """The ``reason`` of each ``x-death`` entry the broker wrote on a dead-lettered message."""
    deaths = headers.get("x-death")
    if not isinstance(deaths, list):
        return []
    return [header_text(d.get("reason")) for d in deaths if isinstance(d, dict)]


# -- the report -----------------------------------------------------------------------------


@dataclass
class Report:
    """What one fault did to the messages."""

    test: str
    fault: str
    faults: int
    duplicate_bound: int
    published: int
    confirmed: int
    processed: int
    dead_lettered: int
    lost: list[str]
    unexpected: list[str]
    duplicates: int
    redelivered_runs: int
    unconfirmed_but_processed: int
    worker_starts: int
    left_in_queues: dict[str, int]
    seconds: float

    def line(self) -> str:
        return (
            f"RELIABILITY {self.fault}: published={self.published} confirmed={self.confirmed} "
            f"(unconfirmed but arrived {self.unconfirmed_but_processed}) "
            f"processed={self.processed} dlq={self.dead_lettered} lost={len(self.lost)} "
            f"unexpected={len(self.unexpected)} duplicates={self.duplicates} "
            f"(bound {self.duplicate_bound}) redelivered_runs={self.redelivered_runs} "
            f"faults={self.faults} workers={self.worker_starts} time={self.seconds:.1f}s"
        )

    def check(self) -> None:
        """Nothing lost, nothing unexpected, duplicates within the bound, queues empty."""
        assert not self.lost, f"{len(self.lost)} lost: {sorted(self.lost)[:20]}\n{self.line()}"
        assert not self.unexpected, f"unexpected: {self.unexpected[:20]}\n{self.line()}"
        assert self.duplicates <= self.duplicate_bound, self.line()
        assert not any(self.left_in_queues.values()), (
            f"left on the broker: {self.left_in_queues}\n{self.line()}"
        )


# -- the checker ----------------------------------------------------------------------------


@dataclass
class Checker:
    """One test's messages, workers and verdict on one vhost of ``rabbit``."""

    rabbit: Rabbit
    vhost: str
    tmp_path: Path
    name: str
    records: Records = field(init=False)
    topology: Path = field(init=False)
    workers: list[WorkerProcess] = field(default_factory=list)
    feeders: list[Feeder] = field(default_factory=list)
    extra_published: set[str] = field(default_factory=set)
    dead: list[AbstractIncomingMessage] = field(default_factory=list)
    left: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.records = Records(self.tmp_path / "runs.sqlite")
        self.topology = self.tmp_path / "topology.toml"
        self.write_topology()

    def __enter__(self) -> Checker:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for feeder in self.feeders:
            feeder.stop()
        # The workers' logs stay in tmp_path (worker-N.log) for a post-mortem.
        for worker in self.workers:
            worker.kill()

    @property
    def url(self) -> str:
        return self.rabbit.vhost_url(self.vhost)

    # -- set-up -------------------------------------------------------------------------------

    def write_topology(self, **settings: Any) -> Path:
        self.topology.write_text(topology_text(**settings))
        return self.topology

    def queues(self) -> list[str]:
        """``work``, its retry tiers and ``work.dlq`` as the topology derives them."""
        return [spec.name for spec in derive(load_topology(self.topology)).queues]

    def retry_queues(self) -> list[str]:
        return [name for name in self.queues() if name not in (QUEUE, DLQ)]

    def declare(self, url: str | None = None) -> None:
        result = run_cli("topology", "declare", str(self.topology), "--url", url or self.url)
        assert result.returncode == 0, result.stderr

    # -- workers ------------------------------------------------------------------------------

    def start_worker(
        self,
        *extra: str,
        target: str = APP,
        sleep: float = 0.0,
        url: str | None = None,
        wait_ready: bool = True,
    ) -> WorkerProcess:
        """``rabbitflow run TARGET --topology ... --log-format json EXTRA`` in a subprocess."""
        env = child_env(**{DB_ENV: str(self.records.path), SLEEP_ENV: str(sleep)})
        log_path = self.tmp_path / f"worker-{len(self.workers) + 1}.log"
        worker = WorkerProcess(target, url or self.url, self.topology, log_path, env, extra)
        self.workers.append(worker.start())
        if wait_ready:
            worker.wait_for_event("consuming", timeout=30)
        return worker

    @property
    def worker(self) -> WorkerProcess:
        return self.workers[-1]

    def worker_alive(self) -> bool:
        process = self.workers[-1].process if self.workers else None
        return process is not None and process.poll() is None

    def kill_worker(self) -> None:
        """``kill -9`` the current worker (by its pid) and reap it."""
        worker = self.worker
        worker.signal(signal.SIGKILL)
        assert worker.wait(10) == -signal.SIGKILL

    def worker_connections(self) -> list[str]:
        """Pids of the connections the worker opened on this vhost (named by the app)."""
        out = self.rabbit.ctl(
            "list_connections", "--no-table-headers", "--quiet", "pid", "vhost", "client_properties"
        )
        found = []
        for line in out.splitlines():
            fields = line.split("\t")
            if len(fields) >= 3 and fields[1] == self.vhost:
                names = [f'{{"connection_name","{name}"}}' for name in WORKER_CONNECTION_NAMES]
                if any(name in fields[2] for name in names):
                    found.append(fields[0])
        return found

    def close_worker_connections(self, reason: str = "closed by the reliability suite") -> int:
        """``rabbitmqctl close_connection`` for the worker's connections of this vhost only."""
        pids = self.worker_connections()
        for pid in pids:
            self.rabbit.ctl("close_connection", pid, reason, check=False)
        return len(pids)

    # -- messages -----------------------------------------------------------------------------

    def feed(
        self,
        count: int,
        rate: float,
        *,
        first: int = 0,
        body: Callable[[int], bytes] = job,
        url: str | None = None,
    ) -> Feeder:
        """Start publishing ``count`` messages numbered from ``first`` at ``rate`` per second."""
        feeder = Feeder(url or self.url, range(first, first + count), rate, body).start()
        self.feeders.append(feeder)
        return feeder

    def publish(self, messages: Sequence[aio_pika.Message], url: str | None = None) -> None:
        """Publish ready-made messages with confirms (they join the expected set)."""
        asyncio.run(publish_async(url or self.url, messages))
        self.extra_published.update(m.message_id or "" for m in messages)

    def counts(self) -> dict[str, int]:
        return ready_counts(self.url, self.queues())

    # -- the verdict --------------------------------------------------------------------------

    def drain(self, timeout: float = 90.0, restart: bool = True, **worker_options: Any) -> None:
        """Wait until every confirmed message is processed or in the DLQ and ``work`` and its
        tiers are empty; then stop the worker gracefully, empty the DLQ into ``self.dead`` and
        record what is left on the broker (which must be nothing).

        ``restart``: start a worker (with ``worker_options``) when none is running.
        """
        deadline = time.monotonic() + timeout
        for feeder in self.feeders:
            feeder.join(max(deadline - time.monotonic(), 1))
        confirmed = self.confirmed() | self.extra_published
        while time.monotonic() < deadline:
            if restart and not self.worker_alive():
                self.start_worker(**worker_options)
            counts = self.counts()
            busy = sum(max(n, 0) for name, n in counts.items() if name != DLQ)
            missing = confirmed - set(self.records.done())
            if busy == 0 and len(missing) <= max(counts.get(DLQ, 0), 0):
                break
            time.sleep(0.3)
        if self.worker_alive():
            code, _ = self.worker.stop(timeout=40)
            assert code == 0, (
                f"the worker exited {code} on SIGTERM:\n{self.worker.output()[-3000:]}"
            )
        self.dead = take_all(self.url, DLQ)
        self.left = self.counts()
        self.left.update(self._unacked_on_broker())

    def _unacked_on_broker(self, timeout: float = 8.0) -> dict[str, int]:
        """Unacked messages per queue as ``rabbitmqctl`` reports them, once they reach 0 or
        ``timeout`` passed: for quorum queues it reports the state of the last tick (every
        5 s), so counts from before the worker stopped may linger for a few seconds."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rabbit.list(self.vhost, "queues", "name", "messages_unacknowledged")
            unacked = {f"{row[0]} (unacked)": int(row[1]) for row in rows if row[1] != "0"}
            if not unacked or time.monotonic() > deadline:
                return unacked
            time.sleep(0.5)

    def confirmed(self) -> set[str]:
        keys: set[str] = set()
        for feeder in self.feeders:
            keys |= feeder.snapshot()[1]
        return keys

    def report(self, fault: str, faults: int, duplicate_bound: int) -> Report:
        """Compare published, confirmed, processed and dead-lettered; print and return it."""
        attempted: set[str] = set(self.extra_published)
        confirmed: set[str] = set(self.extra_published)
        for feeder in self.feeders:
            tried, ok, _ = feeder.snapshot()
            attempted |= tried
            confirmed |= ok
        runs = self.records.runs("done")
        done = Counter(run.key for run in runs)
        dead_keys = {message.message_id or "" for message in self.dead}
        mismatched = [
            run.key for run in runs if run.body_id is not None and str(run.body_id) != run.key
        ]
        report = Report(
            test=self.name,
            fault=fault,
            faults=faults,
            duplicate_bound=duplicate_bound,
            published=len(attempted),
            confirmed=len(confirmed),
            processed=len(set(done) & attempted),
            dead_lettered=len(dead_keys),
            lost=sorted(confirmed - set(done) - dead_keys),
            unexpected=sorted((set(done) | dead_keys) - attempted) + mismatched,
            duplicates=sum(n - 1 for n in done.values()),
            redelivered_runs=sum(1 for run in runs if run.redelivered),
            unconfirmed_but_processed=len((set(done) | dead_keys) & (attempted - confirmed)),
            worker_starts=len(self.workers),
            left_in_queues={name: n for name, n in self.left.items() if n},
            seconds=time.monotonic() - self.started,
        )
        print(report.line())
        destination = os.environ.get(REPORT_ENV)
        if destination:
            with open(destination, "a") as out:
                out.write(json.dumps(asdict(report)) + "\n")
        return report


__all__ = ["APP", "DLQ", "QUEUE", "ROOT", "SYNC_APP", "Checker", "Feeder", "Records", "Report"]
