"""CPU time from /proc: of the broker (beam.smp), of a process tree, of the whole machine.

Used while ``rabbitflow run --workers N`` drains a queue, to tell whether the workers or the
broker is the limit. Linux only; on a broker in another PID namespace (a container) the
broker's share reads as ``None``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after its end.
    return text[text.rindex(")") + 2 :].split()


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def beam_pids() -> list[int]:
    found = []
    for pid in _pids():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "beam.smp":
                found.append(pid)
        except OSError:
            continue
    return found


def tree(root: int) -> list[int]:
    """``root`` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        fields = _stat(pid)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the processes (all their threads)."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def machine_seconds() -> float:
    """CPU seconds the machine spent busy (every core; idle and iowait excluded)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / TICK


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    ready: int
    broker: float | None
    workers: float
    machine: float


def sample(at: float, ready: int, beams: list[int], root: int) -> Sample:
    broker = cpu_seconds(beams) if beams else None
    return Sample(at, ready, broker, cpu_seconds(tree(root)), machine_seconds())


def steady(samples: list[Sample], total: int) -> dict[str, float] | None:
    """Cores used by the broker, the workers and everything else while the queue went from
    90 % to 10 % of ``total``, and each one's CPU µs per message."""
    inside = [s for s in samples if 0.1 * total <= s.ready <= 0.9 * total]
    if len(inside) < 2:
        return None
    first, last = inside[0], inside[-1]
    seconds = last.at - first.at
    handled = first.ready - last.ready
    if seconds <= 0 or handled <= 0:
        return None
    workers = last.workers - first.workers
    machine = last.machine - first.machine
    result = {
        "seconds": seconds,
        "rate": handled / seconds,
        "workers_cores": workers / seconds,
        "machine_cores": machine / seconds,
        "workers_us_per_msg": workers / handled * 1e6,
    }
    if first.broker is not None and last.broker is not None:
        broker = last.broker - first.broker
        result["broker_cores"] = broker / seconds
        result["broker_us_per_msg"] = broker / handled * 1e6
        result["other_cores"] = (machine - workers - broker) / seconds
    return result
