"""Sockets of a test: free ports, whether a port answers, a server that never answers, HTTP
GET, and a gate in front of the broker."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


class BrokerGate:
    """A TCP forwarder to RabbitMQ that can stop accepting connections: an outage during
    which the worker's reconnection attempts are refused and retried, for as long as a test
    needs, without touching the broker's configuration."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        if port is None:
            # The broker under test: the 4.0 and 4.3 passes point RABBITFLOW_TEST_URL elsewhere.
            tested = os.environ.get("RABBITFLOW_TEST_URL") or "amqp://127.0.0.1:5672/"
            port = urlsplit(tested).port or 5672
        self.upstream = (host, port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    def url(self, broker_url: str) -> str:
        return via(broker_url, self.port)

    async def __aenter__(self) -> BrokerGate:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)

    def shut(self) -> None:
        """Refuse new connections; those already open stay up."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def close(self) -> None:
        self.shut()
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        for source, target in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(_pipe(source, target))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def free_port() -> int:
    """A port nothing listens on (yet): a connection to it is refused at once. For a server a
    test kills and starts again on the same port, :class:`PortLease`."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen


class PortLease:
    """A port of a private range held for one test, across processes: a lock file per port
    (``flock``), so that a server the test kills and starts again finds its port still its
    own, though another test session (the 4.0 and 4.3 passes run side by side) looks for a
    free port meanwhile. :meth:`release` (or the process's exit) gives it back."""

    def __init__(self, ports: range) -> None:
        for port in ports:
            path = Path(tempfile.gettempdir(), f"rabbitflow-test-port-{port}.lock")
            lock = path.open("wb")  # held until release(), not closed here
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                continue
            if _bindable(port):
                self.port, self._lock = port, lock
                return
            lock.close()  # taken by something that does not lease (a server left running)
        raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")

    def release(self) -> None:
        if not self._lock.closed:
            self._lock.close()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def via(broker_url: str, port: int) -> str:
    """``broker_url`` (its credentials kept) to ``127.0.0.1:port``: through a proxy or gate."""
    parts = urlsplit(broker_url)
    credentials = f"{parts.username}:{parts.password}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{credentials}127.0.0.1:{port}"))


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Does something accept TCP connections on ``host:port``?"""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """The port of a server that accepts connections and never answers (a hung store, a
    broker that never finishes the handshake); its sockets are closed on exit."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


async def http_get(port: int, path: str) -> tuple[int, str]:
    """Status and body of ``GET path`` (the health server shares the test's event loop)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        await writer.drain()
        response = (await asyncio.wait_for(reader.read(), 5)).decode()
    finally:
        writer.close()
    head, _, body = response.partition("\r\n\r\n")
    return int(head.split()[1]), body
