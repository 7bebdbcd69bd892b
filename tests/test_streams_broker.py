"""Stream consumers on a real broker: resume after a stop, attempts in place, DLQ on failure."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.support.amqp import drain, publish
from tests.support.broker import Rabbit
from tests.support.processes import ROOT, Workers

pytestmark = [pytest.mark.broker, pytest.mark.slow]

STREAMER = "tests.apps.streamer:app"
TOPOLOGY = ROOT / "tests" / "apps" / "stream.toml"


def events(first: int, last: int, failing: int | None = None) -> list[tuple[str, bytes]]:
    return [(f"e{i}", json.dumps({"fail": i == failing}).encode()) for i in range(first, last + 1)]


def test_a_stream_consumer_resumes_where_it_stopped_and_never_appends_retries(
    rabbit: Rabbit, vhost: str, vhost_url: str, workers: Workers
) -> None:
    # Given a worker on a stream, handling ten events, one of which always fails
    worker = workers.start(STREAMER, TOPOLOGY)
    publish(vhost_url, "events", "event", events(1, 10, failing=5))
    workers.records.wait_for("event", 9 + 3, timeout=20)

    # When it stops, ten more events arrive while it is down, and it starts again
    code, _ = worker.stop()
    assert code == 0, worker.output()
    publish(vhost_url, "events", "event", events(11, 20))
    workers.start(STREAMER, TOPOLOGY)
    records = workers.records.wait_for("event", 19 + 3, timeout=20)

    # Then every event was handled once, the failing one three times in place (attempts
    # 1-3), never again after the restart, and it is in the DLQ, not back in the stream
    runs = Counter(message_id for message_id, _ in records)
    assert runs == {f"e{i}": (3 if i == 5 else 1) for i in range(1, 21)}, runs
    assert [attempt for message_id, attempt in records if message_id == "e5"] == ["1", "2", "3"]
    dead = drain(vhost_url, "events.dlq")
    assert [m.message_id for m in dead] == ["e5"]
    assert dead[0].headers["rabbitflow-attempt"] == 3
    queues = {name for name, *_ in rabbit.list(vhost, "queues", "name")}
    assert not any(".retry." in name for name in queues)  # a stream has no retry tiers
    assert "rabbitflow.offset.streamer.events" in queues
