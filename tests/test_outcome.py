"""What the policy decides is what the settler logs: a deferral's log line names the
not-before its copy carries."""

from __future__ import annotations

from structlog.testing import capture_logs

from rabbitflow import App, Message, Retry
from rabbitflow import _headers as h
from rabbitflow.testing import TestApp
from rabbitflow.topology import parse_topology


class Later(Retry):
    """A wait that is not the handler's failure: deferred, no attempt spent."""

    spends_attempt = False


async def test_a_deferral_logs_the_not_before_its_copy_carries() -> None:
    # Given a handler that asks to wait 3 s without spending an attempt, on a 1 s tier
    app = App()
    seen: list[object] = []

    @app.consumer("q")
    async def handle(body: dict[str, int], message: Message) -> None:
        seen.append(message.headers.get(h.NOT_BEFORE))
        if len(seen) == 1:
            raise Later("3s")

    topology = parse_topology('[queues.q]\nretry = { delays = ["1s"] }\n')
    with capture_logs() as logs:
        async with TestApp(app, topology) as t:
            await t.publish("", "q", {"n": 1})
            await t.drain()

    # Then the message ran again once its not-before passed, on the same attempt
    assert seen[0] is None
    assert isinstance(seen[-1], str)
    # and every deferral, the first one and each hop through the tier, logged that not-before
    deferred = [e for e in logs if e["event"] == "deferred: not before its time"]
    assert len(deferred) >= 2
    assert {e["not_before"] for e in deferred} == {seen[-1]}
    assert {e["tier"] for e in deferred} == {"q.retry.1s"}
