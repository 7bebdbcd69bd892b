"""Other frameworks as their users run them: FastStream (telemetry on), taskiq and Dramatiq.

Each peer is set up the way its documentation shows, with its defaults except where the
benchmark needs the same conditions for every case (a classic durable queue; the prefetch of
1000 where the framework lets the user set it). Every peer acks a message after its handler
has run, as rabbitflow does.

Taskiq and Dramatiq have their own message formats, so their queues are filled by their own
clients: ``python -m bench.peers prepare CASE URL QUEUE COUNT``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from typing import TYPE_CHECKING, Any

from bench.consumers import PREFETCH, Order

if TYPE_CHECKING:
    from bench.consumers import Meter

TASKIQ_EXCHANGE = "bench.taskiq"


def extra_queues(case: str, queue: str) -> list[str]:
    """The queues a peer declares beside its own, to delete after the case."""
    if case == "taskiq":
        return [f"{queue}.dlq", f"{queue}.delay"]
    if case == "dramatiq":
        return [f"{queue}.DQ", f"{queue}.XQ"]
    return []


# -- FastStream with telemetry ---------------------------------------------------------------


async def faststream_telemetry(url: str, queue: str, meter: Meter) -> None:
    """FastStream everything on: ``RabbitTelemetryMiddleware`` on the SDK provider the
    rabbitflow case uses, and FastStream's default logger (an INFO line per message received
    and processed, to stderr)."""
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
    from faststream.rabbit.opentelemetry import RabbitTelemetryMiddleware

    from bench.consumers import install_sdk_tracing

    provider = install_sdk_tracing()
    logging.basicConfig(level=logging.INFO)
    broker = RabbitBroker(
        url,
        default_channel=Channel(prefetch_count=PREFETCH),
        middlewares=[RabbitTelemetryMiddleware(tracer_provider=provider)],
    )

    @broker.subscriber(RabbitQueue(queue, durable=True))
    async def handle(order: Order) -> None:
        meter.tick(order.sent_at)

    await broker.start()
    await meter.done.wait()
    await broker.stop()


# -- taskiq ------------------------------------------------------------------------------------


def _taskiq_broker(url: str, queue: str, *, traced: bool) -> Any:
    from taskiq_aio_pika import AioPikaBroker
    from taskiq_aio_pika.exchange import Exchange
    from taskiq_aio_pika.queue import Queue, QueueType

    classic = QueueType.CLASSIC
    broker = AioPikaBroker(
        url,
        qos=PREFETCH,
        exchange=Exchange(name=TASKIQ_EXCHANGE),
        task_queues=[Queue(name=queue, type=classic)],
        dead_letter_queue=Queue(name=f"{queue}.dlq", type=classic),
        delay_queue=Queue(name=f"{queue}.delay", type=classic),
    )
    if traced:
        from taskiq.middlewares.opentelemetry_middleware import OpenTelemetryMiddleware

        from bench.consumers import install_sdk_tracing

        broker = broker.with_middlewares(OpenTelemetryMiddleware(install_sdk_tracing()))
    return broker


def _taskiq_task(broker: Any, meter: Meter | None) -> Any:
    @broker.task(task_name="bench.handle")
    async def handle(order: Order) -> None:
        # taskiq validates the argument into the model from the type hint.
        if meter is not None:
            meter.tick(order.sent_at)

    return handle


async def taskiq_prepare(url: str, queue: str, count: int) -> None:
    from bench.run import BODY_FIELDS

    broker = _taskiq_broker(url, queue, traced=False)
    task = _taskiq_task(broker, None)
    await broker.startup()
    for start in range(0, count, 1000):
        await asyncio.gather(
            *(
                task.kiq(Order(**BODY_FIELDS, order_id=i))
                for i in range(start, min(start + 1000, count))
            )
        )
    await broker.shutdown()


async def taskiq(url: str, queue: str, meter: Meter) -> None:
    """taskiq with taskiq-aio-pika and its ``OpenTelemetryMiddleware``, logging at INFO as
    ``taskiq worker`` sets it up (a line per task); the receiver acks when the result is
    saved (its default, ``WHEN_SAVED``), after the task ran."""
    from taskiq.receiver import Receiver

    logging.basicConfig(level=logging.INFO)

    broker = _taskiq_broker(url, queue, traced=True)
    _taskiq_task(broker, meter)
    broker.is_worker_process = True
    await broker.startup()
    receiver = Receiver(broker, max_async_tasks=PREFETCH, max_prefetch=PREFETCH)
    finished = asyncio.Event()
    listening = asyncio.create_task(receiver.listen(finished))
    await meter.done.wait()
    finished.set()
    listening.cancel()
    await asyncio.gather(listening, return_exceptions=True)
    await broker.shutdown()


# -- Dramatiq ----------------------------------------------------------------------------------


def _dramatiq_actor(url: str, queue: str, on_order: Any) -> tuple[Any, Any]:
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=url)
    dramatiq.set_broker(broker)

    @dramatiq.actor(queue_name=queue, actor_name="handle")
    def handle(order: dict[str, Any]) -> None:
        # Dramatiq passes JSON arguments; the model is validated by hand, as a user would.
        on_order(Order.model_validate(order))

    return broker, handle


def dramatiq_prepare(url: str, queue: str, count: int) -> None:
    from bench.run import BODY_FIELDS

    broker, handle = _dramatiq_actor(url, queue, lambda order: None)
    for i in range(count):
        handle.send(Order(**BODY_FIELDS, order_id=i).model_dump())
    broker.close()


def dramatiq(url: str, queue: str, meter: Meter) -> None:
    """Dramatiq's ``RabbitmqBroker`` (pika) with its default middleware and a ``Worker`` of
    its default 8 threads and prefetch (2 per thread); a message is acked after its actor
    returned. Dramatiq has no OpenTelemetry integration of its own."""
    from dramatiq import Worker

    logging.basicConfig(level=logging.INFO)
    lock = threading.Lock()
    done = threading.Event()

    def on_order(order: Order) -> None:
        with lock:
            meter.tick(order.sent_at)
            if meter.count == meter.expected:
                done.set()

    broker, _ = _dramatiq_actor(url, queue, on_order)
    worker = Worker(broker)
    worker.start()
    done.wait(timeout=600)
    worker.stop()
    broker.close()


def main() -> None:
    _, case, url, queue, count = sys.argv[1:6]
    if case == "taskiq":
        asyncio.run(taskiq_prepare(url, queue, int(count)))
    elif case == "dramatiq":
        dramatiq_prepare(url, queue, int(count))
    else:
        raise SystemExit(f"nothing to prepare for {case}")


if __name__ == "__main__":
    main()
