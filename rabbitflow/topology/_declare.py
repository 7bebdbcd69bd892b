"""Declaring a topology on the broker: checked whole first, then in dependency order,
idempotent, never deleting, never partial.

Every exchange and queue is first checked against the live broker
(:mod:`rabbitflow.topology._preflight`): when one of them cannot be declared as the file
says, nothing is declared and the error names the argument that differs, both values, and
what resolves it. Only then are the objects declared, in order. A difference a policy can
carry is applied as rabbitflow's policy of that queue (through the management API), and the
queue is redeclared with the arguments it has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from rabbitflow._logging import get_logger
from rabbitflow.errors import (
    ManagementUnavailable,
    RabbitflowError,
    TopologyConflictError,
    TopologyMismatchError,
)
from rabbitflow.topology._channels import (
    ChannelSource,
    Declared,
    Kind,
    Spec,
    Target,
    apply,
    binding_detail,
    binding_name,
    broker_error,
    describe,
    exists,
    file_value_of,
    kind_of,
    parse_conflict,
    visible,
)
from rabbitflow.topology._derived import (
    Declarations,
    ExchangeSpec,
    QueueSpec,
    for_broker,
)
from rabbitflow.topology._management import BrokerState, put_policy, read_state
from rabbitflow.topology._policies import policy_body, policy_name
from rabbitflow.topology._preflight import Checked, check

log = get_logger("rabbitflow.declare")

__all__ = [
    "ChannelSource",
    "Declared",
    "Kind",
    "Management",
    "Spec",
    "Target",
    "apply",
    "binding_detail",
    "binding_name",
    "broker_error",
    "declare",
    "describe",
    "exists",
    "file_value_of",
    "ordered",
    "parse_conflict",
    "verify",
    "visible",
]


@dataclass(frozen=True, slots=True)
class Management:
    """The management HTTP API of the broker (credentials in ``api``) and the vhost: where
    ``declare`` reads policies and applies rabbitflow's own."""

    api: str
    vhost: str


def ordered(declarations: Declarations) -> Iterator[Spec]:
    """Dependency order: an exchange before its bindings, a queue before its bindings."""
    yield from declarations.exchanges
    yield from declarations.exchange_bindings
    yield from declarations.queues
    yield from declarations.queue_bindings


async def declare(
    target: Target,
    declarations: Declarations,
    *,
    passive: bool = False,
    on_declared: Callable[[Declared], None] | None = None,
    management: Management | None = None,
    file: str = "FILE",
) -> list[Declared]:
    """Check every exchange and queue against the broker, then declare every exchange,
    queue and binding; return what was declared, in order.

    Idempotent: an object that exists with the same properties is left as it is. Nothing is
    ever deleted, and nothing is declared when one object cannot be:
    :class:`TopologyConflictError` names it (``file`` is the topology's path, for the
    command it suggests). A difference a policy can carry is applied as rabbitflow's policy
    when ``management`` is given; without it the queue is kept as it is and a warning says
    what to run. With ``passive=True`` nothing is declared: see :func:`verify`."""
    if passive:
        await verify(target, declarations)
        return []
    channels = ChannelSource(target)
    done: list[Declared] = []
    try:
        version = await channels.version()
        declarations = for_broker(declarations, version)
        state = None
        if management is not None:
            try:
                state = await read_state(management.api, management.vhost)
            except ManagementUnavailable as exc:
                log.warning(f"policies not read: the management API {exc.reason}")
                management = None
        checks: dict[tuple[str, str], Checked] = {}
        objects: list[ExchangeSpec | QueueSpec] = [*declarations.exchanges, *declarations.queues]
        for spec in objects:
            checks[(kind_of(spec), spec.name)] = await check(channels, spec, version, state)
        refuse(list(checks.values()), file)
        await _policies(list(checks.values()), management, state)
        for declared in ordered(declarations):
            checked = checks.get((kind_of(declared), getattr(declared, "name", "")))
            sent = checked.send if checked is not None and checked.send is not None else declared
            await apply(channels, sent)
            done.append(describe(declared))
            if on_declared is not None:
                on_declared(done[-1])
    finally:
        await channels.close()
    return done


def refuse(checks: list[Checked], file: str) -> None:
    """Raise :class:`TopologyConflictError` for the first object that needs a migration or
    cannot be declared at all; nothing when every object can be."""
    blocked = [c for c in checks if c.verdict in ("migrate", "conflict")]
    if not blocked:
        return
    first = blocked[0]
    more = ""
    if len(blocked) > 1:
        names = ", ".join(f"{c.spec.name!r}" for c in blocked[1:])
        more = f"; also {names} (see `rabbitflow topology plan`)"
    kind = "exchange" if isinstance(first.spec, ExchangeSpec) else "queue"
    if first.error is not None or not first.changes:
        raise RabbitflowError(
            f"{kind} {first.spec.name!r}: {first.detail()}; nothing was declared{more}"
        )
    hardest = [c for c in first.changes if c.how == first.verdict]
    change = hardest[0] if hardest else first.changes[0]
    if first.verdict == "migrate":
        owner = first.spec.owner if isinstance(first.spec, QueueSpec) else first.spec.name
        resolve = (
            "RabbitMQ cannot change it in place; nothing was declared: run "
            f"`rabbitflow topology migrate {file} {owner}` to move the queue's messages to a "
            "queue declared as the file says"
        )
    elif not hardest and first.policy is not None:
        resolve = first.policy.why(first.spec.name) + "; nothing was declared"
    else:
        resolve = f"{change.why}; nothing was declared"
    raise TopologyConflictError(
        kind, first.spec.name, change.argument, change.broker, change.file, resolve=resolve + more
    )


async def _policies(
    checks: list[Checked], management: Management | None, state: BrokerState | None
) -> None:
    for checked in checks:
        if checked.verdict != "policy" or checked.policy_in_place:
            continue
        name = checked.spec.name
        definition = checked.policy_definition
        keys = ", ".join(f"{key} = {value!r}" for key, value in definition.items())
        if management is None or state is None:
            log.warning(
                f"queue {name!r} differs from the file in what a policy can carry ({keys}): "
                "kept as it is",
                queue=name,
                hint="run `rabbitflow topology declare`: it applies them as the policy "
                f"{policy_name(name)!r}",
            )
            continue
        await put_policy(
            management.api, management.vhost, policy_name(name), policy_body(name, definition)
        )
        log.info(f"applied policy {policy_name(name)!r} to queue {name!r}: {keys}", queue=name)


async def verify(target: Target, declarations: Declarations) -> list[str]:
    """Check, without declaring anything, that every exchange and queue exists.

    Raises :class:`TopologyMismatchError` naming every missing object. Bindings cannot be
    observed over AMQP and are not checked. Returns the objects the user may not look at
    (RabbitMQ 4.3+ refuses a passive declare to a user with no permission on the object):
    they are left unchecked, and logged once, since a least-privilege worker has no right on
    its retry tiers, DLQs or the exchanges it does not publish to. A copy published to a
    missing one is returned unroutable and its message stays in its queue (see _repair)."""
    channels = ChannelSource(target)
    unchecked: list[str] = []
    try:
        specs: list[ExchangeSpec | QueueSpec] = [*declarations.exchanges, *declarations.queues]
        missing = []
        for spec in specs:
            found = await visible(channels, spec)
            if found is None:
                unchecked.append(f"{kind_of(spec)} {spec.name!r}")
            elif not found:
                missing.append(spec)
    finally:
        await channels.close()
    if missing:
        raise TopologyMismatchError([f"{kind_of(spec)} {spec.name!r}" for spec in missing])
    if unchecked:
        log.info(
            "not checked, the user has no permission on them (RabbitMQ 4.3 and later let a "
            "passive declare through only with one): " + ", ".join(unchecked),
            hint="grant write on them to have them checked (docs/operations.md)",
        )
    return unchecked
