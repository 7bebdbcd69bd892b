"""Old import path of the recoverability tests' helpers: see ``tests/support``."""

from tests.support.amqp import declare_topology, publish_many
from tests.support.amqp import drain_async as drain
from tests.support.amqp import publish_one as publish
from tests.support.broker import queue_counts as depths
from tests.support.output import text
from tests.support.records import RECORD_ENV, Run, Runs, record
from tests.support.topology import app_for
from tests.support.waiting import wait_for
from tests.support.worker import running

__all__ = [
    "RECORD_ENV",
    "Run",
    "Runs",
    "app_for",
    "declare_topology",
    "depths",
    "drain",
    "publish",
    "publish_many",
    "record",
    "running",
    "text",
    "wait_for",
]
