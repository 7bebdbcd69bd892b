"""Message bodies in and out: decoding by content type, encoding for publishing. Never pickle."""

from __future__ import annotations

import json
from typing import Any

import pydantic_core
from pydantic import BaseModel, ValidationError

from rabbitflow.errors import DecodeError
from rabbitflow.types import Decoder

JSON = "application/json"
TEXT = "text/plain"
BINARY = "application/octet-stream"
_IDENTITY_ENCODINGS = frozenset({None, "", "identity", "utf-8", "utf8", "UTF-8"})


def media_type(content_type: str | None) -> str:
    """``"application/json; charset=utf-8"`` → ``"application/json"``; missing → JSON."""
    if not content_type:
        return JSON
    return content_type.split(";", 1)[0].strip().lower()


def is_json(content_type: str | None) -> bool:
    kind = media_type(content_type)
    return kind == JSON or kind.endswith("+json")


def check_envelope(queue: str, body: bytes, encoding: str | None, limit: int) -> None:
    """Refuse bodies over the size limit and content encodings rabbitflow does not undo."""
    if len(body) > limit:
        raise DecodeError(queue, f"body is {len(body)} bytes, over the limit of {limit} bytes")
    if encoding not in _IDENTITY_ENCODINGS:
        raise DecodeError(queue, f"content encoding {encoding!r} is not supported")


def _unsupported(queue: str, content_type: str | None, target: str) -> DecodeError:
    return DecodeError(
        queue,
        f"content type {content_type!r} cannot be decoded into {target}; rabbitflow decodes "
        f"{JSON}, {TEXT} and {BINARY} and never unpickles",
    )


def _text(queue: str, body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        reason = f"body is not valid UTF-8: {exc.reason} at byte {exc.start}"
        raise DecodeError(queue, reason) from None


def _parse_json(queue: str, body: bytes) -> Any:
    try:
        return pydantic_core.from_json(body)
    except ValueError as exc:
        raise DecodeError(queue, f"body is not valid JSON: {exc}") from None


def model_decoder(model: type[BaseModel]) -> Decoder:
    """Validate JSON bodies straight from bytes into ``model``."""
    validate = model.model_validate_json
    name = model.__name__

    def decode(queue: str, body: bytes, content_type: str | None) -> Any:
        if content_type is not None and not is_json(content_type):
            raise _unsupported(queue, content_type, name)
        try:
            return validate(body)
        except ValidationError as exc:
            raise DecodeError(queue, f"invalid {name}: {_summary(exc)}") from None

    return decode


def _summary(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def json_decoder(expected: type | None) -> Decoder:
    """Parse JSON; when ``expected`` is ``dict`` or ``list``, check the top-level type."""

    def decode(queue: str, body: bytes, content_type: str | None) -> Any:
        if content_type is not None and not is_json(content_type):
            raise _unsupported(queue, content_type, expected.__name__ if expected else "JSON")
        value = _parse_json(queue, body)
        if expected is not None and not isinstance(value, expected):
            raise DecodeError(
                queue, f"expected a JSON {expected.__name__}, got {type(value).__name__}"
            )
        return value

    return decode


def text_decoder(queue: str, body: bytes, content_type: str | None) -> Any:
    """UTF-8 text of ``text/*`` and JSON bodies."""
    kind = media_type(content_type)
    if not (kind.startswith("text/") or is_json(content_type)):
        raise _unsupported(queue, content_type, "str")
    return _text(queue, body)


def bytes_decoder(queue: str, body: bytes, content_type: str | None) -> Any:
    """The raw body, whatever its content type."""
    return body


def any_decoder(queue: str, body: bytes, content_type: str | None) -> Any:
    """For unannotated handlers: JSON parsed, text as str, octet-stream as bytes."""
    kind = media_type(content_type)
    if is_json(content_type):
        return _parse_json(queue, body)
    if kind.startswith("text/"):
        return _text(queue, body)
    if kind == BINARY:
        return body
    raise _unsupported(queue, content_type, "a value")


def encode(payload: object) -> tuple[bytes, str]:
    """Body and content type for a payload: models and JSON values as JSON, str as text."""
    if isinstance(payload, BaseModel):
        return payload.model_dump_json().encode(), JSON
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload), BINARY
    if isinstance(payload, str):
        return payload.encode(), TEXT
    try:
        return json.dumps(payload, separators=(",", ":")).encode(), JSON
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"cannot publish {type(payload).__name__}: pass a pydantic model, a JSON value, "
            f"str or bytes ({exc})"
        ) from None
