"""rabbitflow: declarative RabbitMQ consumers.

Topology as code, typed handlers, delayed retries and dead-letter queues built in.
"""

from typing import TYPE_CHECKING

from rabbitflow.errors import (
    AccessRefusedError,
    BatchFailure,
    BatchPublishError,
    BrokerError,
    ConfigurationError,
    CrashLimitReached,
    DecodeError,
    DeferralOutOfRange,
    DrainError,
    FrameTooLarge,
    HandlerTimeout,
    ImportStringError,
    InvalidUrlError,
    JobCancelled,
    JobError,
    JobFailed,
    JobResultError,
    JobTimeout,
    OutputError,
    Problem,
    PublishAccessRefusedError,
    PublishConnectionError,
    PublishError,
    PublishTlsError,
    PublishUnreachableError,
    QueueNotFoundError,
    RabbitflowError,
    Reject,
    RemoteError,
    RequestTimeout,
    Retry,
    StoreUnavailableError,
    TlsVerificationError,
    TopologyConflictError,
    TopologyError,
    TopologyMismatchError,
    TopologySyntaxError,
    UnreachableBrokerError,
    UnroutableError,
    UserImportError,
    WorkflowError,
)

if TYPE_CHECKING:
    from rabbitflow.app import App
    from rabbitflow.message import Message
    from rabbitflow.workflows import chain, chord, group, step

_WORKFLOWS = frozenset({"chain", "chord", "group", "step"})


def __getattr__(name: str) -> object:
    # App and Message pull in aio-pika, pydantic and OpenTelemetry; importing them on first use
    # keeps `rabbitflow --help` and `topology validate` fast (docs/performance.md).
    if name == "App":
        from rabbitflow.app import App

        return App
    if name == "Message":
        from rabbitflow.message import Message

        return Message
    if name in _WORKFLOWS:
        # Importing rabbitflow.workflows also installs its step hook into the core.
        from rabbitflow import workflows

        return getattr(workflows, name)
    raise AttributeError(f"module 'rabbitflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [  # noqa: RUF022 (grouped by topic, as dramatiq does)
    # The application and what a handler receives (imported on first use).
    "App",
    "Message",
    # Workflows (rabbitflow.workflows, imported on first use).
    "chain",
    "chord",
    "group",
    "step",
    # Control flow a handler raises.
    "Reject",
    "Retry",
    # The root of every error.
    "RabbitflowError",
    # Wiring: the app, its import string, its URLs, its topology file.
    "ConfigurationError",
    "ImportStringError",
    "InvalidUrlError",
    "OutputError",
    "Problem",
    "TopologyError",
    "TopologySyntaxError",
    "UserImportError",
    "WorkflowError",
    # The broker: connecting, permissions, topology on the broker.
    "AccessRefusedError",
    "BrokerError",
    "QueueNotFoundError",
    "TlsVerificationError",
    "TopologyConflictError",
    "TopologyMismatchError",
    "UnreachableBrokerError",
    # Publishing and requests.
    "BatchFailure",
    "BatchPublishError",
    "PublishAccessRefusedError",
    "PublishConnectionError",
    "FrameTooLarge",
    "PublishError",
    "PublishTlsError",
    "PublishUnreachableError",
    "RemoteError",
    "RequestTimeout",
    "UnroutableError",
    # Jobs (contract section 12): what job.result() raises, and a result too big to keep.
    "JobCancelled",
    "JobError",
    "JobFailed",
    "JobResultError",
    "JobTimeout",
    # One message's failure (recorded in its DLQ headers).
    "CrashLimitReached",
    "DecodeError",
    "DeferralOutOfRange",
    "HandlerTimeout",
    # rabbitflow's own stores (idempotency): an outage pauses consuming, spends no attempt.
    "StoreUnavailableError",
    # Tests (rabbitflow.testing).
    "DrainError",
]
