"""The transport helpers: backoff, Retry-After, status classification, secrets, headers."""

from __future__ import annotations

import email.utils
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tapio.transport import (
    BearerToken,
    RetryPolicy,
    Secret,
    backoff_delay,
    check_header,
    classify_status,
    client_session,
    parse_endpoint,
    parse_retry_after,
    retry_delay,
    tls_for,
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


def test_408_is_retried_like_429() -> None:
    attempt = classify_status(408, "2")
    assert (attempt.outcome, attempt.retry_after) == ("retry", 2.0)


def test_retry_policy_is_the_backoff_with_retry_after_capped() -> None:
    policy = RetryPolicy(max_retries=3, base=0.5, cap=30.0)
    assert [policy.delay(n, None, lambda: 1.0) for n in range(3)] == [0.5, 1.0, 2.0]
    assert policy.delay(0, 4000.0) == 30.0


def test_secret_matches_in_constant_time_and_rejects_near_misses() -> None:
    s = Secret("hunter2")
    assert s.matches("hunter2") and s.matches(b"hunter2")
    assert not s.matches("hunter3") and not s.matches("hunter") and not s.matches("")


def test_bearer_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    token = BearerToken(file=str(path), env=None, what="t")
    assert token.header() == {"Authorization": "Bearer first"}
    path.write_text("second-token\n")  # rotated: another size (and mtime)
    assert token.header() == {"Authorization": "Bearer second-token"}
    assert "second" not in repr(token)
    assert BearerToken(file=None, env=None, what="t").header() == {}


def test_endpoint_rules() -> None:
    assert str(parse_endpoint(" https://h.example:8443/x ", what="t")) == "https://h.example:8443/x"
    for bad, why in [
        ("", "empty"),
        ("ftp://h/", "http:// or https://"),
        ("http://", "no host"),
        ("http://u:p@h/", "credentials"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_endpoint(bad, what="t")
    assert tls_for(parse_endpoint("http://h", what="t"), None) is None
    assert tls_for(parse_endpoint("https://h", what="t"), None) is not None


async def test_client_session_never_uses_the_environment_and_bounds_every_request() -> None:
    session = client_session(ssl_context=None, connect_timeout=1.5, timeout=7.0, limit=3)
    try:
        assert session.trust_env is False
        assert (session.timeout.total, session.timeout.connect) == (7.0, 1.5)
        assert (session.timeout.sock_connect, session.timeout.sock_read) == (1.5, 7.0)
        assert session.connector is not None and session.connector.limit == 3
    finally:
        await session.close()
