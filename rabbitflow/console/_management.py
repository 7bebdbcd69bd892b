"""Unacked and held counts from the RabbitMQ management API, figures AMQP does not give.

Optional: without ``--management-url`` (or when the API does not answer) the overview shows
ready and consumer counts only, and says why the unacked column is empty. Held counts are the
messages a quorum queue has dead-lettered but its target has not taken (``messages_dlx``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx

from rabbitflow._urls import mask_url

TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Unacked:
    """Unacked messages per queue of one vhost, or why there are none to show."""

    counts: dict[str, int]
    problem: str | None = None
    # Messages held by the broker's dead-lettering, per queue (the same request).
    held: dict[str, int] = field(default_factory=dict)


class Management:
    """A client of ``GET /api/queues/<vhost>`` for one vhost."""

    __slots__ = ("_auth", "_base", "_shown", "_vhost")

    def __init__(self, url: str, amqp_url: str) -> None:
        parts = urlsplit(url)
        amqp = urlsplit(amqp_url)
        user = unquote(parts.username or amqp.username or "guest")
        password = unquote(parts.password or amqp.password or "guest")
        host = parts.hostname or "127.0.0.1"
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        self._base = urlunsplit((parts.scheme or "http", netloc, parts.path.rstrip("/"), "", ""))
        self._auth = (user, password)
        self._shown = mask_url(url)
        path = amqp.path
        self._vhost = unquote(path[1:]) if len(path) > 1 else "/"

    async def unacked(self) -> Unacked:
        """Unacked counts of every queue in the vhost of the AMQP URL."""
        url = f"{self._base}/api/queues/{quote(self._vhost, safe='')}"
        params = {"columns": "name,messages_unacknowledged,messages_dlx"}
        try:
            async with httpx.AsyncClient(auth=self._auth, timeout=TIMEOUT) as client:
                response = await client.get(url, params=params)
        except httpx.HTTPError as exc:
            return Unacked({}, f"management API at {self._shown}: {type(exc).__name__}")
        if response.status_code != 200:
            return Unacked({}, f"management API at {self._shown}: HTTP {response.status_code}")
        rows = response.json()
        return Unacked(
            {str(row["name"]): int(row.get("messages_unacknowledged") or 0) for row in rows},
            held={str(row["name"]): int(row.get("messages_dlx") or 0) for row in rows},
        )
