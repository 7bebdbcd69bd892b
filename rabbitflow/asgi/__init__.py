"""rabbitflow in a web app (FastAPI, Starlette, any ASGI framework with a lifespan).

::

    from fastapi import FastAPI
    from rabbitflow.asgi import jobs_router, lifespan

    consumers = lifespan(app, consume=True)      # consume=False (default): publish only
    api = FastAPI(lifespan=consumers)
    api.add_route("/readyz", consumers.readyz)   # 200 while consuming, else 503
    api.include_router(jobs_router(app), prefix="/jobs")   # GET /jobs/{id}: JobStatus

See docs/web.md.
"""

from rabbitflow.asgi._health import ConsumerHealth, ConsumerState
from rabbitflow.asgi._jobs import jobs_router
from rabbitflow.asgi._lifespan import AppLifespan, lifespan

__all__ = ["AppLifespan", "ConsumerHealth", "ConsumerState", "jobs_router", "lifespan"]
