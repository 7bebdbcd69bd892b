"""The console's outbox page (``/outbox``): pending rows and the lag, parked rows with their
errors. Read-only: ``rabbitflow outbox retry|purge`` act on the rows."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from rabbitflow.console._state import Console
from rabbitflow.errors import StoreUnavailableError
from rabbitflow.outbox import PARKED, PENDING
from rabbitflow.outbox import _store as store

SHOWN = 100  # rows of each state on the page


async def outbox_page(console: Console, request: Request) -> Response:
    outbox = console.settings.outbox
    if outbox is None:
        raise HTTPException(404, "no outbox: start the console with --outbox-dsn URL")
    try:
        stats = await store.stats(outbox)
        parked = await store.list_rows(outbox, (PARKED,), SHOWN)
        pending = await store.list_rows(outbox, (PENDING,), SHOWN)
    except outbox.db_errors as exc:
        raise StoreUnavailableError(outbox, "the outbox page", exc) from None
    context = {
        "table": outbox.statements.table,
        "stats": stats,
        "lagging": stats.oldest_age > outbox.lag_warning,
        "lag_warning": outbox.lag_warning,
        "parked": parked,
        "pending": pending,
        "shown": SHOWN,
    }
    return console.templates.TemplateResponse(request, "outbox.html", context)
