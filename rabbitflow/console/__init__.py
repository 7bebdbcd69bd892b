"""``rabbitflow console``: the operator's web page (docs/console.md, contract section 10).

Needs the ``console`` extra (``pip install 'rabbitflow[console]'``). ``create_app`` returns an
ASGI application; ``rabbitflow console`` serves it with uvicorn.
"""

from rabbitflow.console._app import ConsoleSettings, create_app

__all__ = ["ConsoleSettings", "create_app"]
