"""Stores that a test can take down: a private ``redis-server`` and a TCP proxy process in
front of the shared PostgreSQL, each killed by its pid and started again on the same port.

The shared Redis (6379) and PostgreSQL (5432) are never stopped: the outage is made on the
private server or on the proxy, which only this test's worker goes through.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.processes import ROOT

# What tests.reliability.store_app builds its store from: the store's URL, and the Redis
# key prefix or PostgreSQL table of the test.
STORE_ENV = "RF_REL_STORE"
SPACE_ENV = "RF_REL_STORE_SPACE"

# Private ports of this suite (the test machine's plan: Redis 5760-5769, proxies 5770-5779).
REDIS_PORTS = range(5760, 5770)
PROXY_PORTS = range(5770, 5780)
POSTGRES_PORT = 5432


def unavailable(message: str) -> None:
    """Skip with the reason; in CI a missing service is a failure."""
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def free_private_port(ports: range) -> int:
    """The first port of ``ports`` that nothing listens on (tests in parallel take others)."""
    for port in ports:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


def _wait_listening(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 10
    while not listening(port):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start on port {port}")
        time.sleep(0.05)


class Killable:
    """A server process on a fixed port: start, kill -9 by pid, start again."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
        _wait_listening(self.port, self.process, " ".join(self.command()[:2]))

    def kill(self) -> None:
        """SIGKILL by pid: the sockets drop and the port refuses connections."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        """SIGSTOP by pid: connections stay open, nothing answers (a hung server)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def cont(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
        self.kill()


class PrivateRedis(Killable):
    """``redis-server`` on a private port, no persistence: an outage forgets every key."""

    def __init__(self, log: Path) -> None:
        if shutil.which("redis-server") is None:
            unavailable("redis-server is not installed (needed for private Redis outages)")
        super().__init__(free_private_port(REDIS_PORTS), log)

    def command(self) -> list[str]:
        return [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class PostgresProxy(Killable):
    """``tests.reliability.proxy`` in a process of its own in front of the shared
    PostgreSQL; killing it is an outage of PostgreSQL for whoever connects through it."""

    def __init__(self, log: Path) -> None:
        if not listening(POSTGRES_PORT):
            unavailable(f"no PostgreSQL on 127.0.0.1:{POSTGRES_PORT}")
        super().__init__(free_private_port(PROXY_PORTS), log)

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tests.reliability.proxy",
            str(self.port),
            str(POSTGRES_PORT),
        ]

    def url(self, database_url: str) -> str:
        """``database_url`` through the proxy."""
        return database_url.replace(f":{POSTGRES_PORT}/", f":{self.port}/", 1)
