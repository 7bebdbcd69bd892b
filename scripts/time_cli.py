"""Whole-process wall-clock time of CLI commands: ``python scripts/time_cli.py [runs] [OTHER]``.

Each command is a new ``python -m rabbitflow`` process (what a user waits for), timed from
start to exit after one warm-up run, so that the figures are those of a warm file-system
cache. Prints the median and minimum wall-clock time, and the median CPU time, per command.
``OTHER``, the path of another checkout (or of an export of its ``rabbitflow`` package), is
timed too, on ``PYTHONPATH`` with the same interpreter, its runs alternating with this
checkout's so that both see the same load (docs/performance.md, "CLI start-up"). The commands
run in an empty directory: ``python -m`` puts the current directory first on ``sys.path``,
which would time this checkout whatever ``PYTHONPATH`` says."""

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
    versions = {"this checkout": dict(os.environ)}
    if len(sys.argv) > 2:
        versions[sys.argv[2]] = {**os.environ, "PYTHONPATH": sys.argv[2]}
    with tempfile.TemporaryDirectory() as empty:
        for args in COMMANDS:
            _time_command(args, runs, versions, empty)
    print("load average: " + " ".join(f"{load:.2f}" for load in os.getloadavg()))


def _time_command(
    args: list[str], runs: int, versions: dict[str, dict[str, str]], cwd: str
) -> None:
    command = [sys.executable, "-m", "rabbitflow", *args]
    times: dict[str, list[float]] = {name: [] for name in versions}
    cpu: dict[str, list[float]] = {name: [] for name in versions}
    for env in versions.values():
        subprocess.run(command, capture_output=True, check=True, cwd=cwd, env=env)
    for _ in range(runs):
        for name, env in versions.items():
            before = _children_cpu()
            start = time.perf_counter()
            subprocess.run(command, capture_output=True, check=True, cwd=cwd, env=env)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(_children_cpu() - before)
    for name in versions:
        print(
            f"rabbitflow {' '.join(args[:2]):<20} wall median {statistics.median(times[name]):.3f}"
            f" s  min {min(times[name]):.3f} s; CPU median {statistics.median(cpu[name]):.3f} s"
            f" ({runs} runs, {name})"
        )


def _children_cpu() -> float:
    # User + system time of finished children: unlike wall-clock time, barely changed by
    # other processes competing for the cores.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
