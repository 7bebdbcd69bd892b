"""rabbitflow: declarative RabbitMQ consumers.

Topology as code, typed handlers, delayed retries and dead-letter queues built in.
"""

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from rabbitflow.app import App
    from rabbitflow.message import Message


def __getattr__(name: str) -> object:
    # App and Message pull in aio-pika, pydantic and OpenTelemetry; importing them on first use
    # keeps `rabbitflow --help` and `topology validate` fast (docs/performance.md).
    if name == "App":
        from rabbitflow.app import App

        return App
    if name == "Message":
        from rabbitflow.message import Message

        return Message
    raise AttributeError(f"module 'rabbitflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


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
