"""What returning a delivery costs it, per queue type and RabbitMQ version, and what rabbitflow
does with a copy it could not publish because of it (no broker: the decisions alone; the
behaviour on each real broker is in test_delivery_limit.py)."""

from __future__ import annotations

import pytest

from rabbitflow._broker_version import BrokerVersion, Returns
from rabbitflow._outcome import HOLD_LIMIT, Action, OutcomePolicy
from rabbitflow.topology import derive, parse_topology


@pytest.mark.parametrize(
    ("queue_type", "version", "returns"),
    [
        ("quorum", "3.10.8", Returns.COUNTED),
        ("quorum", "4.0.5", Returns.COUNTED),
        ("quorum", "4.2.3", Returns.COUNTED),
        ("quorum", "4.3.6", Returns.NACK_FREE),
        ("quorum", "5.0.0", Returns.NACK_FREE),
        ("quorum", None, Returns.COUNTED),  # a broker that does not say: assume the worst
        ("classic", "3.10.8", Returns.FREE),
        ("classic", "4.3.6", Returns.FREE),
        ("stream", "4.3.6", Returns.FREE),
    ],
)
def test_what_a_return_costs_by_queue_type_and_version(
    queue_type: str, version: str | None, returns: Returns
) -> None:
    parsed = BrokerVersion.parse(version) if version else None
    assert Returns.of(queue_type, parsed) is returns


def policy(consumer_timeout_ms: int | None = None) -> OutcomePolicy:
    config = parse_topology('[queues.orders]\nqueue_type = "quorum"\nretry = false\n')
    return OutcomePolicy(
        config.queues["orders"].retry,
        derive(config).routes["orders"],
        consumer_timeout_ms=consumer_timeout_ms,
    )


def test_where_returns_count_a_refused_copy_is_published_again_with_the_delivery_in_hand() -> None:
    # Given a dead-letter plan whose copy the broker refused, on a quorum queue before 4.3
    orders = policy()
    plan = orders.dead_letter(ValueError("bad"), 1, "not in retry_on")

    # When the policy is asked after each failure, the delivery in hand for `held` seconds
    first = orders.after_publish_failure(plan, 1, held=0.0)
    fourth = orders.after_publish_failure(plan, 4, held=7.0)
    late = orders.after_publish_failure(plan, 9, held=HOLD_LIMIT - 30)

    # Then the same plan again, after the growing backoff, until the hold limit is near;
    # then the delivery goes back to its queue (counted, once per hold limit)
    assert (first.action, first.after, first.reason) == (Action.DEAD_LETTER, 1.0, plan.reason)
    assert (fourth.action, fourth.after) == (Action.DEAD_LETTER, 8.0)
    assert (late.action, late.after) == (Action.REQUEUE, 60.0)


def test_where_a_nack_is_free_a_refused_copy_goes_back_to_its_queue() -> None:
    plan = policy().dead_letter(ValueError("bad"), 1, "not in retry_on")

    again = policy().after_publish_failure(plan, 1, held=None)

    assert (again.action, again.after) == (Action.REQUEUE, 1.0)


def test_a_short_consumer_timeout_shortens_the_hold() -> None:
    # Given a queue whose consumer_timeout is 1 minute: held for a quarter of it at most
    short = policy(consumer_timeout_ms=60_000)
    plan = short.dead_letter(ValueError("bad"), 1, "not in retry_on")

    assert short.after_publish_failure(plan, 3, held=3.0).action is Action.DEAD_LETTER  # 7 s
    assert short.after_publish_failure(plan, 4, held=8.0).action is Action.REQUEUE  # 16 s
