"""Administration of a test broker: virtual hosts, users and permissions.

Through the management HTTP API when the broker has it (one HTTP request, a few milliseconds),
else through ``rabbitmqctl``, which starts an Erlang VM for every call (0.7-3 s).
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

CTL_ENV = "RABBITFLOW_TEST_CTL"
MANAGEMENT_ENV = "RABBITFLOW_TEST_MANAGEMENT_URL"

Ctl = Callable[[list[str]], str]


class ManagementAPI:
    """The management HTTP API of one broker, authenticated as one user."""

    def __init__(self, base_url: str, user: str, password: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """``method path`` (under ``/api``); the decoded JSON answer, or None when empty."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base_url}/api/{path}", data=data, headers=self._headers, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            raise RuntimeError(f"management API {method} /api/{path}: {exc.code} {detail}") from exc
        return json.loads(payload) if payload.strip() else None

    def answers(self) -> bool:
        """Does the API answer (and accept the credentials)?"""
        try:
            return bool(self.request("GET", "whoami", timeout=1.0))
        except (OSError, RuntimeError, ValueError):
            return False


def management_for(amqp_url: str, environ: Mapping[str, str] | None = None) -> ManagementAPI | None:
    """The management API of the broker ``amqp_url`` names, when it answers.

    ``RABBITFLOW_TEST_MANAGEMENT_URL`` names it (``http://host:15672/``; empty: do not use
    it); else the management plugin's convention is assumed: the AMQP port plus 10000 on the
    same host (5672 -> 15672), with the AMQP URL's user and password.
    """
    env = os.environ if environ is None else environ
    parts = urlsplit(amqp_url)
    user = unquote(parts.username or "guest")
    password = unquote(parts.password or "guest")
    explicit = env.get(MANAGEMENT_ENV)
    if explicit is not None:
        if not explicit.strip():
            return None
        given = urlsplit(explicit)
        if given.username:
            user, password = unquote(given.username), unquote(given.password or "")
        base = f"{given.scheme}://{given.hostname}:{given.port or 15672}{given.path}"
    else:
        base = f"http://{parts.hostname or '127.0.0.1'}:{(parts.port or 5672) + 10000}"
    api = ManagementAPI(base, user, password)
    return api if api.answers() else None


def local_ctl(environ: Mapping[str, str] | None = None) -> Ctl | None:
    """``RABBITFLOW_TEST_CTL`` (the ``rabbitmqctl`` command of the broker
    ``RABBITFLOW_TEST_URL`` names, e.g. a node in a chroot), else ``rabbitmqctl`` on PATH."""
    command = (os.environ if environ is None else environ).get(CTL_ENV)
    path = shutil.which("rabbitmqctl")
    prefix = shlex.split(command) if command else [path] if path else None
    if prefix is None:
        return None
    return ctl_command(prefix)


def ctl_command(prefix: list[str]) -> Ctl:
    """A :data:`Ctl` that runs ``prefix + args`` and fails on a non-zero exit."""

    def ctl(args: list[str]) -> str:
        result = subprocess.run(
            [*prefix, *args], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    return ctl


@dataclass(frozen=True)
class Admin:
    """Vhosts, users and permissions of a test broker: the API when there, else rabbitmqctl."""

    api: ManagementAPI | None
    ctl: Ctl | None

    @property
    def available(self) -> bool:
        return self.api is not None or self.ctl is not None

    def add_vhost(self, name: str) -> None:
        # Both wait until the vhost's processes run: the next connection to it is accepted.
        if self.api is not None:
            self.api.request("PUT", f"vhosts/{_seg(name)}", {})
        else:
            self._ctl(["add_vhost", name])

    def delete_vhost(self, name: str) -> None:
        """Delete ``name`` with its queues; closes the connections still open on it."""
        if self.api is not None:
            self.api.request("DELETE", f"vhosts/{_seg(name)}")
        else:
            self._ctl(["delete_vhost", name])

    def set_permissions(
        self, vhost: str, user: str, configure: str = ".*", write: str = ".*", read: str = ".*"
    ) -> None:
        if self.api is not None:
            grants = {"configure": configure, "write": write, "read": read}
            self.api.request("PUT", f"permissions/{_seg(vhost)}/{_seg(user)}", grants)
        else:
            self._ctl(["set_permissions", "-p", vhost, user, configure, write, read])

    def add_user(self, name: str, password: str) -> None:
        """A user without tags (no management access) and without permissions."""
        if self.api is not None:
            self.api.request("PUT", f"users/{_seg(name)}", {"password": password, "tags": ""})
        else:
            self._ctl(["add_user", name, password])

    def delete_user(self, name: str) -> None:
        if self.api is not None:
            self.api.request("DELETE", f"users/{_seg(name)}")
        else:
            self._ctl(["delete_user", name])

    def delete_queue(self, vhost: str, name: str) -> None:
        """Delete a queue whatever its consumers and messages (as an operator would)."""
        if self.api is not None:
            self.api.request("DELETE", f"queues/{_seg(vhost)}/{_seg(name)}")
        else:
            self._ctl(["delete_queue", "-p", vhost, name])

    def _ctl(self, args: list[str]) -> str:
        if self.ctl is None:
            raise RuntimeError(
                f"cannot run rabbitmqctl {args[0]}: neither the management API nor rabbitmqctl "
                f"is available (set {MANAGEMENT_ENV} or {CTL_ENV})"
            )
        return self.ctl(args)


def _seg(value: str) -> str:
    return quote(value, safe="")
