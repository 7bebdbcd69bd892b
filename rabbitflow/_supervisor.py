"""``rabbitflow run --workers N``: N worker processes, restarted when they crash.

Each child is a plain ``rabbitflow run`` with one worker. SIGTERM/SIGINT are forwarded; the
supervisor exits when every child has. A child that keeps failing right after start (a
configuration error, a broker that refuses the topology) stops the supervisor instead of
restarting forever.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from rabbitflow._logging import get_logger

log = get_logger("rabbitflow.supervisor")

QUICK_FAILURE = 5.0  # seconds: a child dying this soon after start did not really start
MAX_QUICK_FAILURES = 3


class Supervisor:
    def __init__(
        self, child_args: Sequence[str], workers: int, metrics_port: int | None = None
    ) -> None:
        self.child_args = list(child_args)
        # Each worker serves its own /metrics: slot i listens on metrics_port + i.
        self.metrics_port = metrics_port
        self.workers = workers
        self.children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self.stopping = False
        self.quick_failures = 0
        self.signals = 0

    def _spawn(self, slot: int) -> None:
        # The index goes on every line the child logs (with its pid): --workers N output
        # shows which worker did what.
        command = [
            sys.executable,
            "-m",
            "rabbitflow",
            *self.child_args,
            "--worker-index",
            str(slot),
        ]
        if self.metrics_port is not None:
            command += ["--metrics-port", str(self.metrics_port + slot)]
        # A session of its own: a terminal's Ctrl-C or a service manager signals the
        # supervisor only, which forwards one signal, so each worker drains gracefully.
        process = subprocess.Popen(command, start_new_session=True)
        self.children[slot] = (process, time.monotonic())
        log.info("worker started", worker=slot, pid=process.pid)

    def _forward(self, signum: int, _: FrameType | None) -> None:
        self.signals += 1
        self.stopping = True
        sent = signum if self.signals == 1 else signal.SIGKILL
        for process, _started in self.children.values():
            if process.poll() is None:
                process.send_signal(sent)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        for slot in range(self.workers):
            self._spawn(slot)
        failed = False
        while self.children:
            time.sleep(0.2)
            for slot, (process, started) in list(self.children.items()):
                code = process.poll()
                if code is None:
                    continue
                del self.children[slot]
                if self.stopping:
                    continue
                failed = self._on_exit(slot, process.pid, code, started) or failed
        return 1 if failed else 0

    def _on_exit(self, slot: int, pid: int, code: int, started: float) -> bool:
        quick = time.monotonic() - started < QUICK_FAILURE
        self.quick_failures = self.quick_failures + 1 if quick and code != 0 else 0
        if self.quick_failures >= MAX_QUICK_FAILURES:
            log.error("workers keep failing at start-up; giving up", exit_code=code)
            self.stopping = True
            self._forward(signal.SIGTERM, None)
            return True
        log.warning("worker exited; restarting it", worker=slot, pid=pid, exit_code=code)
        self._spawn(slot)
        return False
