"""Helpers of the observability tests: in-memory spans, an in-process worker, HTTP and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import structlog
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from rabbitflow import App, Message
from rabbitflow._tracing import Tracing, set_tracing
from rabbitflow._worker import Worker, WorkerOptions

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


# -- topology --------------------------------------------------------------------------------


def write_topology(directory: Path, *queues: str, extra: str = "") -> Path:
    """One direct exchange ``events`` and classic queues bound to it by their own names,
    retried after 100ms then 200ms, 3 attempts; ``extra`` is added to every queue table."""
    retry = 'retry = { delays = ["100ms", "200ms"], max_attempts = 3 }'
    text = '[exchanges.events]\ntype = "direct"\n'
    for queue in queues:
        text += (
            f'\n[queues."{queue}"]\nqueue_type = "classic"\nprefetch = 20\n{retry}\n{extra}\n'
            f'bindings = [{{ exchange = "events", routing_key = "{queue}" }}]\n'
        )
    path = directory / "topology.toml"
    path.write_text(text)
    return path


# -- spans -----------------------------------------------------------------------------------


@dataclass
class Spans:
    """Every span finished while installed as rabbitflow's tracing (and the handler's tracer)."""

    provider: TracerProvider
    exporter: InMemorySpanExporter

    def all(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def consumers(self, queue: str | None = None) -> list[ReadableSpan]:
        return [
            span
            for span in self.all()
            if span.kind is SpanKind.CONSUMER and (queue is None or span.name == f"process {queue}")
        ]

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.all() if span.name == name]

    def by_id(self, span_id: int) -> ReadableSpan:
        return next(span for span in self.all() if span.context.span_id == span_id)


@contextlib.contextmanager
def capture_spans() -> Iterator[Spans]:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    set_tracing(Tracing(provider.get_tracer("test")))
    try:
        yield Spans(provider, exporter)
    finally:
        set_tracing(None)
        provider.shutdown()


# -- an in-process worker --------------------------------------------------------------------


async def wait_for(probe: Callable[[], T | None], what: str, timeout: float = 10.0) -> T:
    """Poll ``probe`` on the event loop until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(app: App, url: str, **options: Any) -> AsyncIterator[Worker]:
    """A Worker for ``app`` consuming on the event loop of the test; stopped on exit."""
    worker = Worker(app, app.load_topology(), WorkerOptions(url=url, **options))
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: worker.ready or task.done(), "the worker to consume")
        if task.done():
            task.result()
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


def body_of(message: Message) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(message.body)
    return value


# -- a gate in front of the broker -----------------------------------------------------------


class BrokerGate:
    """A TCP forwarder to RabbitMQ that can stop accepting connections: an outage during
    which the worker's reconnection attempts are refused and retried, for as long as a test
    needs, without touching the broker's configuration."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5672) -> None:
        self.upstream = (host, port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    def url(self, broker_url: str) -> str:
        parts = urlsplit(broker_url)
        return urlunsplit(
            parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{self.port}")
        )

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


# -- HTTP and Prometheus text ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(name, labels): value}`` of every sample in a Prometheus text exposition."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        name, labels, value = match.groups()
        samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    return samples.get((name, frozenset(labels.items())))


# -- logs ------------------------------------------------------------------------------------


def forget_cached_loggers() -> None:
    """Make rabbitflow's module loggers pick up the current structlog configuration again.

    ``configure_logging`` sets ``cache_logger_on_first_use``: a module-level logger keeps the
    stream it first wrote to, which in a test is pytest's capture of that test only.
    """
    for name, module in list(sys.modules.items()):
        if name == "rabbitflow" or name.startswith(("rabbitflow.", "tests.")):
            for value in list(vars(module).values()):
                if isinstance(value, structlog._config.BoundLoggerLazyProxy):
                    vars(value).pop("bind", None)


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
    return lines


# -- an app for ``rabbitflow run tests.obs_helpers:cli_app`` -----------------------------------

cli_app = App(name="obs-cli")


@cli_app.consumer("cli.work")
async def _cli_work(message: Message) -> None:
    pass
