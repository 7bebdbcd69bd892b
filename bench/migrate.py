"""How long ``rabbitflow topology migrate`` takes: ``python -m bench.migrate`` (docs/operations.md,
"Changing a queue").

For each ``--messages`` count, in a vhost of its own: a classic queue (with its retry tier
and DLQ) is declared, filled with that many confirmed 200-byte messages, and migrated to a
quorum queue by the real command (a subprocess, ``--yes``), with no consumer and no
publisher running. Prints the command's wall time and the mover's figures for each of the
two moves (to the temporary queue and back). The vhost is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import quote

import aio_pika

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY = """
[exchanges.jobs]
type = "direct"

[queues.work]
queue_type = "{queue_type}"
bindings = [{{ exchange = "jobs", routing_key = "work" }}]
retry = {{ delays = ["1s"] }}
"""
MOVED = re.compile(r"moved (\d+) messages in ([\d.]+) s \((\d+)/s\)")


def api(base: str, method: str, path: str, body: object = None) -> None:
    request = urllib.request.Request(
        f"{base.rstrip('/')}/api/{path}",
        None if body is None else json.dumps(body).encode(),
        {
            "Authorization": "Basic " + base64.b64encode(b"guest:guest").decode(),
            "content-type": "application/json",
        },
        method=method,
    )
    with urllib.request.urlopen(request, timeout=30):
        pass


async def fill(url: str, count: int) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange("jobs")
        body = b"x" * 200
        for start in range(0, count, 1000):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(body, message_id=str(n), delivery_mode=2), "work"
                    )
                    for n in range(start, min(count, start + 1000))
                )
            )


def cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "rabbitflow", "topology", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"rabbitflow topology {args[0]} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


def one(amqp: str, management: str, count: int) -> None:
    vhost = f"bench-migrate-{uuid.uuid4().hex[:8]}"
    api(management, "PUT", f"vhosts/{quote(vhost, safe='')}")
    api(
        management,
        "PUT",
        f"permissions/{quote(vhost, safe='')}/guest",
        {"configure": ".*", "write": ".*", "read": ".*"},
    )
    url = f"{amqp.rstrip('/')}/{vhost}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            old, new = Path(tmp, "old.toml"), Path(tmp, "new.toml")
            old.write_text(TOPOLOGY.format(queue_type="classic"))
            new.write_text(TOPOLOGY.format(queue_type="quorum"))
            cli("declare", str(old), "--url", url, "--management-url", management)
            asyncio.run(fill(url, count))
            started = time.monotonic()
            out = cli("migrate", str(new), "--url", url, "--management-url", management, "--yes")
            took = time.monotonic() - started
        moves = MOVED.findall(out)
        detail = "; ".join(f"{m} msgs in {s} s ({r}/s)" for m, s, r in moves)
        print(f"{count:>7} messages: migrate took {took:.1f} s  [{detail}]", flush=True)
    finally:
        api(management, "DELETE", f"vhosts/{quote(vhost, safe='')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672")
    parser.add_argument("--management-url", default="http://127.0.0.1:15672/")
    parser.add_argument("--messages", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    print(f"topology migrate, classic -> quorum, on {args.url.rsplit('@', 1)[-1]}")
    for count in args.messages:
        one(args.url, args.management_url, count)


if __name__ == "__main__":
    main()
