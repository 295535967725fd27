"""The transport helpers: backoff, Retry-After, status classification, secrets, headers."""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tapio.transport import (
    Secret,
    backoff_delay,
    check_header,
    classify_status,
    parse_retry_after,
    retry_delay,
)


@given(
    retry=st.integers(min_value=0, max_value=10_000),
    base=st.floats(min_value=0.001, max_value=10),
    cap=st.floats(min_value=10, max_value=3600),
    r=st.floats(min_value=0, max_value=1),
)
def test_backoff_is_jittered_exponential_and_capped(
    retry: int, base: float, cap: float, r: float
) -> None:
    d = backoff_delay(retry, base, cap, lambda: r)
    ceiling = min(cap, base * 2.0 ** min(retry, 62))
    assert ceiling / 2 - 1e-9 <= d <= ceiling + 1e-9
    assert d <= cap + 1e-9


def test_backoff_doubles() -> None:
    assert [backoff_delay(n, 0.5, 30, lambda: 1.0) for n in range(8)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
        30.0,
    ]
    assert backoff_delay(3, 0.5, 30, lambda: 0.0) == 2.0  # jitter floor: half the ceiling


def test_retry_after_parsing() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-3") is None
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 12, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(12, abs=1)
    past = email.utils.formatdate(now - 100, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0


def test_retry_delay_prefers_retry_after_within_cap() -> None:
    assert retry_delay(0, 0.5, 30, 4.0, lambda: 0.0) == 4.0
    assert retry_delay(0, 0.5, 30, 4000.0, lambda: 0.0) == 30.0
    assert retry_delay(2, 0.5, 30, None, lambda: 1.0) == 2.0


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "ok"),
        (204, "ok"),
        (301, "rejected"),
        (400, "rejected"),
        (401, "rejected"),
        (404, "rejected"),
        (413, "rejected"),
        (429, "retry"),
        (500, "retry"),
        (503, "retry"),
    ],
)
def test_status_classification(status: int, outcome: str) -> None:
    assert classify_status(status, "5").outcome == outcome


def test_secret_never_shows_itself() -> None:
    s = Secret("hunter2")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and "hunter2" not in f"{s}"
    assert s.reveal() == "hunter2"


def test_check_header() -> None:
    check_header("X-Ok", "value with spaces", what="t")
    for bad in ("a\rb", "a\nb", "a\x00b"):
        with pytest.raises(ValueError):
            check_header("X-Ok", bad, what="t")
    with pytest.raises(ValueError):
        check_header("X:Bad", "v", what="t")
