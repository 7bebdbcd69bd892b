"""What a vhost holds, read from RabbitMQ's management HTTP API.

AMQP can tell whether an object exists and whether a redeclaration would be equivalent, but
not list a vhost's objects, show its bindings or the policies applied to a queue: only the
management plugin's HTTP API does. ``topology plan`` uses it when it answers, with the AMQP
URL's credentials, and says what it cannot see when it does not.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from rabbitflow._urls import mask_url
from rabbitflow.errors import ManagementUnavailable

DEFAULT_PORT = 15672
# Where the management API is when it is not port 15672 of the broker's host (a proxy, an
# ingress, another port): `rabbitflow run`, `topology plan` and `console` read it.
MANAGEMENT_URL_ENV = "RABBITFLOW_MANAGEMENT_URL"
DEFAULT_TLS_PORT = 15671


@dataclass(frozen=True, slots=True)
class BrokerState:
    """The exchanges, queues and bindings of one vhost, as the management API lists them."""

    exchanges: dict[str, dict[str, Any]] = field(default_factory=dict)
    queues: dict[str, dict[str, Any]] = field(default_factory=dict)
    bindings: list[dict[str, Any]] = field(default_factory=list)
    policies: list[dict[str, Any]] = field(default_factory=list)
    # None when the user may not list operator policies (that needs the administrator tag).
    operator_policies: list[dict[str, Any]] | None = field(default_factory=list)


def management_url(amqp_url: str) -> str:
    """``amqp://u:p@host:5672/vh`` → ``http://u:p@host:15672/`` (``amqps`` → https, 15671)."""
    parts = urlsplit(amqp_url)
    tls = parts.scheme == "amqps"
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    userinfo = ""
    if parts.username is not None:
        userinfo = parts.username + (f":{parts.password}" if parts.password is not None else "")
        userinfo += "@"
    port = DEFAULT_TLS_PORT if tls else DEFAULT_PORT
    return urlunsplit(("https" if tls else "http", f"{userinfo}{host}:{port}", "/", "", ""))


def configured_url() -> str | None:
    """The management API named by ``RABBITFLOW_MANAGEMENT_URL``; None when unset or empty."""
    return os.environ.get(MANAGEMENT_URL_ENV) or None


def with_credentials(api_url: str | None, amqp_url: str) -> str:
    """``api_url`` (default: :func:`management_url`), with the AMQP URL's user if it has none."""
    if api_url is None:
        return management_url(amqp_url)
    parts = urlsplit(api_url)
    if parts.username is not None:
        return api_url
    default = urlsplit(management_url(amqp_url))
    userinfo = default.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{parts.netloc}" if userinfo else parts.netloc
    return urlunsplit(parts._replace(netloc=netloc))


def vhost_of(amqp_url: str) -> str:
    """The vhost an AMQP URL names (``/`` when its path is empty)."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


async def read_state(api_url: str, vhost: str, *, timeout: float = 10.0) -> BrokerState:
    """Every exchange, queue and binding of ``vhost``; raises :class:`ManagementUnavailable`."""
    return await asyncio.to_thread(_read_state, api_url, vhost, timeout)


def _read_state(api_url: str, vhost: str, timeout: float) -> BrokerState:
    client = _Client(api_url, timeout)
    where = quote(vhost, safe="")
    # Policies are read from their own endpoints, not from each queue's "policy" field:
    # those fields come from the statistics database, which lags by up to 5 seconds.
    exchanges = client.get(f"exchanges/{where}")
    queues = client.get(f"queues/{where}")
    bindings = client.get(f"bindings/{where}")
    policies = client.get(f"policies/{where}")
    try:
        operator_policies: list[dict[str, Any]] | None = client.get(f"operator-policies/{where}")
    except ManagementUnavailable:
        operator_policies = None
    return BrokerState(
        {entry["name"]: entry for entry in exchanges},
        {entry["name"]: entry for entry in queues},
        list(bindings),
        list(policies),
        operator_policies,
    )


async def queue_depths(
    api_url: str, vhost: str, *, timeout: float = 5.0
) -> dict[str, dict[str, int]]:
    """``name -> {messages, messages_ready, messages_dlx}`` for every queue of ``vhost``.

    ``messages_dlx`` counts what a quorum queue has expired or rejected but not yet
    dead-lettered (at-least-once dead-lettering waiting for its target): messages that no
    AMQP method shows. The figures lag the broker by up to the statistics interval (5 s)."""
    path = f"queues/{quote(vhost, safe='')}?columns=name,messages,messages_ready,messages_dlx"
    rows = await asyncio.to_thread(_Client(api_url, timeout).get, path)
    return {
        str(row["name"]): {
            key: int(row.get(key) or 0) for key in ("messages", "messages_ready", "messages_dlx")
        }
        for row in rows
    }


async def put_policy(api_url: str, vhost: str, name: str, body: dict[str, Any]) -> None:
    """Create or replace the policy ``name`` of ``vhost``."""
    path = f"policies/{quote(vhost, safe='')}/{quote(name, safe='')}"
    await asyncio.to_thread(_Client(api_url, 10.0).send, "PUT", path, body)


async def delete_policy(api_url: str, vhost: str, name: str) -> None:
    """Delete the policy ``name`` of ``vhost`` (nothing when it is not there)."""
    path = f"policies/{quote(vhost, safe='')}/{quote(name, safe='')}"
    await asyncio.to_thread(_Client(api_url, 10.0).send, "DELETE", path, None)


async def queue_entry(api_url: str, vhost: str, queue: str) -> dict[str, Any] | None:
    """One queue as the management API lists it (leader node, bindings excluded); None when
    it does not exist."""
    path = f"queues/{quote(vhost, safe='')}/{quote(queue, safe='')}"
    try:
        return await asyncio.to_thread(_Client(api_url, 10.0).get_one, path)
    except ManagementUnavailable as exc:
        if "404" in exc.reason:
            return None
        raise


async def queue_bindings(api_url: str, vhost: str, queue: str) -> list[dict[str, Any]]:
    """The bindings of ``queue`` (the default exchange's left out)."""
    path = f"queues/{quote(vhost, safe='')}/{quote(queue, safe='')}/bindings"
    rows = await asyncio.to_thread(_Client(api_url, 10.0).get, path)
    return [row for row in rows if row.get("source")]


class _Client:
    __slots__ = ("_authorization", "_base", "_timeout", "url")

    def __init__(self, api_url: str, timeout: float) -> None:
        parts = urlsplit(api_url)
        self.url = api_url
        host = parts.hostname or "localhost"
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{parts.port}" if parts.port else ""
        path = parts.path.rstrip("/")
        self._base = urlunsplit((parts.scheme, netloc, f"{path}/api/", "", ""))
        credentials = f"{unquote(parts.username or 'guest')}:{unquote(parts.password or '')}"
        self._authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
        self._timeout = timeout

    def send(self, method: str, path: str, body: dict[str, Any] | None) -> None:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": self._authorization, "content-type": "application/json"}
        request = urllib.request.Request(self._base + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout):
                pass
        except urllib.error.HTTPError as exc:
            if method == "DELETE" and exc.code == 404:
                return
            detail = exc.read().decode(errors="replace")[:300]
            raise ManagementUnavailable(
                mask_url(self.url), f"{_refusal(exc.code)} to {method} /api/{path}: {detail}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            text = getattr(reason, "strerror", None) or str(reason)
            raise ManagementUnavailable(mask_url(self.url), f"is not reachable ({text})") from None

    def get_one(self, path: str) -> dict[str, Any]:
        document: Any = self._get(path)
        if not isinstance(document, dict):
            raise ManagementUnavailable(mask_url(self.url), f"unexpected answer to /api/{path}")
        return document

    def get(self, path: str) -> list[dict[str, Any]]:
        document = self._get(path)
        if not isinstance(document, list):
            raise ManagementUnavailable(mask_url(self.url), f"unexpected answer to /api/{path}")
        return document

    def _get(self, path: str) -> object:
        request = urllib.request.Request(
            self._base + path, headers={"Authorization": self._authorization}
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                document = json.load(response)
        except urllib.error.HTTPError as exc:
            raise ManagementUnavailable(mask_url(self.url), _refusal(exc.code)) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            text = getattr(reason, "strerror", None) or str(reason)
            raise ManagementUnavailable(mask_url(self.url), f"is not reachable ({text})") from None
        return document


def _refusal(status: int) -> str:
    if status == 401:
        return "refused the credentials (HTTP 401; the user needs the 'management' tag)"
    if status == 403:
        return "refused access to the vhost (HTTP 403)"
    if status == 404:
        return "does not know the vhost (HTTP 404)"
    return f"answered HTTP {status}"
