"""A web app served by uvicorn in a subprocess: the ASGI tests and the web examples."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.network import free_port
from tests.support.processes import ROOT
from tests.support.waiting import wait_until


@dataclass
class WebProcess:
    """``uvicorn TARGET`` on a free port of 127.0.0.1, its output in ``log_path``."""

    target: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> WebProcess:
        """Start uvicorn; with ``wait``, return once it serves (its start-up finished)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        command = [sys.executable, "-m", "uvicorn", self.target, "--port", str(self.port)]
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        if wait:
            wait_until(self._serving, 20, f"uvicorn {self.target} to serve")
        return self

    def _serving(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"uvicorn exited ({self.process.returncode}) before serving:\n{self.output()}"
            )
        return "Application startup complete" in self.output()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=10)

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> tuple[int, float]:
        """SIGTERM, as a service manager stops it; the exit code and the seconds it took."""
        assert self.process is not None
        sent = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"uvicorn still running {timeout}s later:\n{self.output()}"
            ) from None
        return code, time.monotonic() - sent

    def kill(self) -> None:
        """SIGKILL if still running (test teardown); only this process, by its pid."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
