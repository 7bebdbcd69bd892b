"""Stores that a test can take down: a private ``redis-server`` and a TCP proxy process in
front of the shared PostgreSQL, each killed by its pid and started again on the same port.

The shared Redis (6379) and PostgreSQL (5432) are never stopped: the outage is made on the
private server or on the proxy, which only this test's worker goes through.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from rabbitflow.testing.pytest_plugin import unavailable
from tests.support.network import PortLease, answers
from tests.support.processes import ROOT
from tests.support.services import require_postgres
from tests.support.waiting import wait_until

# What tests.reliability.store_app builds its store from: the store's URL, and the Redis
# key prefix or PostgreSQL table of the test.
STORE_ENV = "RF_REL_STORE"
SPACE_ENV = "RF_REL_STORE_SPACE"

# Private ports of this suite (the test machine's plan: Redis 5760-5769, proxies 5770-5779).
REDIS_PORTS = range(5760, 5770)
PROXY_PORTS = range(5770, 5780)


class Killable:
    """A server process on a port of ``ports`` held for the test: start, kill -9 by pid,
    start again on the same port."""

    def __init__(self, ports: range, log: Path) -> None:
        self._lease = PortLease(ports)
        self.port = self._lease.port
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        with self.log.open("ab") as out:
            process = subprocess.Popen(
                self.command(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
        self.process = process
        what = " ".join(self.command()[:2])

        def listening() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited ({process.returncode}): see {self.log}")
            return answers("127.0.0.1", self.port, timeout=0.5)

        wait_until(listening, 10, f"{what} to listen on port {self.port}")

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
        self._lease.release()


class PrivateRedis(Killable):
    """``redis-server`` on a private port, no persistence: an outage forgets every key."""

    def __init__(self, log: Path, ports: range = REDIS_PORTS) -> None:
        if shutil.which("redis-server") is None:
            unavailable("redis-server is not installed", needed_by="the private Redis outages")
        super().__init__(ports, log)

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
    PostgreSQL (``RABBITFLOW_TEST_POSTGRES``); killing it is an outage of PostgreSQL for
    whoever connects through it (:attr:`url`)."""

    def __init__(self, log: Path) -> None:
        self.upstream = urlsplit(require_postgres())
        super().__init__(PROXY_PORTS, log)

    def command(self) -> list[str]:
        upstream = str(self.upstream.port or 5432)
        return [sys.executable, "-m", "tests.reliability.proxy", str(self.port), upstream]

    @property
    def url(self) -> str:
        """The shared PostgreSQL's URL through the proxy."""
        credentials = self.upstream.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return self.upstream._replace(netloc=netloc).geturl()
