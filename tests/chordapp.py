"""Chord members that kill their worker once: ``rabbitflow run tests.chordapp:app --workers 2``.

``RF_CHORD_REDIS_PREFIX`` is the jobs store's Redis key prefix and ``RF_CHORD_DIR`` a directory
for what the test reads back. A member whose id is in ``RF_CHORD_KILLERS`` (comma-separated)
kills its process with ``os._exit(1)`` on its first run (as the OOM killer would: no ack, no
nack), once the process is old enough that the supervisor restarts it rather than giving up on
a worker that dies at start-up. The callback appends the ids it received, one line per run,
to ``callbacks.txt``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from pydantic import BaseModel, RootModel

from rabbitflow import App
from rabbitflow.idempotency import RedisStore
from tests.support.services import REDIS_URL

STARTED = time.monotonic()
OLD_ENOUGH = 5.5  # the supervisor's QUICK_FAILURE is 5 s
DIRECTORY = Path(os.environ.get("RF_CHORD_DIR", "."))
KILLERS = {int(i) for i in os.environ.get("RF_CHORD_KILLERS", "").split(",") if i}

app = App(
    name="chordapp", jobs=RedisStore(REDIS_URL, prefix=os.environ.get("RF_CHORD_REDIS_PREFIX", ""))
)


class Img(BaseModel):
    id: int


class Thumb(BaseModel):
    id: int


Thumbs = RootModel[list[Thumb]]


@app.consumer("thumbs.make")
async def make(img: Img) -> Thumb:
    marker = DIRECTORY / f"killed-{img.id}"
    if img.id in KILLERS and not marker.exists():
        await asyncio.sleep(max(0.0, OLD_ENOUGH - (time.monotonic() - STARTED)))
        marker.touch()
        os._exit(1)
    return Thumb(id=img.id)


@app.consumer("albums.done")
async def done(thumbs: Thumbs) -> int:
    with (DIRECTORY / "callbacks.txt").open("a") as out:
        out.write(json.dumps([thumb.id for thumb in thumbs.root]) + "\n")
    return len(thumbs.root)
