"""A TCP proxy on 127.0.0.1 between the worker and RabbitMQ that can break the network.

It runs its own event loop in a thread, so that a test can drive it from plain blocking code
while subprocesses and ``rabbitmqctl`` calls run. Two faults:

- :meth:`ChaosProxy.cut`: close every open connection at once, both ways (a NAT reset, a
  load balancer restart). Both ends see the socket close immediately.
- :meth:`ChaosProxy.stall`: keep the connections open but silently drop every byte in both
  directions (a partition, a dead peer behind a stateful firewall). Nobody sees a close; only
  missed heartbeats reveal it. Connections opened afterwards work normally, so a client that
  notices can reconnect through the proxy.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from tests.support.network import free_port, via


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client side, the broker side, and whether it is stalled."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    stalled: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            transport = writer.transport
            # abort(): an immediate close (RST), like a middlebox dropping the flow.
            transport.abort()


class ChaosProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream``; start with :meth:`start`."""

    def __init__(
        self, upstream_port: int, upstream_host: str = "127.0.0.1", *, port: int | None = None
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port or free_port()
        self.accepted = 0
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    # -- control (thread-safe, blocking) --------------------------------------------------

    def start(self) -> ChaosProxy:
        self._thread.start()
        self._call(self._open())
        return self

    def url(self, broker_url: str) -> str:
        """``broker_url`` rewritten to go through the proxy."""
        return via(broker_url, self.port)

    def open_links(self) -> int:
        return int(self._call(self._count()))

    def cut(self) -> int:
        """Close every open connection; return how many there were."""
        return int(self._call(self._cut()))

    def stall(self) -> int:
        """Silently drop all traffic of the open connections; return how many there were."""
        return int(self._call(self._stall()))

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(self._shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coroutine: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(10)

    # -- on the proxy's loop ----------------------------------------------------------------

    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _count(self) -> int:
        return len(self._links)

    async def _cut(self) -> int:
        links = list(self._links)
        for link in links:
            link.close()
        return len(links)

    async def _stall(self) -> int:
        for link in self._links:
            link.stalled = True
        return len(self._links)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close()
            for task in link.tasks:
                task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pipe(link, reader, up_writer, upstream=False)),
            asyncio.create_task(self._pipe(link, up_reader, writer, upstream=True)),
        ]

    async def _pipe(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if link.stalled:
                    continue  # read and drop: the sender's writes succeed, nothing arrives
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._links.discard(link)
            if link.stalled and upstream:
                # The broker gave up on a stalled link (its own heartbeat check): across a
                # real partition that close never reaches the client, which must find out by
                # itself. Only the broker side is closed.
                link.upstream.transport.abort()
            else:
                # One side closed (or was cut): close the other, as a real connection would.
                link.close()


def main(argv: list[str]) -> None:
    """``python -m tests.reliability.proxy PORT UPSTREAM_PORT``: the proxy as a process of
    its own, so that a test can kill it by its pid (every connection through it drops, and
    new ones are refused until it is started again)."""
    port, upstream = int(argv[0]), int(argv[1])
    proxy = ChaosProxy(upstream, port=port).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"proxy 127.0.0.1:{port} -> 127.0.0.1:{upstream}", flush=True)
    stop.wait()
    proxy.close()


if __name__ == "__main__":
    main(sys.argv[1:])
