"""Fixtures of the reliability suite: the private chaos node, a vhost on it, the checker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.chaos_node import NODE, ChaosNode, ChaosNodeUnavailable
from tests.reliability.checker import Checker
from tests.support.broker import Rabbit


@pytest.fixture(scope="session")
def chaos_node(rabbit: Rabbit) -> Iterator[ChaosNode]:
    """The second RabbitMQ node, started once per session (on first use) and stopped at the end.

    Skipped with the reason when it cannot start; in CI that is a failure, as for the shared
    broker.
    """
    node = ChaosNode()
    try:
        node.start()
    except (ChaosNodeUnavailable, OSError, RuntimeError) as exc:
        node.stop()
        message = f"second RabbitMQ node {NODE} unavailable: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def chaos_vhost(chaos_node: ChaosNode) -> Iterator[str]:
    """A fresh vhost on the chaos node, deleted afterwards (if the node still runs)."""
    with chaos_node.rabbit.vhost("rf-chaos") as name:
        yield name


@pytest.fixture
def checker(
    rabbit: Rabbit, vhost: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Checker]:
    """A checker on a fresh vhost of the shared broker."""
    with Checker(rabbit, vhost, tmp_path, request.node.name) as check:
        yield check


@pytest.fixture
def chaos_checker(
    chaos_node: ChaosNode, chaos_vhost: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Checker]:
    """A checker on a fresh vhost of the chaos node."""
    with Checker(chaos_node.rabbit, chaos_vhost, tmp_path, request.node.name) as check:
        yield check
