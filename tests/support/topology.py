"""Topology files and apps the broker tests declare."""

from __future__ import annotations

from pathlib import Path

from rabbitflow import App


def write_topology(directory: Path, *queues: str, extra: str = "") -> Path:
    """One direct exchange ``events`` and classic queues bound to it by their own names,
    retried after 100ms then 200ms, 3 attempts; ``extra`` is added to every queue table."""
    retry = 'retry = { delays = ["100ms", "200ms"], max_attempts = 3 }'
    text = '[exchanges.events]\ntype = "direct"\n'
    for queue in queues:
        text += (
            f'\n[queues."{queue}"]\nqueue_type = "classic"\nprefetch = 20\n{retry}\n{extra}\n'
            f'bindings = [{{ exchange = "events", routing_key = "{queue}" }}]\n'
        )
    path = directory / "topology.toml"
    path.write_text(text)
    return path


def work_topology(
    directory: Path,
    *,
    prefetch: int = 10,
    concurrency: int | None = None,
    timeout: str | None = None,
    queue_type: str = "classic",
) -> Path:
    """A topology like ``tests/apps/work.toml`` with the queue settings a test needs.

    Classic by default because rabbitmqctl reports the message counts of a classic queue as
    they are, but those of a quorum queue only as of the queue's last tick (every 5 s); tests
    that watch counts while the worker runs need classic queues.
    """
    settings = [f"prefetch = {prefetch}", f'queue_type = "{queue_type}"']
    if concurrency is not None:
        settings.append(f"concurrency = {concurrency}")
    if timeout is not None:
        settings.append(f'timeout = "{timeout}"')
    path = directory / "topology.toml"
    path.write_text(
        '[exchanges.jobs]\ntype = "direct"\n\n'
        "[queues.work]\n"
        'bindings = [{ exchange = "jobs", routing_key = "work" }]\n'
        'retry = { delays = ["1s"], max_attempts = 2 }\n' + "\n".join(settings) + "\n"
    )
    return path


def app_for(tmp_path: Path, toml: str) -> App:
    """An App whose topology file is ``toml``, written into ``tmp_path``."""
    path = tmp_path / "topology.toml"
    path.write_text(toml)
    return App(topology=path, name="recover-test")
