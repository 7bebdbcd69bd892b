"""``rabbitflow topology migrate``: a queue re-created with arguments RabbitMQ cannot change
in place, while producers publish and workers consume, without losing a message.

For a queue ``Q`` and its temporary queue ``Q.migrating`` (declared as the file says ``Q``
should be), the steps are::

    1 declare Q.migrating            6 declare Q with the file's arguments
    2 bind Q.migrating like Q        7 bind Q like Q.migrating
    3 unbind Q                       8 unbind Q.migrating
    4 move Q -> Q.migrating          9 move Q.migrating -> Q
    5 delete Q (once empty)         10 delete Q.migrating (once empty)

Messages move with confirm-then-ack (:mod:`rabbitflow.topology._mover`). Every step can be
told from the broker's state, so a migration interrupted anywhere resumes when run again:
``Q.migrating`` missing and ``Q`` with its old arguments is step 1; ``Q.migrating`` there and
``Q`` old is step 2 (binding, unbinding and moving again are harmless); ``Q`` missing is
step 6; ``Q`` with the new arguments and ``Q.migrating`` there is step 7. Workers consuming
``Q`` get a ``basic.cancel`` when it is deleted and consume it again once it is back
(:class:`rabbitflow._consumers.RunningConsumer`); what reached ``Q.migrating`` meanwhile is
moved back and consumed after.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

import aiormq
from aio_pika.abc import AbstractConnection

from rabbitflow._broker_version import BrokerVersion
from rabbitflow.errors import BrokerError, ManagementUnavailable, RabbitflowError
from rabbitflow.topology._channels import ChannelSource, apply, describe, exists
from rabbitflow.topology._declare import Management
from rabbitflow.topology._derived import (
    BindingSpec,
    Declarations,
    QueueSpec,
    for_broker,
    migrating_name,
)
from rabbitflow.topology._management import (
    delete_policy,
    put_policy,
    queue_bindings,
    read_state,
)
from rabbitflow.topology._mover import Moved, depth, move
from rabbitflow.topology._policies import policy_body, policy_name
from rabbitflow.topology._preflight import Checked, check

_DELETE_ROUNDS = 5
State = Literal["done", "missing", "policy", "old", "holding", "deleted", "recreated"]
# Where each state starts among the ten steps.
_START: dict[State, int] = {"old": 1, "holding": 2, "deleted": 6, "recreated": 7}


def temporary_name(queue: str) -> str:
    """``billing.order-created.migrating``."""
    return migrating_name(queue)


@dataclass(frozen=True, slots=True)
class Step:
    number: int
    text: str
    run: Callable[[], Awaitable[None]]


@dataclass(slots=True)
class Report:
    """What a migration did, per queue, for the CLI."""

    moved: list[tuple[str, str, Moved]]
    queues: list[str]


class Migration:
    """The queues of one topology file to migrate, and how to migrate each."""

    def __init__(
        self,
        connection: AbstractConnection,
        declarations: Declarations,
        *,
        management: Management | None,
        say: Callable[[str], None],
    ) -> None:
        self._connection = connection
        self._declarations = declarations
        self._management = management
        self._say = say
        self._channels = ChannelSource(connection)
        self._version: BrokerVersion | None = None
        self.moved: list[tuple[str, str, Moved]] = []

    async def close(self) -> None:
        await self._channels.close()

    async def prepare_exchanges(self) -> None:
        """Declare the file's exchanges and exchange bindings (the queues' bindings need
        them), after checking every exchange: nothing is declared if one conflicts."""
        version = await self._channels.version()
        for spec in self._declarations.exchanges:
            checked = await check(self._channels, spec, version)
            if checked.verdict == "conflict":
                raise RabbitflowError(
                    f"exchange {spec.name!r}: {checked.detail()}; nothing was changed"
                )
        for exchange in self._declarations.exchanges:
            await apply(self._channels, exchange)
        for binding in self._declarations.exchange_bindings:
            await apply(self._channels, binding)

    async def queues(self, owners: list[str]) -> list[QueueSpec]:
        """The file's queues of ``owners`` (every work queue when empty): each work queue,
        then its retry tiers, then its DLQ."""
        self._version = await self._channels.version()
        self._declarations = for_broker(self._declarations, self._version)
        work = [q.name for q in self._declarations.queues if q.role == "work"]
        unknown = [name for name in owners if name not in work]
        if unknown:
            raise RabbitflowError(
                f"not a queue of the file: {', '.join(map(repr, unknown))} (its queues: "
                f"{', '.join(work)}); a retry tier or DLQ migrates with its queue"
            )
        chosen = owners or work
        order = {"work": 0, "retry": 1, "dlq": 2}
        return sorted(
            (q for q in self._declarations.queues if q.owner in chosen),
            key=lambda q: (chosen.index(q.owner), order[q.role]),
        )

    async def state(self, spec: QueueSpec) -> tuple[State, Checked | None]:
        """Where the migration of ``spec`` stands, from the broker's state alone."""
        temporary = replace(spec, name=temporary_name(spec.name))
        has_temporary = await exists(self._channels, temporary)
        if not await exists(self._channels, spec):
            return ("deleted" if has_temporary else "missing"), None
        checked = await check(self._channels, spec, self._version)
        verdict = checked.verdict
        if verdict == "conflict":
            raise RabbitflowError(f"queue {spec.name!r} cannot be migrated: {checked.detail()}")
        new = verdict in ("ok", "policy")
        if has_temporary:
            return ("recreated" if new else "holding"), checked
        if verdict == "policy":
            return "policy", checked
        return ("done" if new else "old"), checked

    def steps(self, spec: QueueSpec, state: State, checked: Checked | None) -> list[Step]:
        """The steps left for ``spec`` from ``state`` (``checked``: the queue as it is)."""
        start = _START.get(state)
        if start is None:
            return []
        queue, temporary = spec.name, temporary_name(spec.name)
        kind = str(spec.arguments.get("x-queue-type", "classic"))
        old = (checked.broker_type if checked is not None else None) or "quorum"
        q, t = queue, temporary
        held = replace(spec, name=t)
        every = [
            Step(1, f"declare {t} ({kind}, as the file says {q})", partial(self._declare, held)),
            Step(2, f"bind {t} like {q}", partial(self._rebind, spec, q, t, unbind=False)),
            Step(3, f"unbind {q} (new messages reach {t})", partial(self._unbind, spec, q)),
            Step(4, f"move the messages of {q} to {t} (confirm, ack)", partial(self._move, q, t)),
            Step(5, f"delete {q} once empty", partial(self._delete, q, t, old)),
            Step(6, f"declare {q} ({describe(spec).detail})", partial(self._redeclare, spec)),
            Step(7, f"bind {q} like {t}", partial(self._rebind, spec, t, q, unbind=False)),
            Step(8, f"unbind {t}", partial(self._unbind, spec, t)),
            Step(9, f"move the messages of {t} back to {q}", partial(self._move, t, q)),
            Step(10, f"delete {t} once empty", partial(self._delete, t, q, kind)),
        ]  # fmt: skip
        return every[start - 1 :]

    async def apply_policy(self, checked: Checked) -> None:
        """Apply a queue's policy-only change as rabbitflow's policy (no message moves)."""
        name = checked.spec.name
        if self._management is None:
            raise RabbitflowError(
                f"queue {name!r}: {checked.detail()}: applied as a policy, which needs the "
                "management API (--management-url)"
            )
        state = await read_state(self._management.api, self._management.vhost)
        refreshed = await check(self._channels, checked.spec, self._version, state)
        if refreshed.verdict == "conflict":
            raise RabbitflowError(f"queue {name!r}: {refreshed.detail()}")
        if refreshed.policy_in_place:
            return
        body = policy_body(name, refreshed.policy_definition)
        await put_policy(self._management.api, self._management.vhost, policy_name(name), body)

    # -- the steps ---------------------------------------------------------------------------

    async def _declare(self, spec: QueueSpec) -> None:
        await apply(self._channels, spec)

    async def _redeclare(self, spec: QueueSpec) -> None:
        await apply(self._channels, spec)
        if self._management is not None:
            # The queue now carries the file's arguments itself: a policy that rabbitflow
            # applied for it earlier is not needed any more.
            with contextlib.suppress(ManagementUnavailable):
                await delete_policy(
                    self._management.api, self._management.vhost, policy_name(spec.name)
                )

    async def _rebind(self, spec: QueueSpec, like: str, queue: str, *, unbind: bool) -> None:
        bindings = await self._bindings(spec, like)
        channel = await self._channels.get()
        for binding in bindings:
            if unbind:
                await channel.queue_unbind(
                    queue, binding.source, binding.routing_key, arguments=binding.arguments
                )
            else:
                await apply(self._channels, replace(binding, destination=queue))

    async def _unbind(self, spec: QueueSpec, queue: str) -> None:
        await self._rebind(spec, queue, queue, unbind=True)

    async def _bindings(self, spec: QueueSpec, queue: str) -> list[BindingSpec]:
        # The file's bindings of the queue, and those the broker has besides (made by hand),
        # so that none is lost with the old queue.
        wanted = [b for b in self._declarations.queue_bindings if b.destination == spec.name]
        found: list[BindingSpec] = []
        if self._management is not None and await exists(self._channels, replace(spec, name=queue)):
            rows = await queue_bindings(self._management.api, self._management.vhost, queue)
            found = [_binding(row, spec.name) for row in rows]
        unique: dict[str, BindingSpec] = {}
        for binding in [*wanted, *found]:
            unique.setdefault(_key(binding), binding)
        return list(unique.values())

    async def _move(self, source: str, target: str) -> None:
        moved = await move(self._connection, source, target)
        self.moved.append((source, target, moved))
        if moved.messages:
            self._say(
                f"    moved {moved.messages} messages in {moved.seconds:.1f} s ({moved.rate:.0f}/s)"
            )

    async def _delete(self, queue: str, rest_to: str, queue_type: str) -> None:
        # Classic queues are deleted only if empty, atomically; quorum queues refuse that
        # flag (NOT_IMPLEMENTED), so their depth is checked just before. A message that
        # reached the queue by its name since the move (a retry copy expiring from a tier)
        # is moved too.
        for _ in range(_DELETE_ROUNDS):
            remaining = await depth(self._connection, queue)
            if remaining is None:
                return
            if remaining:
                await self._move(queue, rest_to)
                continue
            channel = await self._channels.get()
            try:
                await channel.queue_delete(queue, if_empty=queue_type == "classic")
            except aiormq.exceptions.ChannelPreconditionFailed:
                continue  # a message came in just now: move it too
            return
        raise BrokerError(
            f"{queue!r} keeps receiving messages by its name; stop what publishes to it "
            "directly and run the migration again",
            doing=f"deleting {queue!r}",
        )


def _binding(row: dict[str, Any], queue: str) -> BindingSpec:
    return BindingSpec(
        str(row["source"]),
        queue,
        "queue",
        str(row.get("routing_key", "")),
        dict(row.get("arguments") or {}),
    )


def _key(binding: BindingSpec) -> str:
    return json.dumps(
        [binding.source, binding.routing_key, binding.arguments], sort_keys=True, default=str
    )
