"""The type aliases of rabbitflow's public API, in one place (like ``starlette.types``).

Import them to annotate your own code::

    from rabbitflow.types import CallNext, Hook

    async def timing(message: Message, call_next: CallNext) -> object: ...

Importing this module is cheap: it loads neither aio-pika nor pydantic.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from rabbitflow.message import Message

#: The application type a lifespan receives (``rabbitflow.App``). A type variable, as in
#: ``starlette.types``: this module names no module of rabbitflow's that imports it.
_AppT = TypeVar("_AppT")

# -- handlers and middleware ----------------------------------------------------------------

#: A handler registered with ``@app.consumer``: sync or async, any signature rabbitflow reads.
HandlerFunc = Callable[..., Any]
#: Exception classes, as ``retry_on=`` and ``dead_letter_on=`` take them.
ExceptionTypes = tuple[type[BaseException], ...]
#: The rest of the middleware stack, as a handler middleware receives it.
CallNext = Callable[["Message"], Awaitable[Any]]
#: A body decoder: ``(queue, body, content type)`` to the value the handler's first
#: parameter wants.
Decoder = Callable[[str, bytes, str | None], Any]

# -- the application ------------------------------------------------------------------------

#: An ``@app.on_startup`` / ``@app.on_shutdown`` hook, sync or async.
Hook = Callable[[], Awaitable[None] | None]
#: ``App(lifespan=...)``: an async context manager factory around the worker's life;
#: ``Lifespan[App]``.
Lifespan = Callable[[_AppT], AbstractAsyncContextManager[Any]]
#: One broker URL, several (a list, or one string with commas), or None for the default.
UrlSource = str | Sequence[str] | None
#: ``--url-order``: ``shuffle`` spreads processes over the nodes, ``given`` keeps the order.
UrlOrder = Literal["shuffle", "given"]
#: ``--log-format``.
LogFormat = Literal["json", "console", "auto"]

# -- topology -------------------------------------------------------------------------------

#: ``queue_type`` in topology.toml.
QueueType = Literal["quorum", "classic", "stream"]
#: ``type`` of an exchange in topology.toml.
ExchangeType = Literal["direct", "topic", "fanout", "headers"]

__all__ = [
    "CallNext",
    "Decoder",
    "ExceptionTypes",
    "ExchangeType",
    "HandlerFunc",
    "Hook",
    "Lifespan",
    "LogFormat",
    "QueueType",
    "UrlOrder",
    "UrlSource",
]
