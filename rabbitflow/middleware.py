"""Handler middleware: code that runs around every handler call, built into a chain once.

A middleware is any ``async`` callable ``(message, call_next) -> result``: it may look at the
:class:`~rabbitflow.Message`, set context (a tenant, a log field), time the call, refuse it
by raising, and must return what ``await call_next(message)`` returned (the handler's
result, which becomes the reply of a request)::

    async def tenant(message: Message, call_next: CallNext) -> Any:
        token = TENANT.set(message.headers.get("tenant", "-"))
        try:
            return await call_next(message)
        finally:
            TENANT.reset(token)

    app.add_middleware(tenant)

The chain is built once per consumer when consuming starts (Starlette's
``build_middleware_stack`` is the model): no list is walked and nothing is allocated per
message, and an app without middleware calls its handlers directly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from rabbitflow.message import Message
from rabbitflow.types import CallNext


class Middleware(Protocol):
    """``async def __call__(message, call_next)``: run ``call_next(message)`` and return its
    result; an exception raised here is the handler's failure (retried, dead-lettered)."""

    def __call__(self, message: Message, call_next: CallNext, /) -> Awaitable[Any]: ...


class _Link:
    """One middleware with the rest of the chain bound to it."""

    __slots__ = ("_middleware", "_next")

    def __init__(self, middleware: Middleware, call_next: CallNext) -> None:
        self._middleware = middleware
        self._next = call_next

    def __call__(self, message: Message) -> Awaitable[Any]:
        return self._middleware(message, self._next)


def build_stack(middleware: Sequence[Middleware], endpoint: CallNext) -> CallNext:
    """The chain ``middleware[0] → middleware[1] → … → endpoint``; ``endpoint`` itself when
    there is no middleware. The first registered middleware is the outermost."""
    call = endpoint
    for layer in reversed(middleware):
        call = _Link(layer, call)
    return call


def name_of(middleware: object) -> str:
    """A readable name for logs and errors."""
    target: Any = middleware if hasattr(middleware, "__qualname__") else type(middleware)
    return f"{target.__module__}.{target.__qualname__}"


__all__ = ["CallNext", "Middleware", "build_stack", "name_of"]
