"""How a worker runs: its connection's settings and those of what runs beside its consumers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rabbitflow._urls import split_urls
from rabbitflow.topology._management import configured_url


@dataclass
class WorkerOptions:
    """How a worker runs. ``url`` is one node or the nodes of one cluster, tried in order."""

    url: str | Sequence[str]
    declare: bool = True
    shutdown_timeout: float = 30.0
    heartbeat: int | None = None
    max_reconnect_wait: float = 30.0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # The management API the stuck-tier monitor reads; None: port 15672 of the node in use.
    management_url: str | None = field(default_factory=configured_url)
    # Seconds between the INFO progress lines of each consumer with traffic; None: no lines.
    progress_interval: float | None = 60.0
    # Run the relay of App(outbox=...) beside the consumers (--no-outbox-relay: not).
    outbox_relay: bool = True

    @property
    def urls(self) -> list[str]:
        """Every node, in the order they are tried."""
        return split_urls(self.url)
