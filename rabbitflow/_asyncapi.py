"""An AsyncAPI 3.0 document of an app: its exchanges and queues, and what its handlers accept.

Channels are the topology's exchanges (AMQP binding ``is: routingKey``) and queues (``is:
queue``), generated retry tiers and dead-letter queues included. Each consumer is a ``receive``
operation on its queue; each exchange that reaches a consumer's queue a ``send`` operation.
Message payloads are JSON Schemas from the handlers' pydantic models. A handler that returns
a value answers requests: its operation has a ``reply`` on the ``reply`` channel (RabbitMQ's
direct reply-to, ``amq.rabbitmq.reply-to``), with the return annotation's schema and the
error reply of a final failure.
"""

from __future__ import annotations

import inspect
import re
import typing
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel

from rabbitflow import _headers as h
from rabbitflow._duration import format_duration
from rabbitflow._handler import Consumer
from rabbitflow._rpc import REPLY_TO
from rabbitflow.app import App
from rabbitflow.message import Message
from rabbitflow.topology._derived import BindingSpec, Declarations, QueueSpec, derive
from rabbitflow.topology._model import Topology

ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING_VERSION = "0.3.0"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")

_CONTRACT_HEADERS: dict[str, dict[str, Any]] = {
    h.ATTEMPT: {"type": "integer", "minimum": 1, "description": "Attempt the message is on."},
    h.ORIGIN_QUEUE: {"type": "string", "description": "Queue where it was first consumed."},
    h.ORIGIN_EXCHANGE: {"type": "string", "description": "Exchange it was first published to."},
    h.ORIGIN_ROUTING_KEY: {"type": "string", "description": "Its original routing key."},
    h.FIRST_FAILED_AT: {"type": "string", "format": "date-time"},
    h.ERROR_TYPE: {"type": "string", "description": "Qualified exception class name."},
    h.ERROR_MESSAGE: {"type": "string", "maxLength": h.ERROR_MESSAGE_LIMIT},
    h.ERROR_STACK: {"type": "string", "description": "Traceback (dead-letter queue only)."},
}


def key(name: str) -> str:
    """A channel, operation or component key made of the characters AsyncAPI allows."""
    return _KEY_UNSAFE.sub("_", name)


def channel_ref(channel: str) -> dict[str, str]:
    return {"$ref": f"#/channels/{channel}"}


@dataclass
class _Payload:
    """What a handler accepts: a message name, its content type and JSON Schema."""

    name: str
    content_type: str
    schema: dict[str, Any]
    models: dict[str, Any] = field(default_factory=dict)


def _first_annotation(consumer: Consumer) -> Any:
    hints = typing.get_type_hints(consumer.func)
    params = [
        p
        for p in inspect.signature(consumer.func).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return hints.get(params[0].name, Any) if params else Any


def payload_of(consumer: Consumer) -> _Payload:
    """The message a handler accepts, from the annotation of its first parameter."""
    return _payload_for(_first_annotation(consumer), key(consumer.queue))


def reply_of(consumer: Consumer) -> _Payload | None:
    """The reply a handler sends when called with ``reply_to``: its return annotation
    (None when it returns nothing)."""
    annotation = typing.get_type_hints(consumer.func).get("return", type(None))
    if annotation in (None, type(None)):
        return None
    return _payload_for(annotation, key(f"{consumer.queue}.reply"))


def _payload_for(annotation: Any, fallback: str) -> _Payload:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        schema = annotation.model_json_schema(ref_template="#/components/schemas/{model}")
        models = schema.pop("$defs", {})
        name = annotation.__name__
        return _Payload(
            name,
            "application/json",
            {"$ref": f"#/components/schemas/{name}"},
            {**models, name: schema},
        )
    origin = typing.get_origin(annotation) or annotation
    if origin is dict:
        return _Payload(f"{fallback}.payload", "application/json", {"type": "object"})
    if origin is list:
        return _Payload(f"{fallback}.payload", "application/json", {"type": "array"})
    if annotation is str:
        return _Payload(f"{fallback}.payload", "text/plain", {"type": "string"})
    if annotation in (bytes, Message):
        binary = {"type": "string", "format": "binary"}
        return _Payload(f"{fallback}.payload", "application/octet-stream", binary)
    return _Payload(f"{fallback}.payload", "application/json", {})


class _Builder:
    """Collects channels, operations and components while walking the declarations."""

    def __init__(self, app: App, topology: Topology, vhost: str) -> None:
        self.app = app
        self.topology = topology
        self.declarations: Declarations = derive(topology)
        self.vhost = vhost
        self.channels: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, dict[str, Any]] = {}
        self.schemas: dict[str, Any] = {}
        self.payloads = {queue: payload_of(consumer) for queue, consumer in app.consumers.items()}
        self.replies = {queue: reply_of(consumer) for queue, consumer in app.consumers.items()}

    # -- channels ----------------------------------------------------------------------------

    def exchange_channels(self) -> None:
        for spec in self.declarations.exchanges:
            self.channels[key(f"exchange.{spec.name}")] = {
                "address": spec.name,
                "title": spec.name,
                "description": f"{spec.type} exchange{self._binding_text(spec.name)}",
                "messages": {},
                "bindings": {
                    "amqp": {
                        "is": "routingKey",
                        "exchange": {
                            "name": spec.name,
                            "type": spec.type,
                            "durable": spec.durable,
                            "autoDelete": spec.auto_delete,
                            "vhost": self.vhost,
                        },
                        "bindingVersion": AMQP_BINDING_VERSION,
                    }
                },
            }

    def _binding_text(self, exchange: str) -> str:
        sources = [b for b in self.declarations.exchange_bindings if b.destination == exchange]
        if not sources:
            return ""
        return "; receives from " + ", ".join(_describe_binding(b) for b in sources)

    def queue_channels(self) -> None:
        for spec in self.declarations.queues:
            self.channels[key(f"queue.{spec.name}")] = {
                "address": spec.name,
                "title": spec.name,
                "description": self._queue_text(spec),
                "messages": {},
                "bindings": {
                    "amqp": {
                        "is": "queue",
                        "queue": {
                            "name": spec.name,
                            "durable": spec.durable,
                            "exclusive": spec.exclusive,
                            "autoDelete": spec.auto_delete,
                            "vhost": self.vhost,
                        },
                        "bindingVersion": AMQP_BINDING_VERSION,
                    }
                },
                "x-rabbitflow-role": spec.role,
                "x-rabbitflow-arguments": dict(spec.arguments),
            }

    def _queue_text(self, spec: QueueSpec) -> str:
        kind = spec.arguments.get("x-queue-type", "classic")
        if spec.role == "retry":
            delay = format_duration(int(spec.arguments["x-message-ttl"]))
            return (
                f"Retry tier of {spec.owner} ({kind}): a failed message waits {delay}, then "
                f"the broker dead-letters it back to {spec.owner} through the default exchange."
            )
        if spec.role == "dlq":
            return (
                f"Dead-letter queue of {spec.owner} ({kind}): messages whose retries are spent, "
                "that were rejected or could not be decoded, or that the broker dead-lettered "
                "(TTL, overflow, delivery limit); rabbitflow-* headers say why."
            )
        bindings = [b for b in self.declarations.queue_bindings if b.destination == spec.name]
        bound = ", ".join(_describe_binding(b) for b in bindings) or "nothing"
        return f"Work queue ({kind}); bound to {bound}."

    def reply_channel(self) -> None:
        if not any(self.replies.values()):
            return
        self.channels["reply"] = {
            "address": REPLY_TO,
            "title": "replies",
            "description": (
                "RabbitMQ's direct reply-to: the caller consumes this pseudo-queue and sends "
                "each request with reply_to = amq.rabbitmq.reply-to; the handler's reply goes "
                "to the default exchange with the address the broker wrote into reply_to, and "
                "carries the request's correlation_id. A request carries its caller's deadline "
                "(header rabbitflow-deadline, ISO-8601 UTC) and an expiration: past the "
                "deadline a worker settles it without running it."
            ),
            "messages": {REPLY_ERROR: {"$ref": f"#/components/messages/{REPLY_ERROR}"}},
            "bindings": {
                "amqp": {
                    "is": "queue",
                    "queue": {
                        "name": REPLY_TO,
                        "durable": False,
                        "exclusive": True,
                        "autoDelete": True,
                        "vhost": self.vhost,
                    },
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        }
        self.messages[REPLY_ERROR] = _reply_error_message()

    def _reply(self, queue: str) -> dict[str, Any] | None:
        payload = self.replies[queue]
        if payload is None:
            return None
        self.schemas.update(payload.models)
        name = key(payload.name)
        self.messages.setdefault(name, _message(payload))
        self._attach("reply", name)
        return {
            "address": {
                "location": "$message.header#/reply_to",
                "description": "The AMQP reply_to property of the request.",
            },
            "channel": channel_ref("reply"),
            "messages": [
                {"$ref": f"#/channels/reply/messages/{name}"},
                {"$ref": f"#/channels/reply/messages/{REPLY_ERROR}"},
            ],
        }

    # -- messages and operations -------------------------------------------------------------

    def consumer_messages(self) -> None:
        for queue, payload in self.payloads.items():
            self.schemas.update(payload.models)
            name = key(payload.name)
            self.messages.setdefault(name, _message(payload))
            dead_name = key(f"{payload.name}.dead-letter")
            self.messages.setdefault(dead_name, _dead_letter_message(payload))
            routes = self.declarations.routes[queue]
            self._attach(key(f"queue.{queue}"), name)
            for tier in routes.tiers.values():
                self._attach(key(f"queue.{tier}"), name)
            if routes.dead_letter_exchange is not None:
                self._attach(key(f"queue.{queue}.dlq"), dead_name)
                self._attach(key(f"exchange.{routes.dead_letter_exchange}"), dead_name)
            for exchange in self._exchanges_reaching(queue):
                self._attach(key(f"exchange.{exchange}"), name)

    def _attach(self, channel: str, message: str) -> None:
        if channel in self.channels:
            self.channels[channel]["messages"][message] = {
                "$ref": f"#/components/messages/{message}"
            }

    def _exchanges_reaching(self, queue: str) -> list[str]:
        """Exchanges a message can be published to and land in ``queue`` (through e2e bindings)."""
        found: list[str] = []
        todo = [b.source for b in self.declarations.queue_bindings if b.destination == queue]
        while todo:
            exchange = todo.pop()
            if exchange in found:
                continue
            found.append(exchange)
            todo += [
                b.source for b in self.declarations.exchange_bindings if b.destination == exchange
            ]
        dead_letter = self.topology.dead_letter_exchange
        return [name for name in found if name != dead_letter]

    def receive_operations(self) -> None:
        for queue, consumer in self.app.consumers.items():
            channel = key(f"queue.{queue}")
            message = key(self.payloads[queue].name)
            config = self.topology.queues[queue]
            operation: dict[str, Any] = {
                "action": "receive",
                "channel": channel_ref(channel),
                "title": consumer.name,
                "summary": _summary(consumer),
                "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
                "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}},
                "x-rabbitflow-retry": self._retry(queue),
                "x-rabbitflow-prefetch": config.prefetch,
            }
            if config.timeout_ms is not None:
                operation["x-rabbitflow-timeout"] = format_duration(config.timeout_ms)
            reply = self._reply(queue)
            if reply is not None:
                operation["reply"] = reply
            self.operations[key(f"receive.{queue}")] = operation

    def _retry(self, queue: str) -> dict[str, Any]:
        config = self.topology.queues[queue]
        routes = self.declarations.routes[queue]
        retry: dict[str, Any] = {
            "maxAttempts": config.retry.max_attempts if config.retry.enabled else 1,
            "delays": [format_duration(d) for d in config.retry.delays_ms] if routes.tiers else [],
            "tiers": [channel_ref(key(f"queue.{tier}")) for tier in routes.tiers.values()],
        }
        if routes.dead_letter_exchange is not None:
            retry["deadLetterQueue"] = channel_ref(key(f"queue.{queue}.dlq"))
        return retry

    def send_operations(self) -> None:
        for spec in self.declarations.exchanges:
            channel = key(f"exchange.{spec.name}")
            messages = self.channels[channel]["messages"]
            if not messages or spec.name == self.topology.dead_letter_exchange:
                continue
            self.operations[key(f"send.{spec.name}")] = {
                "action": "send",
                "channel": channel_ref(channel),
                "summary": f"Publish to the {spec.type} exchange {spec.name}.",
                "messages": [{"$ref": f"#/channels/{channel}/messages/{m}"} for m in messages],
                "bindings": {
                    "amqp": {
                        "deliveryMode": 2,
                        "mandatory": True,
                        "bindingVersion": AMQP_BINDING_VERSION,
                    }
                },
            }

    def document(self, title: str, version: str, server: dict[str, Any] | None) -> dict[str, Any]:
        self.exchange_channels()
        self.queue_channels()
        self.reply_channel()
        self.consumer_messages()
        self.receive_operations()
        self.send_operations()
        document: dict[str, Any] = {
            "asyncapi": ASYNCAPI_VERSION,
            "info": {
                "title": title,
                "version": version,
                "description": f"Generated by rabbitflow from {self.topology.source}.",
            },
            "defaultContentType": "application/json",
        }
        if server is not None:
            document["servers"] = {"broker": server}
        document["channels"] = self.channels
        document["operations"] = self.operations
        document["components"] = {"messages": self.messages, "schemas": self.schemas}
        return document


def _describe_binding(binding: BindingSpec) -> str:
    if binding.arguments:
        args = ", ".join(f"{k}={v}" for k, v in binding.arguments.items())
        return f"{binding.source} (headers {args})"
    return f"{binding.source} (routing key {binding.routing_key!r})"


def _summary(consumer: Consumer) -> str:
    doc = inspect.getdoc(consumer.func)
    return doc.splitlines()[0] if doc else f"Handled by {consumer.name}."


def _message(payload: _Payload) -> dict[str, Any]:
    return {
        "name": payload.name,
        "title": payload.name,
        "contentType": payload.content_type,
        "payload": payload.schema,
    }


def _dead_letter_message(payload: _Payload) -> dict[str, Any]:
    return {
        "name": f"{payload.name}.dead-letter",
        "title": f"{payload.name} (dead-lettered)",
        "summary": "The original message, with headers saying where and why it failed.",
        "contentType": payload.content_type,
        "headers": {"type": "object", "properties": _CONTRACT_HEADERS},
        "payload": payload.schema,
    }


REPLY_ERROR = "rabbitflow.reply-error"


def _reply_error_message() -> dict[str, Any]:
    error = {
        "type": "object",
        "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        "required": ["type", "message"],
    }
    return {
        "name": REPLY_ERROR,
        "title": "Error reply",
        "summary": (
            "The handler failed for good (the request is also in the DLQ); rabbitflow callers "
            "raise it as rabbitflow.RemoteError."
        ),
        "contentType": "application/json",
        "headers": {
            "type": "object",
            "properties": {
                h.ERROR_TYPE: _CONTRACT_HEADERS[h.ERROR_TYPE],
                h.ERROR_MESSAGE: _CONTRACT_HEADERS[h.ERROR_MESSAGE],
            },
        },
        "payload": {"type": "object", "properties": {"error": error}, "required": ["error"]},
    }


def _server(url: str | None) -> tuple[dict[str, Any] | None, str]:
    if not url:
        return None, "/"
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    host = parts.hostname or "localhost"
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    server = {
        "host": f"{host}:{port}",
        "protocol": parts.scheme or "amqp",
        "pathname": "/" + vhost.lstrip("/"),
    }
    return server, vhost


def build(
    app: App, topology: Topology, *, title: str | None = None, version: str = "1.0.0"
) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of ``app`` on ``topology``, as JSON-ready data.

    The broker URL (the app's, else the topology's) becomes the server, without credentials."""
    server, vhost = _server(app.url or topology.broker_url)
    return _Builder(app, topology, vhost).document(title or app.name, version, server)
