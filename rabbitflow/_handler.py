"""A registered handler: the user's function and how to call it, worked out once at start-up."""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from rabbitflow import _payload as payload
from rabbitflow.errors import ConfigurationError
from rabbitflow.message import Message
from rabbitflow.types import Decoder, ExceptionTypes, HandlerFunc


@dataclass(frozen=True, slots=True)
class Consumer:
    """What ``@app.consumer`` recorded: the queue, the function and per-consumer options."""

    queue: str
    func: HandlerFunc
    retry_on: ExceptionTypes = ()
    dead_letter_on: ExceptionTypes = ()
    # @app.consumer(idempotent=...); None: the queue's `idempotent` key decides.
    idempotent: bool | None = None
    # @app.consumer(track=...); None: the queue's `track` key decides.
    track: bool | None = None

    @property
    def name(self) -> str:
        return f"{self.func.__module__}.{self.func.__qualname__}"


@dataclass(frozen=True, slots=True)
class Signature:
    """How to call a handler: which decoder feeds its first parameter, and whether it wants the
    :class:`Message` (``message_only``: its only parameter is the Message)."""

    decode: Decoder
    is_async: bool
    wants_message: bool
    message_only: bool


def inspect_handler(consumer: Consumer) -> Signature:
    """Read the handler's parameters; :class:`ConfigurationError` for shapes it cannot call."""
    func = consumer.func
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:
        raise ConfigurationError(
            f"cannot resolve the annotations of handler {consumer.name}: {exc}"
        ) from None
    params = [
        p
        for p in inspect.signature(func).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not params or len(params) > 2:
        raise ConfigurationError(
            f"handler {consumer.name} must take the payload and, optionally, a Message "
            f"(it takes {len(params)} positional parameters)"
        )
    first = hints.get(params[0].name, inspect.Parameter.empty)
    is_async = inspect.iscoroutinefunction(func)
    if first is Message:
        return Signature(payload.bytes_decoder, is_async, True, True)
    if len(params) == 2 and hints.get(params[1].name) is not Message:
        raise ConfigurationError(
            f"the second parameter of handler {consumer.name} must be annotated Message"
        )
    return Signature(_decoder_for(first, consumer), is_async, len(params) == 2, False)


def _decoder_for(annotation: Any, consumer: Consumer) -> Decoder:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return payload.model_decoder(annotation)
    origin = typing.get_origin(annotation) or annotation
    if origin in (dict, list):
        return payload.json_decoder(origin)
    if annotation is str:
        return payload.text_decoder
    if annotation is bytes:
        return payload.bytes_decoder
    if annotation in (inspect.Parameter.empty, Any, object):
        return payload.any_decoder
    raise ConfigurationError(
        f"handler {consumer.name}: cannot decode a payload into {annotation!r}; annotate the "
        "first parameter with a pydantic model, dict, list, str, bytes or Message"
    )
