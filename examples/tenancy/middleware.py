"""``TenantMiddleware``: the tenant of each message, from a header, for the whole handler call.

It puts the tenant in a context variable (code deep in the handler reads ``TENANT.get()``)
and binds it to structlog's context, so every log line of the handler carries ``tenant``.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import structlog

from rabbitflow import Message, Reject
from rabbitflow.middleware import CallNext

TENANT: ContextVar[str] = ContextVar("tenant")


class TenantMiddleware:
    """Reads the tenant from ``header``; a message without one is dead-lettered."""

    __slots__ = ("header",)

    def __init__(self, header: str = "tenant") -> None:
        self.header = header

    async def __call__(self, message: Message, call_next: CallNext) -> Any:
        tenant = message.headers.get(self.header)
        if not isinstance(tenant, str) or not tenant:
            # The message's fault, not a passing failure: no retry.
            raise Reject(f"no {self.header!r} header")
        token = TENANT.set(tenant)
        try:
            with structlog.contextvars.bound_contextvars(tenant=tenant):
                return await call_next(message)
        finally:
            TENANT.reset(token)
