"""A 200-member chord under ``rabbitflow run --workers 2`` whose members kill their process
(``os._exit`` on the first attempt): the callback runs exactly once, with 200 results in
order. Real RabbitMQ (quorum queues) and Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from pydantic import BaseModel

from rabbitflow import App, chord, group, step
from rabbitflow.idempotency import RedisStore
from tests.support.services import REDIS_URL, delete_prefix, require_redis

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.crash]

ROOT = Path(__file__).resolve().parent.parent
RABBITFLOW = Path(sys.executable).with_name("rabbitflow")
TOPOLOGY = """
[defaults]
queue_type = "quorum"
prefetch = 20
retry = { delays = ["200ms", "1s"], max_attempts = 3 }

[queues."thumbs.make"]
[queues."albums.done"]
"""
KILLERS = (17, 101, 188)


class Img(BaseModel):  # tests/chordapp.py's member input (not imported: it opens a store)
    id: int


async def test_a_chord_whose_members_kill_their_workers_calls_back_once_in_order(
    tmp_path: Path, vhost_url: str
) -> None:
    require_redis()
    prefix = f"rf-test:{uuid.uuid4().hex[:10]}:"
    (tmp_path / "topology.toml").write_text(TOPOLOGY)
    env = {
        **os.environ,
        "RF_CHORD_REDIS_PREFIX": prefix,
        "RF_CHORD_DIR": str(tmp_path),
        "RF_CHORD_KILLERS": ",".join(map(str, KILLERS)),
    }
    store = RedisStore(REDIS_URL, prefix=prefix)
    app = App(topology=tmp_path / "topology.toml", url=vhost_url, jobs=store)
    process = await asyncio.create_subprocess_exec(
        str(RABBITFLOW),
        "run",
        "tests.chordapp:app",
        "--workers",
        "2",
        "--topology",
        str(tmp_path / "topology.toml"),
        "--url",
        vhost_url,
        "--shutdown-timeout",
        "2",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await _declared(app)
        # Given a chord of 200 members, three of which kill their worker on the first run
        flow = await app.start(
            chord(group(step("thumbs.make", Img(id=i)) for i in range(200)), step("albums.done"))
        )
        # When the workers (restarted by the supervisor) have run it to the end
        status = await _finished(app, flow.id, 90)
        await asyncio.sleep(1.0)  # a duplicate callback would have run by now
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
        await app.close()
        await store.close()
        await delete_prefix(REDIS_URL, prefix)

    # Then every killer did kill its worker once
    killed = sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("killed-"))  # noqa: ASYNC240
    assert killed == sorted(f"killed-{i}" for i in KILLERS)
    # and the callback ran exactly once, with the 200 results in member order
    runs = (tmp_path / "callbacks.txt").read_text().splitlines()
    assert len(runs) == 1, runs
    assert json.loads(runs[0]) == list(range(200))
    assert status.state.value == "succeeded"


async def _declared(app: App) -> None:
    # The workers declare the topology; the chord is started once its queues exist.
    from rabbitflow.errors import UnroutableError

    deadline = time.monotonic() + 30
    while True:
        try:
            await app.publish("", "albums.done.dlq", b"probe", mandatory=True)
        except UnroutableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
            continue
        return


async def _finished(app: App, flow_id: str, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await app.jobs.get(flow_id)
        if status is not None and status.state.finished:
            return status
        await asyncio.sleep(0.2)
    raise AssertionError(f"the chord did not finish within {timeout:g}s")
