"""rabbitflow: declarative RabbitMQ consumers.

Topology as code, typed handlers, delayed retries and dead-letter queues built in.
"""

from rabbitflow.app import App
from rabbitflow.errors import (
    AccessRefusedError,
    BrokerError,
    ConfigurationError,
    DecodeError,
    HandlerTimeout,
    PublishError,
    RabbitflowError,
    Reject,
    RemoteError,
    RequestTimeout,
    Retry,
    TlsVerificationError,
    TopologyConflictError,
    TopologyError,
    UnreachableBrokerError,
    UnroutableError,
)
from rabbitflow.message import Message

__all__ = [
    "AccessRefusedError",
    "App",
    "BrokerError",
    "ConfigurationError",
    "DecodeError",
    "HandlerTimeout",
    "Message",
    "PublishError",
    "RabbitflowError",
    "Reject",
    "RemoteError",
    "RequestTimeout",
    "Retry",
    "TlsVerificationError",
    "TopologyConflictError",
    "TopologyError",
    "UnreachableBrokerError",
    "UnroutableError",
]
