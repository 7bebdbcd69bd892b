"""``app.state``: resources made at start-up (a database pool, an HTTP client) for handlers."""

from __future__ import annotations

from typing import Any


class State:
    """An attribute bag, as Starlette's ``app.state``: set attributes in the lifespan, read
    them in handlers. Reading one that was never set names it and says where to set it."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes that are not set.
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"app.state has no {name!r}: set it in the app's lifespan or an on_startup hook "
            f"(app.state.{name} = ...), which run before the first message"
        )

    def __repr__(self) -> str:
        return f"State({', '.join(sorted(self.__dict__))})"
