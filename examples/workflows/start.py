"""Start an ETL chain and an album chord and follow them:
``python -m examples.workflows.start N``."""

from __future__ import annotations

import asyncio
import sys

from examples.workflows.app import Extract, Image, app
from rabbitflow import App, chain, chord, group, step


async def main(app: App, images: int) -> list[str]:
    """Start both workflows, wait for their results, and say how each ended."""
    lines = []
    async with app:
        extract = step("etl.extract", Extract(source="sales"))
        etl = await app.start(chain(extract, step("etl.transform"), step("etl.load")))
        album = await app.start(
            chord(
                group(step("thumbs.make", Image(album=7, id=i)) for i in range(images)),
                step("albums.done", delay="2s"),  # the callback waits 2 s after the last member
            )
        )
        for flow in (etl, album):
            result = await app.job(flow.id).result(timeout=60)
            status = await app.jobs.get(flow.id)
            assert status is not None
            done = sum(1 for s in status.steps if s["state"] == "succeeded")
            steps = f"{done}/{len(status.steps)} steps"
            lines.append(f"{status.state.value}, {steps}, result {result!r}")
    return lines


if __name__ == "__main__":
    for line in asyncio.run(main(app, int(sys.argv[1]) if len(sys.argv) > 1 else 10)):
        print(line)
