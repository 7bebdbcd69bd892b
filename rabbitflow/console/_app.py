"""The console's ASGI application: one Starlette app, server-rendered pages, a little fetch."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from rabbitflow._format import format_age
from rabbitflow._urls import mask_url
from rabbitflow.console import _routes as routes
from rabbitflow.console._groups import show, utc
from rabbitflow.console._guard import Guard, GuardMiddleware
from rabbitflow.console._management import Management
from rabbitflow.console._state import Console, ConsoleSettings, Link
from rabbitflow.topology import derive
from rabbitflow.topology._export import mermaid

HERE = Path(__file__).parent


def create_app(settings: ConsoleSettings) -> Starlette:
    """The console for ``settings``; serve it with any ASGI server."""
    guard = Guard(settings.token, settings.host)
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals.update(
        utc=utc,
        show=show,
        format_age=format_age,
        csrf=guard.csrf,
        read_only=settings.read_only,
        broker=mask_url(settings.url),
        source=settings.topology.source,
        outbox=settings.outbox is not None,
        jobs=settings.jobs is not None,
    )
    management = None
    if settings.management_url:
        management = Management(settings.management_url, settings.url)
    console = Console(
        settings,
        Link(settings.url),
        guard,
        templates,
        management,
        mermaid(derive(settings.topology)),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await console.link.close()
        if settings.jobs is not None:
            await settings.jobs.close()

    app = Starlette(
        routes=[
            *routes.build(console),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        middleware=[Middleware(GuardMiddleware, guard=guard)],
        exception_handlers=routes.exception_handlers(console),
        lifespan=lifespan,
    )
    app.state.console = console
    return app


__all__ = ["ConsoleSettings", "create_app"]
