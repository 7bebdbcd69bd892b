"""The 3-node RabbitMQ cluster of the fault tests (``../shared/tools/cluster.sh``).

Nodes ``rfc1..rfc3@localhost`` on 127.0.0.1:5681-5683, started by ``.ci/services/cluster.sh``
in CI. Without them the tests skip (fail when ``CI`` is set). Every test finds all three
nodes running and leaves them so: a node a test killed is revived afterwards.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.reliability.checker import Checker
from tests.support.broker import Rabbit
from tests.support.network import answers
from tests.support.processes import ROOT

TOOL = Path(os.environ.get("RF_CLUSTER_TOOL", ROOT.parent / "shared" / "tools" / "cluster.sh"))
NODES = (1, 2, 3)


def port(node: int) -> int:
    return 5680 + node


@dataclass
class Cluster:
    """The three nodes: their URLs, rabbitmqctl on each, and faults."""

    tool: Path

    def run(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            [str(self.tool), *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"cluster.sh {' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def rabbit(self, node: int) -> Rabbit:
        """Node ``node`` as a :class:`Rabbit` (its URL, ``rabbitmqctl -n rfcN``)."""
        return Rabbit.at(
            f"amqp://guest:guest@127.0.0.1:{port(node)}/", [str(self.tool), "ctl", str(node)]
        )

    def url(self, node: int, vhost: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{port(node)}/{quote(vhost, safe='')}"

    def urls(self, vhost: str, order: tuple[int, ...]) -> str:
        """Comma-separated, as ``--url`` and ``RABBITFLOW_URL`` take several nodes."""
        return ",".join(self.url(node, vhost) for node in order)

    def up(self, node: int) -> bool:
        return answers("127.0.0.1", port(node))

    def kill(self, node: int) -> float:
        """SIGKILL the node's beam; return the wall-clock time just before the kill."""
        before = time.time()
        self.run("kill", str(node))
        assert not self.up(node), f"node {node} still answers after kill"
        return before

    def revive(self, *nodes: int) -> list[float]:
        """Start the nodes again, in parallel (a cluster that was all down needs its peers);
        return the wall-clock time each one was running again."""

        def start(node: int) -> float:
            self.run("revive", str(node), timeout=180)
            return time.time()

        with ThreadPoolExecutor(len(nodes) or 1) as pool:
            return list(pool.map(start, nodes))

    def revive_down(self) -> None:
        self.revive(*[node for node in NODES if not self.up(node)])

    def leader(self, vhost: str, queue: str) -> int:
        """The node that leads quorum queue ``queue``."""
        for node in NODES:
            if not self.up(node):
                continue
            out = self.run(
                "ctl",
                str(node),
                "list_queues",
                "-p",
                vhost,
                "name",
                "leader",
                "--no-table-headers",
                "--quiet",
            )
            for line in out.splitlines():
                name, _, leader = line.partition("\t")
                if name == queue and leader.startswith("rfc"):
                    return int(leader[3])
        raise AssertionError(f"no leader found for {queue!r}")


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    """The running cluster; skipped (failed in CI) when its nodes do not answer."""
    found = Cluster(TOOL)
    some_up = any(found.up(node) for node in NODES)
    if TOOL.exists() and some_up and not all(found.up(node) for node in NODES):
        found.revive_down()  # a node left down by an interrupted run
    if not all(found.up(node) for node in NODES):
        message = f"the 3-node cluster (127.0.0.1:5681-5683, {TOOL} start) is not running"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


@pytest.fixture
def cluster_vhost(cluster: Cluster) -> Iterator[str]:
    """A fresh vhost of the cluster; afterwards every node a test killed is revived and the
    vhost deleted."""
    rabbit = cluster.rabbit(1)
    name = f"rf-cluster-{uuid.uuid4().hex[:10]}"
    rabbit.admin.add_vhost(name)
    try:
        rabbit.admin.set_permissions(name, "guest")
        yield name
    finally:
        cluster.revive_down()
        with contextlib.suppress(RuntimeError):
            rabbit.admin.delete_vhost(name)


def checker_on(cluster: Cluster, node: int, vhost: str, tmp_path: Path, name: str) -> Checker:
    """A lost/duplicate checker that publishes, counts and drains through ``node``."""
    return Checker(cluster.rabbit(node), vhost, tmp_path, name)
