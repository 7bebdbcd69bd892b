"""Which broker nodes to use, checked before use, and how to print a URL without its password.

A cluster is given as several URLs (``--url`` repeated, ``RABBITFLOW_URL`` with commas,
``[broker].urls``, ``App(url=[...])``); every one is validated up front, and the list is
shuffled per process unless the order is kept (``--url-order given``).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

from rabbitflow.errors import InvalidUrlError
from rabbitflow.types import UrlOrder, UrlSource

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
URL_ENV = "RABBITFLOW_URL"
SCHEMES = ("amqp", "amqps")
_USERINFO = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def split_urls(value: UrlSource) -> list[str]:
    """One string (commas separate nodes), or a list of them, as a flat list of URLs."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def resolve_urls(
    option: UrlSource, file_urls: UrlSource = None, *, order: UrlOrder = "given"
) -> list[str]:
    """``--url``, else ``RABBITFLOW_URL``, else the file's ``[broker]``, else the default.

    Every URL of the winning source is validated (:class:`InvalidUrlError`); ``order="shuffle"``
    spreads the processes of a service over the nodes."""
    urls = (
        split_urls(option)
        or split_urls(os.environ.get(URL_ENV))
        or split_urls(file_urls)
        or [DEFAULT_URL]
    )
    for url in urls:
        validate_url(url)
    if order == "shuffle" and len(urls) > 1:
        urls = random.sample(urls, len(urls))
    return urls


def resolve_url(option: str | None, file_url: str | None = None) -> str:
    """The first node :func:`resolve_urls` would try, in the given order."""
    return resolve_urls(option, file_url)[0]


def validate_url(url: str) -> None:
    """Scheme ``amqp``/``amqps``, a host, a numeric port, at most one vhost path segment."""
    if any(char.isspace() for char in url):
        raise _invalid(url, "contains whitespace; separate several nodes with commas")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _invalid(url, f"cannot be parsed ({exc})") from None
    if parts.scheme not in SCHEMES:
        raise _invalid(url, f"scheme must be amqp or amqps, not {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise _invalid(url, "names no host")
    if port == 0:
        raise _invalid(url, "port 0 is not a broker port")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if "/" in path:
        raise _invalid(
            url, f"vhost {unquote(path)!r} contains '/'; write it as %2F (e.g. /%2F for '/')"
        )


def _invalid(url: str, reason: str) -> InvalidUrlError:
    return InvalidUrlError(mask_url(url), reason)


def mask_url(url: str) -> str:
    """``amqp://user:secret@host/`` → ``amqp://user:***@host/``.

    Text that is not one URL (two pasted together, a bad port) has every ``user:password@``
    in it masked."""
    if any(char.isspace() for char in url):
        return _USERINFO.sub(r"\1***@", url)
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username}:***@{host}"
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return _USERINFO.sub(r"\1***@", url)


def mask_urls(urls: Sequence[str]) -> str:
    """Several URLs, masked, comma-separated."""
    return ", ".join(mask_url(url) for url in urls)


def node_name(url: str) -> str:
    """``host:port`` of a URL, for logs (no user, no password)."""
    parts = urlsplit(url)
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    host = parts.hostname or "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
