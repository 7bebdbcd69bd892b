"""Workflows under ``TestApp`` (no broker): a chain with a delayed step runs on the virtual
clock, and a chord's callback gets every result in member order."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from rabbitflow import App, chain, chord, group, step
from rabbitflow.idempotency import MemoryStore
from rabbitflow.testing import TestApp


class N(BaseModel):
    n: int


def make_app(tmp_path: Path, seen: list[tuple[str, object]]) -> App:
    (tmp_path / "topology.toml").write_text("[queues.a]\n[queues.b]\n[queues.c]\n")
    app = App(topology=tmp_path / "topology.toml", jobs=MemoryStore())

    @app.consumer("a")
    async def a(x: N) -> N:
        seen.append(("a", x.n))
        return N(n=x.n + 1)

    @app.consumer("b")
    async def b(x: N) -> N:
        seen.append(("b", x.n))
        return N(n=x.n * 10)

    @app.consumer("c")
    async def c(results: list[dict[str, int]]) -> int:
        seen.append(("c", results))
        return len(results)

    return app


async def test_a_chain_with_a_delayed_step_runs_on_the_virtual_clock(tmp_path: Path) -> None:
    seen: list[tuple[str, object]] = []
    app = make_app(tmp_path, seen)
    async with TestApp(app) as t:
        flow = await app.start(chain(step("a", N(n=1)), step("b", delay="5m")))
        await t.drain()
        status = await app.jobs.get(flow.id)
    assert seen == [("a", 1), ("b", 2)]
    assert status is not None
    assert status.state.value == "succeeded"
    assert status.result == {"n": 20}


async def test_a_chord_calls_back_with_the_results_in_member_order(tmp_path: Path) -> None:
    seen: list[tuple[str, object]] = []
    app = make_app(tmp_path, seen)
    async with TestApp(app) as t:
        flow = await app.start(chord(group(step("a", N(n=i)) for i in range(4)), step("c")))
        await t.drain()
        status = await app.jobs.get(flow.id)
    assert seen[-1] == ("c", [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}])
    assert status is not None
    assert status.result == 4
