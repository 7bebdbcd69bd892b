"""Publish a report request every N seconds: a small cron-like loop on asyncio.

This is an example, not a rabbitflow feature: one process, no persistence, no catch-up of the
ticks it missed while it was down. Run exactly one of it (or let the consumer drop duplicate
slots, as ``build_report`` does). For real schedules prefer the platform's scheduler (cron, a
Kubernetes CronJob, a systemd timer) running ``rabbitflow publish`` once per tick.

    python -m examples.periodic.publisher --every 60 [--count N] [--report daily-sales]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from examples.periodic.app import ReportRequested, app


async def every(
    interval: float, tick: Callable[[int], Awaitable[None]], *, count: int | None = None
) -> int:
    """Call ``tick(slot)`` at each multiple of ``interval`` seconds since the epoch.

    Aligned to the wall clock (``--every 60`` ticks on the minute), at a fixed rate: a slow tick
    does not delay the next ones, and a slot that is already over when the loop gets to it is
    skipped rather than run late. Stops after ``count`` ticks (``None``: never); returns the
    number of ticks run.
    """
    done = 0
    slot = int(time.time() // interval) + 1
    while count is None or done < count:
        await asyncio.sleep(max(slot * interval - time.time(), 0))
        now_slot = int(time.time() // interval)
        if now_slot > slot:  # we woke up too late for this slot: skip to the current one
            slot = now_slot
        await tick(slot)
        done += 1
        slot += 1
    return done


async def publish_tick(report: str, interval: float, slot: int) -> None:
    """One report request; the message id is the slot, so a duplicate is recognisable."""
    scheduled_at = datetime.fromtimestamp(slot * interval, UTC)
    request = ReportRequested(report=report, slot=slot, scheduled_at=scheduled_at)
    await app.publish("reports", "report.requested", request, message_id=f"{report}-{slot}")


async def main(interval: float, count: int | None, report: str) -> None:
    async with app:  # closes the publishing connection at the end

        async def tick(slot: int) -> None:
            await publish_tick(report, interval, slot)
            print(f"published {report} slot {slot}", flush=True)

        await every(interval, tick, count=count)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=60.0, help="seconds between ticks")
    parser.add_argument("--count", type=int, default=None, help="stop after N ticks")
    parser.add_argument("--report", default="daily-sales")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C stops it
        asyncio.run(main(args.every, args.count, args.report))
