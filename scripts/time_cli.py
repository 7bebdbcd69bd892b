"""Whole-process wall-clock time of CLI commands: ``python scripts/time_cli.py [runs]``.

Each command is started as a new process (what a user waits for), after one warm-up run so
that the figures are those of a warm file-system cache. Prints median and min per command."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [
    ["--help"],
    ["--version"],
    ["topology", "validate", str(ROOT / "topology.toml")],
]


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    exe = shutil.which("rabbitflow", path=str(Path(sys.executable).parent)) or "rabbitflow"
    for args in COMMANDS:
        subprocess.run([exe, *args], capture_output=True, check=True)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([exe, *args], capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        print(
            f"rabbitflow {' '.join(args[:2]):<20} median {statistics.median(times):.3f} s"
            f"  min {min(times):.3f} s  ({runs} runs)"
        )


if __name__ == "__main__":
    main()
