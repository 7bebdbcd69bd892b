"""Per-message cost of the four metric updates of one delivery.

The figures of docs/performance.md, "Metrics cost".

rabbitflow's own registry against prometheus_client with pre-bound children, the fastest way
to use it. Run: ``python scripts/metrics_cost.py [--messages N]`` (needs prometheus_client).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import prometheus_client

from rabbitflow._metrics import Metrics


def own() -> Callable[[], None]:
    metrics = Metrics(prometheus_client.CollectorRegistry())
    consumed = metrics.consumed.labels("billing", "ack")
    duration = metrics.duration.histogram("billing")
    in_flight = metrics.in_flight.labels("billing")

    def one() -> None:
        in_flight.inc()
        duration.observe(0.004)
        in_flight.dec()
        consumed.inc()

    return one


def client() -> Callable[[], None]:
    registry = prometheus_client.CollectorRegistry()
    consumed = prometheus_client.Counter("m", "m", ["queue", "outcome"], registry=registry).labels(
        "billing", "ack"
    )
    duration = prometheus_client.Histogram(
        "d", "d", ["queue"], registry=registry, buckets=Metrics().duration.bucket_bounds
    ).labels("billing")
    in_flight = prometheus_client.Gauge("g", "g", ["queue"], registry=registry).labels("billing")

    def one() -> None:
        in_flight.inc()
        duration.observe(0.004)
        in_flight.dec()
        consumed.inc()

    return one


def timed(update: Callable[[], None], messages: int) -> float:
    """Microseconds per message of one run of ``messages`` updates."""
    start = time.perf_counter()
    for _ in range(messages):
        update()
    return (time.perf_counter() - start) / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    # The candidates take turns, round after round, so that a busy machine slows them alike;
    # the minimum is the run least disturbed by other work.
    runs: dict[str, list[float]] = {"empty loop": [], "rabbitflow": [], "prometheus_client": []}
    candidates = {"empty loop": lambda: None, "rabbitflow": own(), "prometheus_client": client()}
    for _ in range(args.rounds):
        for name, update in candidates.items():
            runs[name].append(timed(update, args.messages))
    empty = min(runs["empty loop"])
    for name in ("rabbitflow", "prometheus_client"):
        best = min(runs[name]) - empty
        median = statistics.median(runs[name]) - empty
        print(f"{name:18} min {best:.2f} us, median {median:.2f} us per message (4 updates)")
    ratio = (min(runs["prometheus_client"]) - empty) / (min(runs["rabbitflow"]) - empty)
    print(f"ratio of the minimums: {ratio:.1f}x (empty loop {empty:.2f} us subtracted)")


if __name__ == "__main__":
    main()
