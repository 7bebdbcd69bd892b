"""The middleware chain is built once, runs in registration order, and is fixed at start."""

from __future__ import annotations

from typing import Any

import pytest

from rabbitflow import App, ConfigurationError, Message
from rabbitflow._state import State
from rabbitflow.middleware import CallNext, build_stack


def recorder(name: str, trail: list[str]) -> Any:
    async def layer(message: Message, call_next: CallNext) -> Any:
        trail.append(f"{name} in")
        result = await call_next(message)
        trail.append(f"{name} out")
        return f"{name}({result})"

    return layer


async def test_the_first_middleware_added_is_the_outermost() -> None:
    trail: list[str] = []

    async def endpoint(message: Message) -> Any:
        trail.append("handler")
        return "result"

    stack = build_stack([recorder("a", trail), recorder("b", trail)], endpoint)
    result = await stack(None)  # type: ignore[arg-type]

    assert trail == ["a in", "b in", "handler", "b out", "a out"]
    assert result == "a(b(result))"


def test_without_middleware_the_handler_is_called_directly() -> None:
    async def endpoint(message: Message) -> Any:
        return None

    assert build_stack([], endpoint) is endpoint


async def test_middleware_is_refused_once_the_app_has_started() -> None:
    app = App()
    app.add_middleware(recorder("a", []))
    async with app.lifespan_context():
        with pytest.raises(ConfigurationError, match="after the app has started"):
            app.add_middleware(recorder("late", []))
    assert len(app.middleware) == 1


def test_middleware_must_be_callable() -> None:
    with pytest.raises(ConfigurationError, match="callable"):
        App().add_middleware("not a middleware")  # type: ignore[arg-type]


def test_app_state_names_a_missing_resource() -> None:
    app = App()
    app.state.pool = "pool"
    assert app.state.pool == "pool"
    with pytest.raises(AttributeError, match=r"app.state has no 'http'.*lifespan"):
        _ = app.state.http
    assert repr(State(a=1, b=2)) == "State(a, b)"


def test_a_typed_state_object_can_replace_the_bag() -> None:
    class Resources:
        pool: str = "pg"

    app = App(state=Resources())
    assert app.state.pool == "pg"
