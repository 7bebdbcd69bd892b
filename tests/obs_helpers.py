"""Old import path of the observability tests' helpers: see ``tests/support``."""

from tests.apps.obs_cli import cli_app
from tests.support.network import BrokerGate, free_port, http_get
from tests.support.output import body_of, forget_cached_loggers, json_lines, parse_metrics, sample
from tests.support.processes import ROOT
from tests.support.spans import Spans, capture_spans
from tests.support.topology import write_topology
from tests.support.waiting import wait_for
from tests.support.worker import running

__all__ = [
    "ROOT",
    "BrokerGate",
    "Spans",
    "body_of",
    "capture_spans",
    "cli_app",
    "forget_cached_loggers",
    "free_port",
    "http_get",
    "json_lines",
    "parse_metrics",
    "running",
    "sample",
    "wait_for",
    "write_topology",
]
