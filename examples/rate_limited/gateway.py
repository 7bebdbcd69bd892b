"""A stand-in for a rate-limited SMS provider, served through ``httpx.MockTransport``.

It accepts ``limit`` requests per fixed window of ``window`` seconds and answers any more with
``429 Too Many Requests`` and a ``Retry-After`` header (whole seconds until the window ends),
as most HTTP APIs do. It reads the time from :func:`rabbitflow._clock.now`, the clock
``rabbitflow.testing.TestApp`` replaces with its virtual one, so a test waits for the window
in virtual time. Point the client at the real provider instead of this stub in production.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import httpx

from rabbitflow import _clock as clock


@dataclass
class Request:
    """One request the stub answered: when, what, and the status it got."""

    at: float
    to: str
    status: int
    retry_after: str | None = None


@dataclass
class SmsGateway:
    """``POST /messages`` with ``{"to": ..., "text": ...}``; ``limit`` per ``window`` seconds."""

    limit: int = 2
    window: float = 10.0
    requests: list[Request] = field(default_factory=list)
    _window_start: float | None = None
    _used: int = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        now = clock.now()
        if self._window_start is None or now >= self._window_start + self.window:
            self._window_start, self._used = now, 0
        to = json.loads(request.content)["to"]
        if self._used >= self.limit:
            wait = math.ceil(self._window_start + self.window - now)
            self.requests.append(Request(now, to, 429, str(wait)))
            return httpx.Response(429, headers={"Retry-After": str(wait)})
        self._used += 1
        self.requests.append(Request(now, to, 202))
        return httpx.Response(202, json={"status": "queued"})

    @property
    def delivered(self) -> list[str]:
        """Recipients whose message the provider accepted, in order."""
        return [r.to for r in self.requests if r.status == 202]
