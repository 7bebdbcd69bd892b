"""Opening AMQP connections to one node of a list, with broker errors turned into rabbitflow
errors."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection

from rabbitflow._border import reason
from rabbitflow._urls import mask_url, node_name
from rabbitflow.errors import (
    AccessRefusedError,
    TlsVerificationError,
    UnreachableBrokerError,
    exception_chain,
)

CONNECT_TIMEOUT = 10.0


async def connect(
    url: str | Sequence[str],
    *,
    name: str = "rabbitflow",
    heartbeat: int | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> AbstractConnection:
    """Open a plain (not auto-reconnecting) connection; rabbitflow drives reconnection itself.

    ``url`` is one node or several nodes of one cluster, tried in order: an unreachable node
    passes to the next one at once; a refused login or a certificate failure is the cluster's
    answer (every node shares users and certificates) and is raised without trying further.
    :func:`connected_url` tells which node answered.

    ``amqps://`` URLs verify the broker's certificate and host name; ``cafile``, ``certfile``
    and ``keyfile`` query parameters name a private CA and a client certificate. Turning
    verification off (``no_verify_ssl``) is refused."""
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise UnreachableBrokerError("<no URL>", "no broker URL given")
    for each in urls:
        _refuse_unverified_tls(each)
    failures: list[UnreachableBrokerError] = []
    for each in urls:
        try:
            return await _connect_node(each, name=name, heartbeat=heartbeat, timeout=timeout)
        except UnreachableBrokerError as exc:
            failures.append(exc)
    if len(failures) == 1:
        raise failures[0]
    reasons = (f"{node_name(u)}: {f.reason}" for u, f in zip(urls, failures, strict=True))
    raise UnreachableBrokerError(f"any of {len(urls)} nodes", "; ".join(reasons))


def connected_url(connection: AbstractConnection) -> str:
    """The URL of the node ``connection`` reached (with its password: mask it to print)."""
    return str(getattr(connection, "url", ""))


async def _connect_node(
    url: str, *, name: str, heartbeat: int | None, timeout: float
) -> AbstractConnection:
    extra: dict[str, Any] = {} if heartbeat is None else {"heartbeat": heartbeat}
    try:
        connection: AbstractConnection = await aio_pika.connect(
            url, timeout=timeout, client_properties={"connection_name": name}, **extra
        )
        return connection
    except aiormq.exceptions.InvalidFrameError as exc:
        if "Connection.Close" not in str(exc):
            raise UnreachableBrokerError(mask_url(url), reason(exc)) from None
        # RabbitMQ answers connection.open with connection.close (530 NOT_ALLOWED) for a
        # vhost that does not exist or that the user may not access.
        raise AccessRefusedError(
            f"the broker at {mask_url(url)} refused vhost {_vhost(url)!r}: it does not exist "
            "or the user has no permission on it"
        ) from None
    except aiormq.exceptions.ProbableAuthenticationError as exc:
        raise AccessRefusedError(
            f"the broker at {mask_url(url)} refused the login or the vhost: {reason(exc)}"
        ) from None
    except (TimeoutError, OSError, socket.gaierror, aiormq.exceptions.AMQPError) as exc:
        if _certificate_failure(exc):
            # aiormq wraps the ssl error in AMQPConnectionError; a certificate that cannot be
            # verified will not heal by retrying, unlike an unreachable broker.
            raise TlsVerificationError(
                f"TLS verification of the broker at {mask_url(url)} failed: {reason(exc)}; "
                "trust a private CA with ?cafile=PATH in the URL",
                url=mask_url(url),
                reason=reason(exc),
            ) from None
        raise UnreachableBrokerError(mask_url(url), reason(exc)) from None


def _certificate_failure(exc: BaseException) -> bool:
    if any(isinstance(link, ssl.SSLCertVerificationError) for link in exception_chain(exc)):
        return True
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


def _refuse_unverified_tls(url: str) -> None:
    query = parse_qs(urlsplit(url).query)
    if any(value not in ("0", "false", "") for value in query.get("no_verify_ssl", [])):
        raise TlsVerificationError(
            "no_verify_ssl in the broker URL turns off TLS certificate verification, which "
            "rabbitflow refuses; trust a private CA with ?cafile=PATH instead",
            url=mask_url(url),
            reason="no_verify_ssl",
        )


def _vhost(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def underlay(connection: AbstractConnection) -> aiormq.abc.AbstractConnection:
    """The aiormq connection under an open aio-pika connection (the worker's fast path)."""
    transport = connection.transport
    if transport is None:
        raise UnreachableBrokerError("<closed>", "the connection is closed")
    amqp: aiormq.abc.AbstractConnection = transport.connection
    return amqp
