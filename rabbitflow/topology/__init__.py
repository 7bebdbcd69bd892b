"""Topology as code: the TOML schema, its loader, the derived objects, and broker operations."""

from rabbitflow.topology._derived import Declarations, derive, dlq_name, tier_name
from rabbitflow.topology._loader import load_topology, parse_topology
from rabbitflow.topology._model import QueueConfig, RetryPolicy, Topology

__all__ = [
    "Declarations",
    "QueueConfig",
    "RetryPolicy",
    "Topology",
    "derive",
    "dlq_name",
    "load_topology",
    "parse_topology",
    "tier_name",
]
