"""Several broker nodes: where the list comes from, validation, order, and failover at connect."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import rabbitflow._services
from rabbitflow import App
from rabbitflow._urls import InvalidUrlError, mask_url, resolve_urls
from rabbitflow._worker import Worker, WorkerOptions
from rabbitflow.connection import connect, connected_url
from rabbitflow.errors import TopologyError, UnreachableBrokerError
from rabbitflow.topology import parse_topology
from tests.support.broker import Rabbit
from tests.test_topology_broker import run_cli

NODES = [
    "amqp://u:pw1@rabbit-1:5672/",
    "amqp://u:pw2@rabbit-2:5672/",
    "amqp://u:pw3@rabbit-3:5672/",
]
# Nothing listens on port 1: a node that is down.
DOWN = "amqp://guest:guest@127.0.0.1:1/"


@pytest.fixture(autouse=True)
def _no_env_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RABBITFLOW_URL", raising=False)


def test_option_beats_environment_beats_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITFLOW_URL", ",".join(NODES[:2]))

    assert resolve_urls(None, NODES) == NODES[:2]
    assert resolve_urls([NODES[2]], NODES) == [NODES[2]]
    monkeypatch.delenv("RABBITFLOW_URL")
    assert resolve_urls(None, NODES) == NODES
    assert resolve_urls(None, None) == ["amqp://guest:guest@localhost:5672/"]


def test_comma_separated_values_are_several_nodes() -> None:
    assert resolve_urls(f"{NODES[0]}, {NODES[1]}") == NODES[:2]
    assert resolve_urls((f"{NODES[0]},{NODES[1]}", NODES[2])) == NODES


def test_shuffled_order_keeps_every_node_and_varies() -> None:
    orders = {tuple(resolve_urls(NODES, order="shuffle")) for _ in range(60)}

    assert all(sorted(order) == sorted(NODES) for order in orders)
    assert len(orders) > 1
    assert resolve_urls(NODES, order="given") == NODES


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://u:secret@rabbit-1/", "scheme must be amqp or amqps, not 'http'"),
        ("amqp://u:secret@/", "names no host"),
        ("amqp://u:secret@rabbit-1:notaport/", "cannot be parsed"),
        ("amqp://u:secret@rabbit-1/a/b", "contains '/'"),
        (
            "amqp://u:secret@rabbit-1/ amqp://u:secret@rabbit-2/",
            "contains whitespace; separate several nodes with commas",
        ),
    ],
)
def test_a_bad_url_is_named_with_its_password_masked(url: str, reason: str) -> None:
    with pytest.raises(InvalidUrlError) as caught:
        resolve_urls([NODES[0], url])

    assert "secret" not in str(caught.value)
    assert reason in str(caught.value)
    assert "u:***@" in str(caught.value)


def test_a_space_separated_pair_is_masked_entirely() -> None:
    assert mask_url("amqp://a:one@h1/ amqp://b:two@h2/") == "amqp://a:***@h1/ amqp://b:***@h2/"


def test_the_file_takes_urls_or_url_but_not_both() -> None:
    quoted = ", ".join(f'"{url}"' for url in NODES)
    topology = parse_topology(f"[broker]\nurls = [{quoted}]\n")

    assert topology.broker_urls == tuple(NODES)
    assert topology.broker_url == NODES[0]
    with pytest.raises(TopologyError, match=r"set url .* or urls .*, not both"):
        parse_topology(f'[broker]\nurl = "{NODES[0]}"\nurls = [{quoted}]\n')


def test_app_takes_a_list_and_validates_it() -> None:
    app = App(url=NODES)

    assert app.urls == NODES
    assert app.url == NODES[0]
    with pytest.raises(InvalidUrlError, match="scheme must be amqp"):
        App(url=[NODES[0], "redis://u:secret@cache/"])


def test_cli_bad_url_is_one_error_line(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_text("[queues.jobs]\n", encoding="utf-8")

    result = run_cli(
        "topology", "declare", str(path), "--url", NODES[0], "--url", "amqp://u:secret@h:x/"
    )

    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: broker URL amqp://u:***@h:x/: cannot be parsed "
        "(Port could not be cast to integer value as 'x')"
    ]
    assert "secret" not in result.output


def test_cli_unreachable_nodes_are_all_named(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_text("[queues.jobs]\n", encoding="utf-8")

    result = run_cli(
        "topology",
        "plan",
        str(path),
        "--url",
        "amqp://guest:secret@127.0.0.1:1/",
        "--url",
        "amqp://guest:secret@127.0.0.1:2/",
    )

    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("error: cannot connect to any of 2 nodes: 127.0.0.1:")
    assert "127.0.0.1:1:" in line
    assert "127.0.0.1:2:" in line
    assert "secret" not in result.output


@pytest.mark.broker
async def test_connect_passes_over_a_node_that_is_down(rabbit: Rabbit, vhost_url: str) -> None:
    connection = await connect([DOWN, vhost_url])
    try:
        assert urlsplit(connected_url(connection)).port == urlsplit(vhost_url).port
    finally:
        await connection.close()


@pytest.mark.broker
async def test_connect_to_every_node_down_names_them() -> None:
    with pytest.raises(UnreachableBrokerError) as caught:
        await asyncio.wait_for(connect([DOWN, "amqp://guest:guest@127.0.0.1:2/"]), 30)

    assert caught.value.url == "any of 2 nodes"


@pytest.mark.broker
def test_cli_declares_through_the_node_that_answers(
    rabbit: Rabbit, vhost: str, vhost_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "topology.toml"
    path.write_text("[queues.jobs]\nretry = false\n", encoding="utf-8")

    result = run_cli(
        "topology", "declare", str(path), "--url", DOWN, "--url", vhost_url, "--url-order", "given"
    )

    assert result.exit_code == 0, result.output
    assert f"on {mask_url(DOWN)}, {mask_url(vhost_url)}" in result.stdout
    assert ["jobs"] in rabbit.list(vhost, "queues", "name")


@pytest.mark.broker
async def test_a_worker_whose_first_node_is_down_consumes_through_the_next(
    vhost_url: str, tmp_path: Path
) -> None:
    # Given a worker told about a node that is down, then the broker
    (tmp_path / "topology.toml").write_text("[queues.jobs]\nretry = false\n", encoding="utf-8")
    app = App(tmp_path / "topology.toml", name="rf-urls")
    seen: list[bytes] = []
    handled = asyncio.Event()

    @app.consumer("jobs")
    async def handle(body: bytes) -> None:
        seen.append(body)
        handled.set()

    worker = Worker(
        app, app.load_topology(), WorkerOptions(url=[DOWN, vhost_url], shutdown_timeout=1)
    )
    task = asyncio.create_task(worker.run())
    try:
        # Then it consumes at once through the broker, knowing its version
        async with asyncio.timeout(15):
            while not worker.ready:
                assert not task.done(), "the worker stopped"
                await asyncio.sleep(0.05)
        assert worker.broker_version is not None
        assert worker.broker_version.supported
        assert worker.reconnections == 0
        await app.publish("", "jobs", b"through the second node")
        await asyncio.wait_for(handled.wait(), 10)
        assert seen == [b"through the second node"]
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)


def test_the_worker_reads_the_management_api_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a worker whose management API is behind a proxy, not on port 15672 of the node
    seen: list[tuple[str, str]] = []

    async def depths(api: str, vhost: str) -> dict[str, dict[str, int]]:
        seen.append((api, vhost))
        return {}

    monkeypatch.setattr(rabbitflow._services, "queue_depths", depths)
    options = WorkerOptions(
        url="amqp://app:s3cret@rabbit-1:5672/orders", management_url="https://mgmt.example/"
    )
    worker = Worker(App(), parse_topology(""), options)

    # When the tier monitor reads the depths
    asyncio.run(worker._queue_depths())  # type: ignore[arg-type]

    # Then it asks the given API, with the node's credentials, for the node's vhost
    assert seen == [("https://app:s3cret@mgmt.example/", "orders")]
    # and RABBITFLOW_MANAGEMENT_URL gives the same without the option (empty: the default)
    monkeypatch.setenv("RABBITFLOW_MANAGEMENT_URL", "http://proxy:8080/")
    assert WorkerOptions(url="amqp://x/").management_url == "http://proxy:8080/"
    monkeypatch.setenv("RABBITFLOW_MANAGEMENT_URL", "")
    assert WorkerOptions(url="amqp://x/").management_url is None
