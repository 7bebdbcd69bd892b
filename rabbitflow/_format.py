"""Text shared by the CLI and the console: ages, dead letters' errors, replay reports.

Plain functions of rabbitflow's data, without click or Starlette, so that both front ends
import them and neither imports the other.
"""

from __future__ import annotations

from collections.abc import Iterator

from rabbitflow import _headers as h
from rabbitflow import dlq as ops


def format_age(seconds: float) -> str:
    """``42s``, ``5m12s``, ``3h05m``, ``2d04h``: two units at most."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def render_replay(report: ops.ReplayReport, error_type: str | None) -> Iterator[str]:
    """The text ``rabbitflow dlq replay`` prints."""
    moved = f"{count_messages(report.moved)} from {report.dlq} to {report.queue}"
    why = f" {report.skipped} (error type is not {error_type})"
    if not report.dry_run:
        left = report.count - report.moved
        kept = f"; {len(report.kept)} could not be sent back" if report.kept else ""
        yield (
            f"moved {moved}"
            + (f", skipped{why}" if error_type else "")
            + kept
            + (f"; {left} left in {report.dlq}" if left > 0 else "")
        )
        for held in report.kept:
            yield f"  kept {held.message_id or '(no message_id)'}: {held.reason}"
        return
    yield f"dry run, nothing changed: would move {moved}" + (f", skip{why}" if error_type else "")
    for message in report.messages:
        shown = message.message_id or "(no message_id)"
        yield f"  #{message.position}  {shown}  {error_text(message)}"
    if report.moved > len(report.messages):
        yield f"  ... and {report.moved - len(report.messages)} more"


def error_text(message: ops.DeadLetter) -> str:
    """The error a dead letter carries, escaped and cut to a preview, or why there is none."""
    if message.error_type is None:
        reason = message.dead_letter_reason
        if reason is not None:
            return f"(no {h.ERROR_TYPE}) dead-lettered by the broker: {reason}"
        return f"(no {h.ERROR_TYPE} header)"
    text = ops.escape(message.error_message or "")
    if len(text) > ops.ERROR_PREVIEW_CHARS:
        text = text[: ops.ERROR_PREVIEW_CHARS] + "..."
    return f"{message.error_type}: {text}" if text else message.error_type


def count_messages(count: int) -> str:
    """``1 message``, ``2 messages``."""
    return f"{count} message{'s' if count != 1 else ''}"
