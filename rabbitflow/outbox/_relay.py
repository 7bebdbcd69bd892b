"""The relay: moves committed rows from the outbox table to RabbitMQ.

One loop per relay, any number of relays per table::

    claim a batch (one statement, autocommit: leased, no lock kept)
    → publish it with confirms and mandatory (the core's batch writer)
    → settle it (one statement per kind of outcome: sent, refused, released)

A row is marked sent only after the broker confirmed it. A refusal (unroutable, a missing
exchange, a nack, headers too large) spends one attempt and delays the row with an exponential
backoff; after ``max_attempts`` the row is parked with its error. A lost connection spends
nothing: the batch's unconfirmed rows are given back and the relay waits for the broker.

The relay sleeps on ``LISTEN`` (the table's insert trigger notifies at commit) with a poll as
the fallback, and reconnects to PostgreSQL and to RabbitMQ on its own. A settlement that
PostgreSQL did not take is kept and written first once it is back, so a short outage of the
database costs no duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rabbitflow._backoff import full_jitter
from rabbitflow._batch import BATCH_NACKED, Outgoing, _send_fitting
from rabbitflow._border import LOST
from rabbitflow._logging import get_logger
from rabbitflow.errors import BrokerError, FrameTooLarge, PublishError, UnroutableError
from rabbitflow.outbox._claims import Claimed, Claims, Refusal, Settlement, Stats
from rabbitflow.outbox._row import read_properties
from rabbitflow.outbox._schema import notify_channel

if TYPE_CHECKING:
    from rabbitflow._metrics import Metrics
    from rabbitflow.app import App
    from rabbitflow.outbox._outbox import PostgresOutbox

log = get_logger("rabbitflow.outbox")

# Seconds between the pending / oldest-age reads (metrics and the lag warning), and between
# sweeps of sent rows past their retention; rows deleted per sweep statement.
STATS_INTERVAL = 5.0
SWEEP_INTERVAL = 60.0
SWEEP_LIMIT = 10_000
# Reconnection backoff, PostgreSQL and RabbitMQ alike.
RECONNECT_BASE = 0.5
RECONNECT_CAP = 10.0


class Relay:
    """One relay of ``outbox`` publishing through ``app``'s connection (its worker's inside
    ``rabbitflow run``, else one of its own)."""

    def __init__(self, outbox: PostgresOutbox, app: App, metrics: Metrics | None = None) -> None:
        self.outbox = outbox
        self.app = app
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.published = 0  # rows confirmed by the broker and marked sent
        self.parked = 0
        self.round_trips = 0  # statements sent to PostgreSQL by the claims (closed connections)
        self.stats: Stats | None = None
        self._claims: Claims | None = None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        # A settlement PostgreSQL did not take: written first once it answers again.
        self._unsettled: Settlement | None = None
        self._lagging = False
        table = outbox.table
        if metrics is None:
            self._published = self._pending = self._oldest = self._parked_gauge = None
        else:
            self._published = metrics.outbox_published.labels(table)
            self._pending = metrics.outbox_pending.labels(table)
            self._oldest = metrics.outbox_oldest_age.labels(table)
            self._parked_gauge = metrics.outbox_parked.labels(table)

    @property
    def statements(self) -> int:
        """Statements the relay has sent to PostgreSQL so far."""
        current = self._claims.round_trips if self._claims is not None else 0
        return self.round_trips + current

    def stop(self) -> None:
        """Finish the batch in hand, settle it, and return from :meth:`run`."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Relay until :meth:`stop`."""
        listener = asyncio.ensure_future(self._listen()) if self.outbox.notify else None
        failures = 0
        log.info("outbox relay started", table=self.outbox.table, relay=self.name)
        try:
            while not self._stopping.is_set():
                try:
                    await self._serve()
                except self.outbox.db_errors as exc:
                    failures += 1
                    wait = full_jitter(failures, RECONNECT_BASE, RECONNECT_CAP)
                    log.warning(
                        "outbox relay lost PostgreSQL; reconnecting",
                        table=self.outbox.table,
                        error=str(exc).strip() or type(exc).__name__,
                        retry_in=round(wait, 2),
                    )
                    await self._pause(wait)
                except Exception as exc:
                    # Whatever else goes wrong, the relay must not stop for good while the
                    # worker it runs in goes on consuming: log it, wait, start over.
                    failures += 1
                    wait = full_jitter(failures, RECONNECT_BASE, RECONNECT_CAP)
                    log.error(
                        "outbox relay failed; starting again",
                        table=self.outbox.table,
                        error=repr(exc),
                        retry_in=round(wait, 2),
                    )
                    await self._pause(wait)
                else:
                    failures = 0
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await listener
            log.info("outbox relay stopped", table=self.outbox.table, published=self.published)

    async def _serve(self) -> None:
        outbox = self.outbox
        connection = await outbox.connect()
        claims = self._claims = Claims(connection, outbox.statements)
        loop = asyncio.get_running_loop()
        next_stats = next_sweep = loop.time()
        broker_failures = 0
        try:
            while not self._stopping.is_set():
                now = loop.time()
                if now >= next_stats:
                    next_stats = now + STATS_INTERVAL
                    self._observe(await claims.stats())
                if now >= next_sweep and outbox.retention > 0:
                    next_sweep = now + SWEEP_INTERVAL
                    await claims.sweep(outbox.retention, SWEEP_LIMIT)
                self._wake.clear()
                rows = await self._settle(claims, claim=True)
                if not rows:
                    await self._idle(outbox.poll_interval)
                    continue
                if await self._relay(rows):
                    broker_failures = 0
                    continue
                await self._settle(claims, claim=False)
                broker_failures += 1
                await self._pause(full_jitter(broker_failures, RECONNECT_BASE, RECONNECT_CAP))
            await self._settle(claims, claim=False)
        finally:
            self.round_trips += claims.round_trips
            self._claims = None
            with contextlib.suppress(Exception):
                await connection.close()

    async def _relay(self, rows: Sequence[Claimed]) -> bool:
        """Publish ``rows``; their settlement is written with the next claim. False when the
        broker could not be reached."""
        try:
            publisher = await self.app._ready_publisher()
            channel = await publisher.ready_channel()
        except (BrokerError, *LOST) as exc:
            log.warning(
                "outbox relay cannot reach the broker; rows wait",
                table=self.outbox.table,
                rows=len(rows),
                error=str(exc) or type(exc).__name__,
            )
            self._unsettled = Settlement([], [], [row.id for row in rows])
            return False
        settlement = self._unsettled = Settlement([], [], [])
        held: set[str] = set()  # keys whose row in this batch was not confirmed
        waves = _waves(rows)
        loop = asyncio.get_running_loop()
        # The whole batch within publish_timeout, shorter than the lease: no other relay
        # claims these rows while they may still be in flight.
        deadline = loop.time() + self.outbox.publish_timeout
        for number, wave in enumerate(waves):
            waiting = [row for row in wave if row.key not in held]
            settlement.released += [row.id for row in wave if row.key in held]
            if not waiting:
                continue
            left = deadline - loop.time()
            if left <= 0:
                later = [r.id for rest in waves[number + 1 :] for r in rest]
                settlement.released += [r.id for r in waiting] + later
                break
            outgoing = [
                Outgoing(r.exchange, r.routing_key, True, r.body, read_properties(r.properties))
                for r in waiting
            ]
            outcomes = await _send_fitting(channel, outgoing, publisher.frame_max, timeout=left)
            for row, (error, _) in zip(waiting, outcomes, strict=True):
                if error is None:
                    settlement.sent.append(row.id)
                    if row.job:
                        settlement.jobs.append(row.message_id)
                    continue
                if row.key is not None:
                    held.add(row.key)  # the key's later rows wait for this one
                if _refused(error, row.exchange):
                    delay = self._backoff(row.attempts + 1)
                    settlement.refused.append(Refusal(row.id, str(error), delay))
                else:
                    settlement.released.append(row.id)
            if channel.is_closed and number + 1 < len(waves):
                # A 404 closed it: the next round needs a fresh one.
                try:
                    channel = await publisher.ready_channel()
                except (BrokerError, *LOST):
                    settlement.released += [r.id for later in waves[number + 1 :] for r in later]
                    break
        if settlement.released and not settlement.sent:
            log.warning(
                "outbox relay: the broker did not confirm the batch; rows wait",
                table=self.outbox.table,
                rows=len(settlement.released),
            )
            return False
        return True

    async def _settle(self, claims: Claims, *, claim: bool) -> list[Claimed]:
        """Write the last batch's settlement (kept until PostgreSQL takes it, across
        reconnections) and, with ``claim``, claim the next batch in the same round trip."""
        settlement = self._unsettled
        outbox = self.outbox
        if claim:
            parked, rows = await claims.settle_and_claim(
                settlement,
                outbox.batch_size,
                outbox.lease,
                delete=outbox.retention <= 0,
                max_attempts=outbox.max_attempts,
            )
        else:
            rows = []
            if not settlement:
                return rows
            await claims.sent(settlement.sent, delete=outbox.retention <= 0)
            parked = await claims.refused(settlement.refused, outbox.max_attempts)
            await claims.release(settlement.released)
        self._unsettled = None
        if settlement:
            self._account(settlement, parked)
            if settlement.jobs:
                await self._record_jobs(settlement.jobs)
        return rows

    async def _record_jobs(self, job_ids: list[str]) -> None:
        """The jobs of ``app.outbox.enqueue`` just published: ``queued``, unless the job
        store knows them already (a worker may have run one since the confirm). A store
        that does not answer costs the jobs nothing but this record: the worker records
        each once it runs it."""
        try:
            book = self.app.jobs
            results = await asyncio.gather(
                *(book.record_queued(job_id) for job_id in job_ids), return_exceptions=True
            )
        except Exception as exc:
            results = [exc]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning(
                "outbox jobs published, but the job store did not record them queued",
                table=self.outbox.table,
                jobs=len(failed),
                error=str(failed[0]) or type(failed[0]).__name__,
            )

    def _account(self, settlement: Settlement, parked: list[int]) -> None:
        sent = len(settlement.sent)
        self.published += sent
        if self._published is not None:
            self._published.inc(sent)
        for refusal in settlement.refused:
            if refusal.id in parked:
                log.error(
                    "outbox row parked: the broker refused it on every attempt",
                    table=self.outbox.table,
                    id=refusal.id,
                    error=refusal.error,
                )
            else:
                log.warning(
                    "outbox row refused by the broker; retrying",
                    table=self.outbox.table,
                    id=refusal.id,
                    error=refusal.error,
                    retry_in=round(refusal.delay, 2),
                )
        self.parked += len(parked)

    def _backoff(self, attempt: int) -> float:
        outbox = self.outbox
        return float(min(outbox.retry_backoff_max, outbox.retry_backoff * 2 ** (attempt - 1)))

    def _observe(self, stats: Stats) -> None:
        self.stats = stats
        if self._pending is not None and self._oldest is not None and self._parked_gauge:
            self._pending.set(stats.pending)
            self._oldest.set(stats.oldest_age)
            self._parked_gauge.set(stats.parked)
        lagging = stats.oldest_age > self.outbox.lag_warning
        if lagging and not self._lagging:
            log.warning(
                "outbox lag over the threshold: the oldest pending row waits",
                table=self.outbox.table,
                oldest_age_s=round(stats.oldest_age, 1),
                pending=stats.pending,
                threshold_s=self.outbox.lag_warning,
            )
        elif self._lagging and not lagging:
            log.info("outbox lag back under the threshold", table=self.outbox.table)
        self._lagging = lagging

    async def _idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _listen(self) -> None:
        """Set the wake-up event on each NOTIFY of the table's channel, reconnecting."""
        channel = notify_channel(self.outbox.table, self.outbox.schema)
        failures = 0
        while True:
            try:
                connection = await self.outbox.connect()
                async with connection:
                    await connection.execute(f"LISTEN {channel}")
                    failures = 0
                    # Rows committed while nobody listened wake nobody: look now.
                    self._wake.set()
                    async for _ in connection.notifies():
                        self._wake.set()
            except self.outbox.db_errors:
                failures += 1
                await asyncio.sleep(full_jitter(failures, RECONNECT_BASE, RECONNECT_CAP))


def _waves(rows: Sequence[Claimed]) -> list[list[Claimed]]:
    """The batch in publishing rounds: a row of a key goes one round after the key's row
    before it, so that it is sent only once that one is confirmed (per-key order, and a row
    that fails holds back the rest of its key). Rows without a key all go in the first."""
    waves: list[list[Claimed]] = [[]]
    rank: dict[str, int] = {}
    for row in rows:  # by id: commit order within a key
        if row.key is None:
            waves[0].append(row)
            continue
        wave = rank.get(row.key, 0)
        rank[row.key] = wave + 1
        if wave == len(waves):
            waves.append([])
        waves[wave].append(row)
    return waves


def _refused(error: PublishError, exchange: str) -> bool:
    """The broker said no to this message (it will say no again unless something changes),
    rather than the message never getting an answer.

    A publish to a missing exchange closes the channel (404 NOT_FOUND - no exchange 'x'):
    every message of the batch after it fails with the same error, though only the one
    whose exchange the reply names was refused; the others were never looked at."""
    if isinstance(error, UnroutableError | FrameTooLarge) or error.reason == BATCH_NACKED:
        return True
    return error.missing and f"exchange '{exchange}'" in error.reason
