"""``rabbitflow.asgi.lifespan``: a FastAPI app served by uvicorn in a subprocess, consuming
in the web process (``consume=True``) as ``rabbitflow run`` does, or only publishing and saying
so (``consume=False``). The app is tests/apps/web.py; its handler records what it ran.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from fastapi import FastAPI

from rabbitflow import App, ConfigurationError
from rabbitflow.asgi import jobs_router
from rabbitflow.idempotency import RedisStore
from tests.apps import web as web_app
from tests.support.amqp import declare_topology, message_counts
from tests.support.network import BrokerGate, free_port
from tests.support.records import Records
from tests.support.waiting import wait_for, wait_until
from tests.support.web import WebProcess

T = TypeVar("T")
NOT_CONSUMED = "the app has consumers that this process does not consume"


@pytest.fixture
def records(tmp_path: Path) -> Records:
    return Records(tmp_path / "records.txt")


@pytest.fixture
def web(tmp_path: Path, records: Records) -> Iterator[list[WebProcess]]:
    """uvicorn processes of one test, killed if still running at the end."""
    started: list[WebProcess] = []
    yield started
    for process in started:
        process.kill()


def serve(
    started: list[WebProcess],
    tmp_path: Path,
    records: Records,
    url: str,
    *,
    consume: bool,
    sleep: float = 0.0,
    target: str = "tests.apps.web:api",
) -> WebProcess:
    env = {
        "RABBITFLOW_URL": url,
        "RF_CONSUME": "1" if consume else "0",
        "RF_SLEEP": str(sleep),
        "RF_RECORD": str(records.path),
    }
    process = WebProcess(target, tmp_path / "uvicorn.log", env)
    started.append(process)
    return process.start()


@pytest.mark.broker
@pytest.mark.parametrize("target", ["tests.apps.web:api", "tests.apps.web:starlette_app"])
def test_consume_true_runs_the_consumers_in_the_web_process(
    web: list[WebProcess], tmp_path: Path, records: Records, vhost_url: str, target: str
) -> None:
    # given FastAPI (or Starlette) with lifespan(app, consume=True), served by uvicorn
    server = serve(web, tmp_path, records, vhost_url, consume=True, target=target)
    with server.client() as http:
        # then once it serves, the consumers consume: ready, and the queue declared
        ready = http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["state"] == "consuming"
        assert ready.json()["queues"] == ["work"]

        # when the web app publishes a message to its own queue
        message_id = http.post("/work").json()["message_id"]

    # then its handler runs in the same process, once
    records.wait_for("done", 1, timeout=10)
    assert records.ids("done") == {message_id: 1}
    assert message_counts(vhost_url, ["work"]) == {"work": 0}
    assert NOT_CONSUMED not in server.output()


@pytest.mark.broker
def test_sigterm_drains_in_flight_handlers_before_uvicorn_exits(
    web: list[WebProcess], tmp_path: Path, records: Records, vhost_url: str
) -> None:
    # given a handler that takes 1 s, running in the web process
    server = serve(web, tmp_path, records, vhost_url, consume=True, sleep=1.0)
    with server.client() as http:
        message_id = http.post("/work").json()["message_id"]
    records.wait_for("start", 1, timeout=10)

    # when uvicorn gets SIGTERM while the handler runs
    code, took = server.stop()

    # then it exits cleanly (uvicorn re-raises the SIGTERM it handled) after the handler
    # finished, and the message was acked: nothing left to redeliver, the handler ran once
    assert code in (0, -signal.SIGTERM), server.output()
    assert records.of("done") == [[message_id, "False"]]
    assert records.ids("start") == {message_id: 1}
    assert message_counts(vhost_url, ["work"]) == {"work": 0}
    assert took < 10


@pytest.mark.broker
async def test_readiness_follows_the_consumers_connection(
    web: list[WebProcess], tmp_path: Path, records: Records, vhost_url: str
) -> None:
    async with BrokerGate() as gate:
        # given a web app consuming through a gate in front of the broker
        server = await asyncio.to_thread(
            serve, web, tmp_path, records, gate.url(vhost_url), consume=True
        )
        async with server.async_client() as http:

            async def state() -> tuple[int, str, int]:
                response = await http.get("/readyz")
                body = response.json()
                return response.status_code, body["state"], body["reconnections"]

            assert await state() == (200, "consuming", 0)

            # when the connection is lost and the broker cannot be reached
            await gate.close()
            lost = await _until(state, lambda s: s[0] == 503)
            assert lost[1] == "connecting"

            # then once the broker answers again, the consumers are back, and ready
            await gate.open()
            back = await _until(state, lambda s: s[0] == 200, timeout=30)
            assert back == (200, "consuming", 1)

            # the same health, as a FastAPI dependency
            health = (await http.get("/consumers")).json()
            assert (health["ready"], health["paused"], health["error"]) == (True, [], None)
        await asyncio.to_thread(server.stop)


@pytest.mark.broker
async def test_started_while_the_broker_is_down_it_serves_not_ready_then_consumes(
    web: list[WebProcess], tmp_path: Path, records: Records, vhost_url: str
) -> None:
    # given a gate in front of the broker that does not accept connections yet
    gate = BrokerGate()
    try:
        # when the web app starts (its start-up waits ready_timeout, 3 s, then gives up)
        server = await asyncio.to_thread(
            serve, web, tmp_path, records, gate.url(vhost_url), consume=True
        )
        async with server.async_client() as http:
            # then it serves HTTP, not ready, while the worker keeps connecting
            response = await http.get("/readyz")
            assert (response.status_code, response.json()["state"]) == (503, "connecting")

            # and once the broker answers, the consumers consume
            await gate.open()
            response = await _until(lambda: http.get("/readyz"), lambda r: r.status_code == 200)
            assert response.json()["state"] == "consuming"
            message_id = (await http.post("/work")).json()["message_id"]
            await wait_for(lambda: records.ids("done").get(message_id), "the message handled")
        await asyncio.to_thread(server.stop)
    finally:
        await gate.close()
    assert "consumers not consuming yet" in server.output()


async def _until(
    probe: Callable[[], Awaitable[T]], holds: Callable[[T], bool], timeout: float = 15.0
) -> T:
    """Await ``probe`` until what it gives ``holds``; fail with the last value after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not holds(found := await probe()):
        assert asyncio.get_running_loop().time() < deadline, f"still {found}"
        await asyncio.sleep(0.1)
    return found


@pytest.mark.broker
def test_an_app_opened_but_never_consuming_warns_once_naming_its_consumers(
    web: list[WebProcess], tmp_path: Path, records: Records, vhost_url: str
) -> None:
    # given a web app that opens the app with consume=False (publish only), its queue declared
    asyncio.run(declare_topology(web_app.app, vhost_url))
    server = serve(web, tmp_path, records, vhost_url, consume=False)
    with server.client() as http:
        # when it publishes to the app's own queue, twice
        http.post("/work")
        http.post("/work")
        health = http.get("/readyz").json()

    # then nothing consumes them, and the process said so once, naming the consumer
    assert health["state"] == "disabled"
    assert message_counts(vhost_url, ["work"]) == {"work": 2}
    server.stop()
    output = server.output()
    assert output.count(NOT_CONSUMED) == 1, output
    line = next(line for line in output.splitlines() if NOT_CONSUMED in line)
    assert "work -> tests.apps.web.handle_work" in line
    assert records.of("start") == []


@pytest.mark.broker
def test_an_error_that_would_end_rabbitflow_run_fails_the_web_apps_start_up(
    web: list[WebProcess], tmp_path: Path, records: Records, vhost_url: str
) -> None:
    # given a web app consuming with a password the broker refuses
    refused = vhost_url.replace("guest:guest@", "guest:wrong@")
    process = WebProcess(
        "tests.apps.web:api",
        tmp_path / "uvicorn.log",
        {"RABBITFLOW_URL": refused, "RF_CONSUME": "1", "RF_RECORD": str(records.path)},
    )
    web.append(process)

    # when uvicorn starts it, then its start-up fails and it exits, naming the refusal
    process.start(wait=False)
    assert process.process is not None
    assert process.process.wait(20) != 0
    output = process.output()
    assert "Application startup failed" in output
    assert "ACCESS_REFUSED" in output or "refused" in output
    assert "wrong" not in output  # the password is masked


OPENED_TWICE = """
import asyncio

from rabbitflow import App

busy = App(topology="missing.toml", name="busy")
idle = App(topology="missing.toml", name="idle")


@busy.consumer("orders.created")
async def handle_order(order: dict) -> None: ...


@busy.consumer("orders.paid")
def handle_payment(payment: dict) -> None: ...


async def main() -> None:
    for _ in range(2):
        async with busy, idle:
            pass


asyncio.run(main())
"""


def test_the_warning_is_once_per_app_and_only_for_an_app_with_consumers(tmp_path: Path) -> None:
    # given a script that opens an app with two consumers twice, and one without consumers
    script = tmp_path / "opened.py"
    script.write_text(OPENED_TWICE)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=30, check=True
    )
    # then one warning, on stderr, naming both consumers and only the busy app
    assert done.stdout == ""
    assert done.stderr.count(NOT_CONSUMED) == 1, done.stderr
    assert "app=busy" in done.stderr
    assert "orders.created -> __main__.handle_order" in done.stderr
    assert "orders.paid -> __main__.handle_payment" in done.stderr


@pytest.mark.broker
def test_jobs_router_answers_a_jobs_status_and_404_for_an_unknown_one(
    web: list[WebProcess], tmp_path: Path, records: Records, vhost_url: str
) -> None:
    # given a web app that consumes its own tracked queue (job statuses in memory)
    server = serve(web, tmp_path, records, vhost_url, consume=True)
    with server.client() as http:
        # when it enqueues a job
        job_id = http.post("/jobs").json()["id"]

        # then GET /jobs/{id} follows it to succeeded, with the handler's return value
        def finished() -> dict[str, object] | None:
            response = http.get(f"/jobs/{job_id}")
            assert response.status_code == 200
            body: dict[str, object] = response.json()
            return body if body["state"] == "succeeded" else None

        status = wait_until(finished, 10, "the job to succeed")
        assert (status["id"], status["attempt"]) == (job_id, 1)
        assert status["result"] == {"handled": job_id}
        unknown = http.get("/jobs/never-enqueued")
        assert (unknown.status_code, unknown.json()) == (
            404,
            {"detail": "no job 'never-enqueued'"},
        )


async def test_jobs_router_answers_503_when_the_job_store_does_not_answer() -> None:
    # given an app whose jobs are in a Redis that nothing listens for
    app = App(topology="missing.toml", jobs=RedisStore(f"redis://127.0.0.1:{free_port()}/0"))
    api = FastAPI()
    api.include_router(jobs_router(app), prefix="/jobs")
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://web.test") as http:
        response = await http.get("/jobs/some-job")
    # then the client is asked to come back, not given a 500
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json() == {"detail": "the job store does not answer; try again"}


def test_jobs_router_needs_a_job_store() -> None:
    with pytest.raises(ConfigurationError, match=r"App\(\.\.\., jobs=RedisStore"):
        jobs_router(App(topology="missing.toml"))
