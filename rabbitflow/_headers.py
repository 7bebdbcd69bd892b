"""Names of the message headers rabbitflow writes (contract section 3).

They carry no ``x-`` prefix: RabbitMQ reserves that for its own headers (``x-death``,
``x-delivery-count``...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ATTEMPT = "rabbitflow-attempt"
ORIGIN_QUEUE = "rabbitflow-origin-queue"
ORIGIN_EXCHANGE = "rabbitflow-origin-exchange"
ORIGIN_ROUTING_KEY = "rabbitflow-origin-routing-key"
FIRST_FAILED_AT = "rabbitflow-first-failed-at"
ERROR_TYPE = "rabbitflow-error-type"
ERROR_MESSAGE = "rabbitflow-error-message"
ERROR_STACK = "rabbitflow-error-stack"
REPLAY_COUNT = "rabbitflow-replay-count"
NOT_BEFORE = "rabbitflow-not-before"
DEAD_LETTER_REASON = "rabbitflow-dead-letter-reason"
DUE_AT = "rabbitflow-due-at"
# When the caller of a request stops waiting for its reply (ISO-8601 UTC): past it, a worker
# settles the request without running it.
DEADLINE = "rabbitflow-deadline"

ERROR_MESSAGE_LIMIT = 1024
ERROR_STACK_LIMIT = 8 * 1024

# Headers that describe one failure; a new failure replaces them instead of accumulating.
FAILURE_HEADERS = frozenset(
    {ERROR_TYPE, ERROR_MESSAGE, ERROR_STACK, NOT_BEFORE, DEAD_LETTER_REASON, DUE_AT}
)
# Set by the broker on dead-lettering and redelivery; never copied onto a republished message,
# so that x-death cannot grow without bound across retries.
BROKER_HEADERS_PREFIX = "x-"


def carried_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """User and trace headers kept on a copy; broker ``x-*`` and old failure headers dropped."""
    if not headers:
        return {}
    return {
        key: value
        for key, value in headers.items()
        if not key.startswith(BROKER_HEADERS_PREFIX) and key not in FAILURE_HEADERS
    }
