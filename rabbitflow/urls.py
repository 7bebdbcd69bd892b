"""Which broker URL to use, and how to print one without its password."""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
URL_ENV = "RABBITFLOW_URL"


def resolve_url(option: str | None, file_url: str | None = None) -> str:
    """``--url``, else ``RABBITFLOW_URL``, else the file's ``[broker].url``, else the default."""
    return option or os.environ.get(URL_ENV) or file_url or DEFAULT_URL


def mask_url(url: str) -> str:
    """``amqp://user:secret@host/`` → ``amqp://user:***@host/``; anything unparsable is hidden."""
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
        return "<unparsable URL>"
