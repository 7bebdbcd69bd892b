"""The rabbitflow envelope: a dead letter whose own headers left no room for rabbitflow's.

RabbitMQ sends a message's properties, headers included, in one content-header frame, which
must fit in the connection's ``frame_max`` (131,072 bytes by default). A message published
with headers that nearly fill that frame has no room for the headers rabbitflow adds to its
retry or dead-letter copy, even after the error message and stack are cut. Such a message
is dead-lettered with its own headers (and its content type and encoding) moved into the
body, a JSON document of content type :data:`CONTENT_TYPE`::

    {
      "rabbitflow_envelope": 1,
      "content_type": "application/json",
      "content_encoding": null,
      "headers": "<base64 of the message's headers as an AMQP field table>",
      "header_sizes": {"tenant": 16, "blob": 130530},
      "body_encoding": "utf-8",
      "body": "{\\"order_id\\": 1}"
    }

``headers`` is the exact wire encoding of the moved headers, so that every AMQP type
(timestamps, decimals, nested tables, byte arrays) comes back as it was; ``header_sizes``
says which header took the room (bytes of each encoded entry). ``body_encoding`` is
``utf-8`` when the body is UTF-8 text (kept readable), else ``base64``. The copy's own header
table keeps rabbitflow's headers (the error type, message and stack, the attempt, the origin,
``rabbitflow-dead-letter-reason``), so ``rabbitflow dlq list`` and the console group it like
any dead letter, and ``rabbitflow dlq replay`` restores the message from it.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from pamqp import commands as spec
from pamqp import decode, encode

from rabbitflow import _headers as h

CONTENT_TYPE = "application/vnd.rabbitflow.envelope+json"
VERSION = 1
MARKER = "rabbitflow_envelope"


@dataclass(frozen=True, slots=True)
class Unwrapped:
    """What an envelope holds: the message as it was before it was dead-lettered."""

    content_type: str | None
    content_encoding: str | None
    headers: dict[str, Any]
    body: bytes


def is_envelope(content_type: str | None) -> bool:
    """Is a message with ``content_type`` a rabbitflow envelope?"""
    return content_type == CONTENT_TYPE


def wrap(properties: spec.Basic.Properties, body: bytes) -> bytes:
    """Move every header of ``properties`` that rabbitflow does not write, its content type
    and its content encoding into an envelope around ``body``; return the envelope's body.

    ``properties`` is the copy about to be published; it is changed in place."""
    headers = properties.headers or {}
    moved = {key: value for key, value in headers.items() if key not in h.OWN}
    for key in moved:
        del headers[key]
    document: dict[str, Any] = {
        MARKER: VERSION,
        "content_type": properties.content_type,
        "content_encoding": properties.content_encoding,
        "headers": base64.b64encode(encode.field_table(moved)).decode("ascii"),
        "header_sizes": {key: _entry_size(key, value) for key, value in moved.items()},
        **_body(body),
    }
    properties.content_type = CONTENT_TYPE
    properties.content_encoding = None
    return json.dumps(document, ensure_ascii=False).encode()


def unwrap(body: bytes) -> Unwrapped:
    """The message an envelope holds; ``ValueError`` naming what is wrong when it is not one."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a rabbitflow envelope: {exc}") from None
    if not isinstance(document, dict) or document.get(MARKER) != VERSION:
        raise ValueError(f"not a rabbitflow envelope of version {VERSION}")
    try:
        table = base64.b64decode(document["headers"], validate=True)
        headers = decode.field_table(table)[1] if table else {}
        return Unwrapped(
            _optional_text(document.get("content_type")),
            _optional_text(document.get("content_encoding")),
            dict(headers),
            _unbody(document["body"], document.get("body_encoding")),
        )
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise ValueError(f"damaged rabbitflow envelope: {exc!r}") from None


def _body(body: bytes) -> dict[str, str]:
    try:
        return {"body_encoding": "utf-8", "body": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"body_encoding": "base64", "body": base64.b64encode(body).decode("ascii")}


def _unbody(body: object, encoding: object) -> bytes:
    if not isinstance(body, str):
        raise TypeError("body is not a string")
    if encoding == "utf-8":
        return body.encode("utf-8")
    if encoding == "base64":
        return base64.b64decode(body, validate=True)
    raise ValueError(f"unknown body_encoding {encoding!r}")


def _optional_text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"expected a string or null, got {type(value).__name__}")


def _entry_size(key: str, value: Any) -> int:
    return len(encode.short_string(key)) + len(encode.encode_table_value(value))
