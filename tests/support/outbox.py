"""The outbox tests' tools: an outbox in a schema of its own, rows written in transactions,
and a sink that records what reaches a queue."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import psycopg

from rabbitflow.outbox import PostgresOutbox
from rabbitflow.testing.pytest_plugin import unavailable
from tests.support.network import PortLease
from tests.support.services import POSTGRES_URL, require_postgres

EXCHANGE = "orders"


@asynccontextmanager
async def outbox_in_own_schema(
    dsn: str | None = None, **options: Any
) -> AsyncIterator[PostgresOutbox]:
    """A :class:`PostgresOutbox` installed in a fresh schema, dropped afterwards."""
    if dsn is None:
        dsn = require_postgres()
    schema = f"rf_outbox_{uuid.uuid4().hex[:10]}"
    outbox = PostgresOutbox(dsn, schema=schema, **options)
    await outbox.install()
    try:
        yield outbox
    finally:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


async def write_rows(
    outbox: PostgresOutbox,
    count: int,
    *,
    per_transaction: int = 500,
    routing_key: str = "order.created",
    key: str | None = None,
    prefix: str = "m",
    dsn: str = POSTGRES_URL,
) -> list[str]:
    """``count`` messages ``{"n": i}`` with message ids ``{prefix}-{i}``, committed in
    transactions of ``per_transaction``; the ids."""
    ids = []
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for start in range(0, count, per_transaction):
            async with conn.transaction():
                for n in range(start, min(count, start + per_transaction)):
                    message_id = f"{prefix}-{n}"
                    await outbox.publish(
                        conn, EXCHANGE, routing_key, {"n": n}, message_id=message_id, key=key
                    )
                    ids.append(message_id)
    return ids


async def count_rows(outbox: PostgresOutbox, state: str) -> int:
    async with await outbox.connect() as conn:
        cursor = await conn.execute(
            f"SELECT count(*) FROM {outbox.statements.table} WHERE state = %s", (state,)
        )
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])


class Sink:
    """A queue bound to ``orders`` (``#``) and everything it received, in order."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.received: list[aio_pika.abc.AbstractIncomingMessage] = []
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def __aenter__(self) -> Sink:
        self._connection = await aio_pika.connect(self.url)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=1000)
        exchange = await channel.declare_exchange(EXCHANGE, "topic", durable=True)
        queue = await channel.declare_queue("outbox-sink", durable=True)
        await queue.bind(exchange, "#")
        await queue.consume(self._on_message)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._connection is not None
        await self._connection.close()

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.received.append(message)
        await message.ack()

    @property
    def ids(self) -> list[str]:
        return [str(m.message_id) for m in self.received]

    def duplicates(self) -> int:
        return sum(n - 1 for n in Counter(self.ids).values())

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(m.body) for m in self.received]

    async def wait_for_ids(self, ids: list[str] | set[str], timeout: float = 30.0) -> None:
        wanted = set(ids)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not wanted <= set(self.ids):
            missing = len(wanted - set(self.ids))
            assert loop.time() < deadline, f"{missing} of {len(wanted)} messages never arrived"
            await asyncio.sleep(0.05)


class PrivatePostgres:
    """A PostgreSQL server of the test's own (initdb in a temporary directory, a port of
    5710-5719), that a test may stop and start again; removed at the end."""

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        # Not under pytest's tmp_path: its parents are root's alone, and the server runs as
        # the postgres user.
        self.root = Path(tempfile.mkdtemp(prefix="rf-outbox-pg-"))
        self.data = self.root / "pgdata"
        self._lease = PortLease(range(5710, 5720))
        self.port = self._lease.port
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: str) -> None:
        # initdb and postgres refuse to run as root.
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{command[0]}: {done.stdout}{done.stderr}"

    def init(self) -> None:
        self.data.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres")
            shutil.chown(self.root, "postgres")
        self._as_postgres(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust"
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        # -l: the server's output to a file, not to our pipe (which would stay open).
        log = str(self.root / "server.log")
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start"
        )

    def stop(self, mode: str = "immediate") -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        """Stop the server if it runs, and delete its files."""
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        self._lease.release()


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        unavailable(
            "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin",
            needed_by="the outbox test that restarts a PostgreSQL of its own",
        )
    return found[-1].parent
