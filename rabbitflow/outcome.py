"""What happens to a delivery whose handler failed: retry later, or dead-letter.

The table is built once per consumer; a failure walks its exception's MRO so that a subclass
follows its parent unless it has an entry of its own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from rabbitflow.errors import DecodeError, HandlerTimeout, Reject, Retry
from rabbitflow.handler import ExceptionTypes
from rabbitflow.topology.model import RetryPolicy


class Action(enum.Enum):
    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    REQUEUE = "requeued"  # the copy could not be published: returned to the queue instead


@dataclass(frozen=True, slots=True)
class Outcome:
    """The decision for one failed delivery."""

    action: Action
    reason: str
    delay_ms: int = 0


class OutcomePolicy:
    """Maps exceptions to actions for one consumer and applies its retry policy."""

    __slots__ = ("_dead_letter_on", "_table", "retry")

    def __init__(
        self, retry: RetryPolicy, retry_on: ExceptionTypes = (), dead_letter_on: ExceptionTypes = ()
    ) -> None:
        self.retry = retry
        self._dead_letter_on = dead_letter_on
        table: dict[type[BaseException], Action] = {
            BaseException: Action.RETRY if not retry_on else Action.DEAD_LETTER,
            HandlerTimeout: Action.RETRY,
        }
        table.update(dict.fromkeys(retry_on, Action.RETRY))
        table.update(dict.fromkeys(dead_letter_on, Action.DEAD_LETTER))
        # Explicit requests from the handler and undecodable payloads are never overridden.
        table.update(
            {Retry: Action.RETRY, Reject: Action.DEAD_LETTER, DecodeError: Action.DEAD_LETTER}
        )
        self._table = table

    def action_for(self, exc: BaseException) -> Action:
        for cls in type(exc).__mro__:
            action = self._table.get(cls)
            if action is not None:
                return action
        return Action.RETRY  # unreachable: BaseException is in every MRO

    def _dead_letter_reason(self, exc: BaseException) -> str:
        if isinstance(exc, Reject):
            return "rejected by the handler"
        if isinstance(exc, DecodeError):
            return "undecodable payload"
        if any(isinstance(exc, cls) for cls in self._dead_letter_on):
            return "matches dead_letter_on"
        return "not in retry_on"

    def decide(self, exc: BaseException, attempt: int) -> Outcome:
        """Retry with the tier for the next attempt, or dead-letter when retries are spent."""
        action = self.action_for(exc)
        if action is Action.DEAD_LETTER:
            return Outcome(action, self._dead_letter_reason(exc))
        if not self.retry.enabled:
            return Outcome(Action.DEAD_LETTER, "retries disabled")
        if attempt >= self.retry.max_attempts:
            return Outcome(Action.DEAD_LETTER, f"max_attempts ({self.retry.max_attempts}) reached")
        delay = self.retry.delay_for(attempt + 1)
        if isinstance(exc, Retry) and exc.delay_ms is not None:
            delay = max(exc.delay_ms, 0)
        return Outcome(Action.RETRY, "retry", delay)
