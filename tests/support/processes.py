"""``rabbitflow`` in subprocesses: workers (their JSON logs in a file), a supervisor's restart
loop, and CLI commands."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.output import json_lines
from tests.support.records import Records
from tests.support.waiting import eventually, wait_until

ROOT = Path(__file__).resolve().parent.parent.parent


def child_env(**variables: str) -> dict[str, str]:
    """The environment of a ``rabbitflow`` subprocess: this one's with ``variables``, output
    unbuffered (its log file is read while it runs), and without ``RABBITFLOW_URL`` (the test
    says which broker, or that there is none)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **variables}
    env.pop("RABBITFLOW_URL", None)
    return env


@dataclass
class WorkerProcess:
    """``rabbitflow run TARGET`` in a subprocess, its output (JSON log lines) in a file."""

    target: str
    url: str
    topology: Path | None
    log_path: Path
    env: dict[str, str]
    extra: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    _log_offset: int = field(default=0, repr=False)

    def start(self) -> WorkerProcess:
        command = [sys.executable, "-m", "rabbitflow", "run", self.target, "--url", self.url]
        if self.topology is not None:
            command += ["--topology", str(self.topology)]
        command += ["--log-format", "json", *self.extra]
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=self.env
            )
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        """Everything this run printed (after earlier runs that shared the log file)."""
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines of this run."""
        return json_lines(self.output())

    def has_event(self, event: str) -> bool:
        return any(entry.get("event") == event for entry in self.events())

    def wait_for_event(self, event: str, timeout: float = 15.0) -> None:
        def seen() -> bool:
            if self.has_event(event):
                return True
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"worker exited ({self.process.returncode}) before logging {event!r}:\n"
                    + self.output()
                )
            return False

        wait_until(seen, timeout, f"the worker to log {event!r}")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker still running {timeout}s later:\n{self.output()}"
            ) from None

    def stop(self, timeout: float = 10.0) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took to exit."""
        sent = time.monotonic()
        self.signal(signal.SIGTERM)
        code = self.wait(timeout)
        return code, time.monotonic() - sent

    def kill(self) -> None:
        """SIGKILL if still running (test teardown); only this process, by its pid."""
        if self.running():
            assert self.process is not None
            self.process.kill()
            self.process.wait(10)


class Workers:
    """Starts worker subprocesses for one test and kills any left running afterwards (the
    ``workers`` fixture). Their handlers record into ``records`` (``$RF_RECORD``)."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        self.tmp_path = tmp_path
        self.url = url
        self.records = Records(tmp_path / "records.txt")
        self.started: list[WorkerProcess] = []

    def start(
        self,
        target: str,
        topology: Path | None,
        *extra: str,
        sleep: float = 0.0,
        wait_ready: bool = True,
        ready_timeout: float = 15.0,
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        """``rabbitflow run TARGET`` with ``extra`` options, ``$RF_SLEEP`` set to ``sleep`` and
        the variables of ``env``; once it logs ``consuming`` unless not ``wait_ready``."""
        environment = child_env(
            RF_RECORD=str(self.records.path), RF_SLEEP=str(sleep), **(env or {})
        )
        worker = WorkerProcess(
            target, self.url, topology, self.tmp_path / "worker.log", environment, extra
        ).start()
        self.started.append(worker)
        if wait_ready:
            worker.wait_for_event("consuming", ready_timeout)
        return worker

    async def restart_until(
        self,
        done: Callable[[], Awaitable[bool]],
        target: str,
        topology: Path,
        *extra: str,
        starts: int,
        timeout: float,
    ) -> int:
        """A supervisor's loop: start ``rabbitflow run TARGET`` again each time it exits, until
        ``done`` (the running one then gets SIGTERM) or ``starts`` starts; how many it took.
        Fails when the loop has not ended after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        started = 0
        while started < starts and not await done():
            started += 1
            worker = self.start(target, topology, *extra, wait_ready=False)
            ended = functools.partial(_exited_or, worker, done)
            left = deadline - time.monotonic()
            await eventually(ended, f"the restart loop to end ({started} starts)", left, 0.1)
            if worker.running():
                await asyncio.to_thread(worker.stop, 15)
        return started

    def cleanup(self) -> None:
        for worker in self.started:
            worker.kill()


async def _exited_or(worker: WorkerProcess, done: Callable[[], Awaitable[bool]]) -> bool:
    return not worker.running() or await done()


def run_cli(
    *args: str,
    timeout: float = 30.0,
    stdin: str | None = None,
    cwd: Path = ROOT,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m rabbitflow ARGS`` (from the repository root unless ``cwd``), without the
    caller's ``RABBITFLOW_URL``."""
    return subprocess.run(
        [sys.executable, "-m", "rabbitflow", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
        env=child_env(**(extra_env or {})),
        check=False,
    )
