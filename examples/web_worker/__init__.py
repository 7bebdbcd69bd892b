"""A FastAPI service that is its own worker: ``lifespan(app, consume=True)`` runs the
rabbitflow consumers in the web process, with the guarantees of ``rabbitflow run``."""
