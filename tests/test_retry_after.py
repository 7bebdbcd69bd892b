"""``Retry.after``: an HTTP Retry-After header (seconds or an HTTP date) as a retry delay."""

from __future__ import annotations

import email.utils

import pytest

from rabbitflow import Retry

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("header", "delay_ms"),
    [
        ("120", 120_000),  # seconds, where Retry(120) is 120 ms
        (" 7 ", 7_000),
        ("0", 0),
        (email.utils.formatdate(NOW + 90, usegmt=True), 90_000),
        (email.utils.formatdate(NOW + 90), 90_000),  # "-0000": UTC
        (email.utils.formatdate(NOW - 5, usegmt=True), 0),  # in the past: now
    ],
)
def test_retry_after_reads_seconds_and_http_dates(header: str, delay_ms: int) -> None:
    assert Retry.after(header, now=NOW).delay_ms == delay_ms


@pytest.mark.parametrize("header", [None, "", "soon", "-5", "1.5", "٣", "Mon, 99 Foo 2026"])
def test_an_unreadable_retry_after_falls_back_to_the_default(header: str | None) -> None:
    assert Retry.after(header, now=NOW).delay_ms is None  # the queue's next tier
    assert Retry.after(header, default="30s", now=NOW).delay_ms == 30_000


def test_reason_names_the_header() -> None:
    assert str(Retry.after("3", now=NOW)) == "Retry-After: 3"
    assert Retry.after("3", reason="rate limited").reason == "rate limited"
