"""The benchmark's report (``python -m bench.run``): ratios inside a round, min–max, the model.

The run takes minutes against a broker; its summary and table are checked here on made-up
rounds, so a mistake in them shows before the end of a long run.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench import procstat
from bench.run import CONSUME_CASES, PUBLISH_CASES, summarize, table


def consume(rate: float) -> dict[str, float]:
    return {"rate": rate, "cpu_us_per_msg": 1e6 / rate, "max_rss_mib": 40.0}


def made_up_round(scale: float) -> dict[str, Any]:
    # Every rate of a round scales together (a busier machine): the ratios must not move.
    rates = {case: 1000.0 * (i + 1) * scale for i, case in enumerate(CONSUME_CASES)}
    cpu = {
        "rate": 9000.0 * scale,
        "workers_cores": 0.9,
        "broker_cores": 0.3,
        "other_cores": 0.1,
        "machine_cores": 1.3,
        "workers_us_per_msg": 60.0,
        "broker_us_per_msg": 20.0,
    }
    return {
        "consume": {case: consume(rate) for case, rate in rates.items()},
        "publish": {case: 500.0 * (i + 1) * scale for i, case in enumerate(PUBLISH_CASES)},
        "latency": {"aio_pika": {"p50_ms": 1.0 * scale, "p99_ms": 5.0 * scale}},
        "workers": {"workers_1": 10000.0 * scale, "workers_2": 15000.0 * scale}
        | {"cpu_1": cpu, "cpu_2": cpu},
    }


def test_ratios_are_taken_inside_each_round_and_rates_show_their_spread() -> None:
    summary = summarize([made_up_round(1.0), made_up_round(2.0), made_up_round(4.0)])

    rabbitflow = summary["rabbitflow"]
    index = CONSUME_CASES.index("rabbitflow") + 1
    assert rabbitflow["ratio"] == {"median": index, "min": index, "max": index}
    assert rabbitflow["rate"] == {
        "median": 2000.0 * index,
        "min": 1000.0 * index,
        "max": 4000.0 * index,
    }
    otel = CONSUME_CASES.index("faststream_otel") + 1
    assert summary["peers"]["faststream_otel"]["median"] == index / otel
    assert summary["workers_2"]["ratio"]["median"] == 1.5
    assert summary["app_publish_many_all"]["ratio"]["median"] == 5 / 4  # of aio-pika's "all"


def test_the_table_lists_every_case_with_min_max_and_the_scaling_model() -> None:
    text = table(summarize([made_up_round(1.0), made_up_round(3.0)]))

    assert "| consume rabbitflow, everything on | 14,000 (7,000–21,000) | 7.00× (7.00×–7.00×)" in (
        text
    )
    assert "rabbitflow everything on / FastStream, telemetry middleware" in text
    assert "| `rabbitflow run --workers 2` |" in text
    # w = 60 µs, b = 20 µs: two workers on 2 cores are bound by the cores, 2 / 80 µs.
    assert "| 2 | 2 | 25,000 | the cores (broker + workers) |" in text
    assert "| 4 | 2 | 33,333 | the workers |" in text


def test_the_steady_window_leaves_out_start_and_end_of_the_drain() -> None:
    samples = [
        procstat.Sample(at=0.0, ready=1000, broker=0.0, workers=0.0, machine=0.0),
        procstat.Sample(at=1.0, ready=900, broker=1.0, workers=1.0, machine=5.0),
        procstat.Sample(at=2.0, ready=500, broker=1.2, workers=1.5, machine=6.0),
        procstat.Sample(at=3.0, ready=100, broker=1.4, workers=2.0, machine=7.0),
        procstat.Sample(at=4.0, ready=0, broker=9.0, workers=9.0, machine=20.0),
    ]

    window = procstat.steady(samples, 1000)

    assert window is not None
    assert window["rate"] == 400.0  # 800 messages in 2 s
    assert window["broker_cores"] == pytest.approx(0.2)
    assert window["workers_cores"] == pytest.approx(0.5)
    assert window["machine_cores"] == pytest.approx(1.0)
    assert window["broker_us_per_msg"] == pytest.approx(500.0)
