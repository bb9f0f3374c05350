"""Classification of one API request's outcome into exactly one policy action.

Pure: no I/O, no clock. `classify_response` covers every HTTP status and
`classify_transport_error` every transport failure; the daemon acts on the result.
"""

from __future__ import annotations

import asyncio
import enum
import socket
from dataclasses import dataclass

import aiohttp


class Action(enum.Enum):
    # 2xx with per-event results: ack the successes, dead-letter each failed element.
    RESULTS = "results"
    # 2xx whose body cannot be read as per-event results (or a single event's 2xx): ack all.
    ACCEPTED = "accepted"
    # 400 for the request: dead-letter a single event, bisect a batch of several.
    REJECTED = "rejected"
    # 413 or a reset during upload: bisect and remember a smaller size ceiling.
    TOO_LARGE = "too_large"
    # 401, 403, 404, 405: pause the lane and keep its events; probe again with long backoff.
    PAUSE = "pause"
    # 429, 5xx, timeouts, connection and DNS errors: back off and retry.
    RETRY = "retry"


class Transport(enum.Enum):
    TIMEOUT = "timeout"
    CONNECT = "connect_error"
    DNS = "dns_error"
    RESET = "connection_reset"
    UPLOAD_RESET = "upload_reset"
    PAYLOAD = "bad_response"


@dataclass(slots=True, frozen=True)
class Outcome:
    action: Action
    # A short label for logs, metrics and dead letters: the error_type or transport kind.
    reason: str
    status: int | None = None
    # Retry-After in seconds when the server sent a valid one; the wait is a throttle,
    # not a failed attempt.
    retry_after_s: float | None = None

    @property
    def throttled(self) -> bool:
        return self.retry_after_s is not None or self.status == 429


def classify_response(
    status: int, error_type: str | None, retry_after_s: float | None = None, batch: bool = True
) -> Outcome:
    """Map an HTTP status (and the body's error_type, when any) to one action."""
    reason = error_type or f"http_{status}"
    if 200 <= status < 300:
        return Outcome(Action.RESULTS if batch else Action.ACCEPTED, "ok", status)
    if status == 413:
        return Outcome(Action.TOO_LARGE, error_type or "too_large", status)
    if status in (401, 403, 404, 405):
        # Wrong credentials, or a wrong api.base_url or method: the events are fine, so
        # keep them and wait for the operator rather than dead-letter the backlog.
        return Outcome(Action.PAUSE, reason, status)
    if status == 429 or status == 408 or status >= 500:
        return Outcome(Action.RETRY, reason, status, retry_after_s)
    if 400 <= status < 500:
        # 400 bad_json / invalid_type / validation, and the other 4xx such as 422: the
        # request itself is wrong, so resending it as is cannot help. Bisecting finds
        # the events at fault.
        return Outcome(Action.REJECTED, reason, status)
    # 1xx and 3xx are not expected from this API: redirects are not followed, so treat
    # them as a server fault and retry.
    return Outcome(Action.RETRY, reason, status, retry_after_s)


def classify_transport_error(exc: BaseException, upload_finished: bool) -> Outcome:
    """Map a transport failure to one action; a reset before the body was sent is TOO_LARGE."""
    kind = transport_kind(exc, upload_finished)
    if kind is Transport.UPLOAD_RESET:
        return Outcome(Action.TOO_LARGE, kind.value)
    return Outcome(Action.RETRY, kind.value)


def transport_kind(exc: BaseException, upload_finished: bool) -> Transport:
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return Transport.TIMEOUT
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = getattr(exc, "os_error", None)
        if isinstance(os_error, socket.gaierror):
            return Transport.DNS
        return Transport.CONNECT
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ContentTypeError):
        return Transport.PAYLOAD
    if isinstance(exc, aiohttp.ClientOSError | aiohttp.ServerDisconnectedError | ConnectionError):
        return Transport.RESET if upload_finished else Transport.UPLOAD_RESET
    return Transport.RESET if upload_finished else Transport.UPLOAD_RESET
