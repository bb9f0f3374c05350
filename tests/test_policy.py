"""Outcome classification and backoff: the policy table, row by row."""

from __future__ import annotations

import socket

import aiohttp
import pytest

from forwarder.backoff import backoff_delay_s, parse_retry_after, throttle_delay_s
from forwarder.outcome import Action, classify_response, classify_transport_error


@pytest.mark.parametrize(
    ("status", "error_type", "batch", "action"),
    [
        (200, None, True, Action.RESULTS),
        (200, None, False, Action.ACCEPTED),
        (201, None, True, Action.RESULTS),
        (204, None, False, Action.ACCEPTED),
        (400, "validation", True, Action.REJECTED),
        (400, "invalid_type", True, Action.REJECTED),
        (400, "bad_json", True, Action.REJECTED),
        (400, None, True, Action.REJECTED),
        (404, None, True, Action.PAUSE),
        (405, None, True, Action.PAUSE),
        (422, None, True, Action.REJECTED),
        (403, "invalid_token", True, Action.PAUSE),
        (403, "authorization", True, Action.PAUSE),
        (401, None, True, Action.PAUSE),
        (413, "too_large", True, Action.TOO_LARGE),
        (413, None, True, Action.TOO_LARGE),
        (408, None, True, Action.RETRY),
        (429, None, True, Action.RETRY),
        (500, None, True, Action.RETRY),
        (502, None, True, Action.RETRY),
        (503, "unknown", True, Action.RETRY),
        (504, None, True, Action.RETRY),
        (599, None, True, Action.RETRY),
        (301, None, True, Action.RETRY),
        (100, None, True, Action.RETRY),
    ],
)
def test_status_maps_to_one_action(status: int, error_type: str | None, batch: bool, action: Action) -> None:
    outcome = classify_response(status, error_type, None, batch=batch)
    assert outcome.action is action
    assert outcome.status == status


def test_reason_is_error_type_or_status() -> None:
    assert classify_response(400, "validation").reason == "validation"
    assert classify_response(502, None).reason == "http_502"


def test_throttled_only_for_429_or_retry_after() -> None:
    assert classify_response(429, None).throttled
    assert classify_response(503, "unknown", retry_after_s=2.0).throttled
    assert not classify_response(503, "unknown").throttled


def _connector_error(os_error: OSError) -> aiohttp.ClientConnectorError:
    key = aiohttp.client_reqrep.ConnectionKey("h", 1, False, False, None, None, None)
    return aiohttp.ClientConnectorError(key, os_error)


@pytest.mark.parametrize(
    ("exc", "upload_finished", "action", "reason"),
    [
        (TimeoutError(), True, Action.RETRY, "timeout"),
        (aiohttp.ServerTimeoutError("read"), True, Action.RETRY, "timeout"),
        (aiohttp.ConnectionTimeoutError("connect"), False, Action.RETRY, "timeout"),
        (_connector_error(ConnectionRefusedError(111, "refused")), False, Action.RETRY, "connect_error"),
        (_connector_error(socket.gaierror(-2, "Name or service not known")), False, Action.RETRY, "dns_error"),
        (aiohttp.ServerDisconnectedError(), True, Action.RETRY, "connection_reset"),
        (aiohttp.ClientOSError(104, "reset"), True, Action.RETRY, "connection_reset"),
        (aiohttp.ClientOSError(104, "reset"), False, Action.TOO_LARGE, "upload_reset"),
        (ConnectionResetError(), False, Action.TOO_LARGE, "upload_reset"),
        (aiohttp.ClientPayloadError("truncated"), True, Action.RETRY, "bad_response"),
    ],
)
def test_transport_error_maps_to_one_action(
    exc: BaseException, upload_finished: bool, action: Action, reason: str
) -> None:
    outcome = classify_transport_error(exc, upload_finished)
    assert outcome.action is action
    assert outcome.reason == reason
    assert outcome.status is None


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (10, 30.0), (10_000, 30.0), (0, 0.5)],
)
def test_backoff_ceiling_doubles_and_caps(attempt: int, ceiling: float) -> None:
    assert backoff_delay_s(attempt, 0.5, 30.0, uniform=lambda low, high: high) == ceiling
    assert backoff_delay_s(attempt, 0.5, 30.0, uniform=lambda low, high: low) == 0.0


def test_backoff_jitter_spreads_delays() -> None:
    delays = [backoff_delay_s(6, 0.5, 30.0) for _ in range(200)]
    assert min(delays) >= 0.0
    assert max(delays) <= 16.0
    assert len({round(delay, 3) for delay in delays}) > 150


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("2", 2.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("Tue, 14 Nov 2023 22:13:50 GMT", 30.0),
        ("Tue, 14 Nov 2023 22:13:00 GMT", 0.0),
        (None, None),
        ("", None),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("Tue, 14 Nov 2023 22:13:50", None),
        ("99999999999999999999999999", 1e26),
    ],
)
def test_retry_after_forms(header: str | None, seconds: float | None) -> None:
    parsed = parse_retry_after(header, NOW)
    if seconds is None:
        assert parsed is None
    else:
        assert parsed == pytest.approx(seconds, rel=1e-6)


def test_throttle_delay_caps_and_falls_back() -> None:
    assert throttle_delay_s(2.0, 3600.0, 9.0) == 2.0
    assert throttle_delay_s(86_400.0, 3600.0, 9.0) == 3600.0
    assert throttle_delay_s(None, 3600.0, 9.0) == 9.0
    assert throttle_delay_s(float("inf"), 3600.0, 9.0) == 9.0
