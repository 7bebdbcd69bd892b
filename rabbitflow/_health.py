"""``--metrics-port``: ``/metrics`` (Prometheus text), ``/healthz`` and ``/readyz``.

``/metrics`` is rabbitflow's own metrics followed by the user's prometheus_client registry
(see :mod:`rabbitflow._metrics`). ``/healthz`` answers 200 while the process runs its event
loop; ``/readyz`` answers 200 only while the broker connection is open and every consumer
is consuming (a consumer paused by its circuit breaker or for a store that does not answer
counts as consuming: it is a decision, not a fault).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from rabbitflow._logging import get_logger
from rabbitflow._metrics import Metrics

log = get_logger("rabbitflow.health")
_TEXT = "text/plain; charset=utf-8"
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


class HealthServer:
    """A tiny HTTP/1.0 server on the event loop; one request per connection."""

    def __init__(self, metrics: Metrics, ready: Callable[[], bool], host: str, port: int) -> None:
        self.metrics = metrics
        self.ready = ready
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        sockets = self._server.sockets or ()
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("metrics and health endpoints listening", host=self.host, port=self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            status, content_type, body = self._route(parts[0] if parts else "", path)
            head = (
                f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", _TEXT, b"method not allowed\n"
        if path == "/metrics":
            return "200 OK", _PROMETHEUS, self.metrics.exposition().encode()
        if path == "/healthz":
            return "200 OK", _TEXT, b"ok\n"
        if path == "/readyz":
            if self.ready():
                return "200 OK", _TEXT, b"ready\n"
            return "503 Service Unavailable", _TEXT, b"not ready\n"
        return "404 Not Found", _TEXT, b"not found\n"
