"""Old import path of the runtime tests' helpers: see ``tests/support``."""

from tests.support.amqp import (
    drain,
    drain_async,
    jobs,
    message_counts,
    message_counts_async,
    publish,
    publish_async,
)
from tests.support.broker import queue_counts, queue_names, wait_queues_empty, worker_connections
from tests.support.processes import ROOT, WorkerProcess, Workers, run_cli
from tests.support.records import Records
from tests.support.topology import work_topology
from tests.support.waiting import wait_until

__all__ = [
    "ROOT",
    "Records",
    "WorkerProcess",
    "Workers",
    "drain",
    "drain_async",
    "jobs",
    "message_counts",
    "message_counts_async",
    "publish",
    "publish_async",
    "queue_counts",
    "queue_names",
    "run_cli",
    "wait_queues_empty",
    "wait_until",
    "work_topology",
    "worker_connections",
]
