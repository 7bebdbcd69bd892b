"""Whole-process wall-clock time of CLI commands: ``python scripts/time_cli.py [runs]``.

Each command is a new ``python -m rabbitflow`` process (what a user waits for), timed from
start to exit after one warm-up run, so that the figures are those of a warm file-system
cache. Prints the median and minimum wall-clock time, and the median CPU time, per command.
``PYTHONPATH=/other/checkout`` times another version of the code with the same interpreter
(docs/performance.md, "CLI start-up"). The commands run in an empty directory: ``python -m``
puts the current directory first on ``sys.path``, which would time this checkout whatever
``PYTHONPATH`` says."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [
    ["--help"],
    ["--version"],
    ["run", "--help"],
    ["topology", "validate", str(ROOT / "topology.toml")],
]


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    with tempfile.TemporaryDirectory() as empty:
        _time_commands(runs, empty)
    print("load average: " + " ".join(f"{load:.2f}" for load in os.getloadavg()))


def _time_commands(runs: int, cwd: str) -> None:
    exe = [sys.executable, "-m", "rabbitflow"]
    for args in COMMANDS:
        subprocess.run([*exe, *args], capture_output=True, check=True, cwd=cwd)
        times, cpu = [], []
        for _ in range(runs):
            before = _children_cpu()
            start = time.perf_counter()
            subprocess.run([*exe, *args], capture_output=True, check=True, cwd=cwd)
            times.append(time.perf_counter() - start)
            cpu.append(_children_cpu() - before)
        print(
            f"rabbitflow {' '.join(args[:2]):<20} wall median {statistics.median(times):.3f} s"
            f"  min {min(times):.3f} s; CPU median {statistics.median(cpu):.3f} s ({runs} runs)"
        )


def _children_cpu() -> float:
    # User + system time of finished children: unlike wall-clock time, barely changed by
    # other processes competing for the cores.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
