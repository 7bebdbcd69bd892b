"""Topology as code: the TOML schema, its loader, the derived objects, and broker operations."""

from typing import TYPE_CHECKING

from rabbitflow.topology._derived import Declarations, derive, dlq_name, tier_name
from rabbitflow.topology._loader import load_topology, parse_topology
from rabbitflow.topology._model import QueueConfig, RetryPolicy, Topology

if TYPE_CHECKING:
    from rabbitflow.topology._declare import declare, verify


def __getattr__(name: str) -> object:
    # declare and verify pull in aiormq; importing them on first use keeps `topology validate`
    # fast (docs/performance.md, "CLI start-up").
    if name in ("declare", "verify"):
        from rabbitflow.topology import _declare

        return getattr(_declare, name)
    raise AttributeError(f"module 'rabbitflow.topology' has no attribute {name!r}")


__all__ = [
    "Declarations",
    "QueueConfig",
    "RetryPolicy",
    "Topology",
    "declare",
    "derive",
    "dlq_name",
    "load_topology",
    "parse_topology",
    "tier_name",
    "verify",
]
