"""What a web process can tell about the consumers it runs: :class:`ConsumerHealth`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

#: ``disabled``: ``consume=False``, nothing to consume here; ``stopped``: the lifespan has not
#: started, or has ended; ``connecting``: the first connection, or a reconnection, is under
#: way; ``consuming``: every consumer consumes (one paused by its circuit breaker counts);
#: ``stopping``: draining on shutdown; ``failed``: the worker ended with an error.
ConsumerState = Literal["disabled", "stopped", "connecting", "consuming", "stopping", "failed"]


@dataclass(frozen=True, slots=True)
class ConsumerHealth:
    """The consumers of one web process, as ``/readyz`` of ``rabbitflow run`` sees them.

    ``ready`` is what a readiness probe wants: True while consuming (``state`` is
    ``consuming``), and in a process that does not consume (``disabled``)."""

    state: ConsumerState
    queues: tuple[str, ...] = ()
    paused: tuple[str, ...] = ()
    in_flight: int = 0
    reconnections: int = 0
    error: str | None = None

    @property
    def ready(self) -> bool:
        """Consuming, or not meant to consume."""
        return self.state in ("consuming", "disabled")

    def as_dict(self) -> dict[str, Any]:
        """The JSON document of the health route."""
        return {"ready": self.ready, **asdict(self)}
