"""Measure how long a quorum queue's broker-held dead letters take to reach the DLQ.

Not a test (it waits minutes): the figures of docs/recoverability.md, "Dead letters the broker
holds". For each broker given, in a vhost of its own: a quorum work queue declared by
rabbitflow (``crash_limit`` 3, at-least-once dead-lettering), its DLQ refusing
(``max-length 0`` + ``reject-publish`` by policy) while N messages go past the delivery
limit, for HOLD_S seconds (env, default 20); the broker holds them (``messages_dlx``).
Then the operator clears the policy and runs ``topology declare``, and the script records
when each message arrives in the DLQ.

    python -m tests.reliability.measure_held \\
        amqp://guest:guest@127.0.0.1:5672/=http://127.0.0.1:15672/ [AMQP=MANAGEMENT ...]
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
import time
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika

from rabbitflow.testing._admin import ManagementAPI
from rabbitflow.topology import derive, parse_topology
from rabbitflow.topology._declare import declare
from tests.support.amqp import return_until_dead_lettered

TOPOLOGY = '[queues.work]\nqueue_type = "quorum"\ncrash_limit = 3\nretry = false\n'
REFUSE = {
    "pattern": r"^work\.dlq$",
    "definition": {"max-length": 0, "overflow": "reject-publish"},
    "apply-to": "queues",
    "priority": 10,
}


def _dlx(api: ManagementAPI, vhost: str) -> tuple[int, int, int]:
    row = api.request("GET", f"queues/{quote(vhost, safe='')}/work")
    dlq = api.request("GET", f"queues/{quote(vhost, safe='')}/work.dlq")
    return (
        int(row.get("messages_dlx") or 0),
        int(row.get("messages") or 0),
        int(dlq.get("messages") or 0),
    )


async def _dlq_depth(url: str) -> int:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue("work.dlq", passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await connection.close()


async def measure(
    amqp: str, management: str, count: int, *, hold_s: float, release: str | None
) -> None:
    parts = urlsplit(amqp)
    api = ManagementAPI(management, parts.username or "guest", parts.password or "guest")
    version = api.request("GET", "overview")["rabbitmq_version"]
    vhost = f"measure-held-{parts.port}"
    where = quote(vhost, safe="")
    api.request("DELETE", f"vhosts/{where}") if _exists(api, vhost) else None
    api.request("PUT", f"vhosts/{where}", {})
    user = parts.username or "guest"
    api.request(
        "PUT", f"permissions/{where}/{user}", {"configure": ".*", "write": ".*", "read": ".*"}
    )
    url = urlunsplit(parts._replace(path="/" + where))
    declarations = derive(parse_topology(TOPOLOGY))
    connection = await aio_pika.connect(url)
    try:
        await declare(connection, declarations)
        api.request("PUT", f"policies/{where}/refuse", REFUSE)
        await asyncio.sleep(1)
        channel = await connection.channel(publisher_confirms=True)
        # A quorum queue checks its limit after an enqueue: the first message over it is
        # taken, those after it are refused. One filler puts the DLQ over its limit.
        await channel.default_exchange.publish(aio_pika.Message(b"filler"), routing_key="work.dlq")
        for n in range(count):
            await channel.default_exchange.publish(
                aio_pika.Message(b"{}", message_id=str(n), delivery_mode=2), routing_key="work"
            )
        # Each delivery taken and given back by closing the channel (as a crash would) counts
        # toward x-delivery-limit on every version.
        await return_until_dead_lettered(connection, "work")
    finally:
        await connection.close()
    start = time.monotonic()
    while _dlx(api, vhost)[0] < count and time.monotonic() - start < 30:  # noqa: ASYNC110
        await asyncio.sleep(1)
    print(f"{version}: held {_dlx(api, vhost)} (messages_dlx, messages, dlq) after the limit")
    await asyncio.sleep(hold_s)
    api.request("DELETE", f"policies/{where}/refuse")
    connection = await aio_pika.connect(url)
    try:
        await declare(connection, declarations)
    finally:
        await connection.close()
    cleared = time.monotonic()
    if release:
        command = release.format(vhost=vhost)
        done = await asyncio.to_thread(
            subprocess.run, shlex.split(command), capture_output=True, text=True, check=False
        )
        print(f"{version}: ran {command!r}: exit {done.returncode} {done.stdout.strip()[-200:]}")
    arrivals: list[float] = []
    seen = 0
    while seen < count and time.monotonic() - cleared < 480:
        depth = await _dlq_depth(url) - 1  # the filler
        arrivals += [time.monotonic() - cleared] * (depth - seen)
        seen = depth
        await asyncio.sleep(1)
    shown = ", ".join(f"{t:.0f}s" for t in arrivals) or "none"
    print(f"{version}: {seen}/{count} in the DLQ after the policy was cleared: at {shown}")
    print(f"{version}: now {_dlx(api, vhost)} (messages_dlx, messages, dlq)")
    api.request("DELETE", f"vhosts/{where}")


def _exists(api: ManagementAPI, vhost: str) -> bool:
    return any(row["name"] == vhost for row in api.request("GET", "vhosts"))


async def main(pairs: list[str]) -> None:
    count = 5
    jobs = []
    for pair in pairs:
        # AMQP=MANAGEMENT[=release command run after the policy is cleared; {vhost} is the
        # vhost's name]
        amqp, management, *release = pair.split("=", 2)
        jobs.append(
            measure(
                amqp,
                management,
                count,
                hold_s=float(os.environ.get("HOLD_S", "20")),
                release=release[0] if release else None,
            )
        )
    for result in await asyncio.gather(*jobs, return_exceptions=True):
        if isinstance(result, BaseException):
            print(f"failed: {result!r}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
