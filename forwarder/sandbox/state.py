"""Recorded sandbox state: accepted events per site, counters and the request log."""

from __future__ import annotations

import hashlib
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import orjson

# full: keep every accepted event and detect duplicates.
# digest: keep a 16-byte digest per distinct event, enough to count duplicates.
# count: keep counters only, for benchmarks with millions of events.
RecordMode = Literal["full", "digest", "count"]
RECORD_MODES: tuple[str, ...] = ("full", "digest", "count")

Outcome = Literal["response", "reset", "client_closed", "cancelled"]


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """An accepted event as the sandbox decoded it."""

    type: str
    data: Any


@dataclass(slots=True)
class RequestRecord:
    """One API request, as written to the request log.

    `status` is None when no response was sent, and `outcome` then gives the reason:
    `reset` (the sandbox aborted the connection), `client_closed` (the client
    disconnected first) or `cancelled` (the sandbox stopped during the request).
    `token` is the token's label, never the token itself. `events` counts the events
    in the body, and `accepted` those that were accepted.
    """

    time: float
    method: str
    path: str
    site: str | None
    token: str
    body_bytes: int
    content_length: int | None
    status: int | None
    outcome: Outcome
    error_type: str | None
    events: int
    accepted: int
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _digest(data: Any) -> bytes:
    return hashlib.blake2b(orjson.dumps(data, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


def _nested(counter: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    nested: dict[str, dict[str, int]] = {}
    for (site, event_type), value in counter.items():
        if value:
            nested.setdefault(site, {})[event_type] = value
    return nested


class SandboxState:
    """Accepted events, per-site counters and the request log of one sandbox.

    Only accepted events are recorded as received. A duplicate is an event with the
    same site, type and data (compared as JSON with sorted keys) as one accepted before.
    Duplicates are counted in the full and digest modes only.
    """

    def __init__(
        self, record: RecordMode = "full", request_log_limit: int | None = 100_000
    ) -> None:
        if record not in RECORD_MODES:
            raise ValueError(
                f"invalid record mode {record!r}: expected one of {', '.join(RECORD_MODES)}"
            )
        self.record: RecordMode = record
        self.request_log_limit = request_log_limit
        # Requests being handled, and those of them held by a hang fault.
        self.in_flight = 0
        self.hanging = 0
        self.clear()

    def clear(self) -> None:
        """Forget every event, counter and logged request. `in_flight` and `hanging` stay live."""
        self.received: dict[str, list[ReceivedEvent]] = {}
        self.accepted: Counter[tuple[str, str]] = Counter()
        self.rejected: Counter[tuple[str, str]] = Counter()
        self.duplicates: Counter[tuple[str, str]] = Counter()
        # The latest requests. The counters below cover every request.
        self.requests: deque[RequestRecord] = deque(maxlen=self.request_log_limit)
        self.requests_by_status: Counter[int | str] = Counter()
        self.total_requests = 0
        self.total_accepted = 0
        self.total_rejected = 0
        self.total_duplicates = 0
        self._digests: dict[tuple[str, str], set[bytes]] = {}

    def record_accepted(self, site: str, event_type: str, events: Sequence[Any]) -> None:
        """Record events of one type accepted for `site`, in the order they arrived."""
        if not events:
            return
        key = (site, event_type)
        self.accepted[key] += len(events)
        self.total_accepted += len(events)
        if self.record == "count":
            return
        seen = self._digests.setdefault(key, set())
        duplicates = 0
        for data in events:
            digest = _digest(data)
            if digest in seen:
                duplicates += 1
            else:
                seen.add(digest)
        if duplicates:
            self.duplicates[key] += duplicates
            self.total_duplicates += duplicates
        if self.record == "full":
            self.received.setdefault(site, []).extend(
                ReceivedEvent(event_type, data) for data in events
            )

    def record_rejected(self, site: str, event_type: str, count: int = 1) -> None:
        self.rejected[(site, event_type)] += count
        self.total_rejected += count

    def record_request(self, record: RequestRecord) -> None:
        self.requests.append(record)
        self.total_requests += 1
        self.requests_by_status[record.status if record.status is not None else record.outcome] += 1

    def events(self, site: str, event_type: str | None = None) -> list[ReceivedEvent]:
        """Return the accepted events of a site in arrival order, optionally of one type.

        Raises RuntimeError unless the record mode is `full`.
        """
        if self.record != "full":
            raise RuntimeError(
                f"events are not kept in record mode {self.record!r}: use record='full'"
            )
        events = self.received.get(site, [])
        if event_type is None:
            return list(events)
        return [event for event in events if event.type == event_type]

    def data(self, site: str, event_type: str) -> list[Any]:
        """Return the data of the accepted events of one site and type, in arrival order."""
        return [event.data for event in self.events(site, event_type)]

    def accepted_count(self, site: str | None = None, event_type: str | None = None) -> int:
        """Return the number of accepted events, optionally only of one site and/or type."""
        return sum(_matching(self.accepted, site, event_type))

    def duplicate_count(self, site: str | None = None, event_type: str | None = None) -> int:
        return sum(_matching(self.duplicates, site, event_type))

    def stats(self) -> dict[str, Any]:
        """Return the counters as JSON-ready data, as served at /_sandbox/stats."""
        tracks_duplicates = self.record != "count"
        return {
            "record": self.record,
            "requests": {
                "total": self.total_requests,
                "in_flight": self.in_flight,
                "hanging": self.hanging,
                "by_status": {
                    str(key): value
                    for key, value in sorted(self.requests_by_status.items(), key=str)
                },
            },
            "accepted": {"total": self.total_accepted, "by_site": _nested(self.accepted)},
            "rejected": {"total": self.total_rejected, "by_site": _nested(self.rejected)},
            "duplicates": {
                "total": self.total_duplicates if tracks_duplicates else None,
                "by_site": _nested(self.duplicates) if tracks_duplicates else None,
            },
        }

    def summary(self) -> str:
        """Return a one-line summary for error messages."""
        statuses = ", ".join(
            f"{key}: {value}" for key, value in sorted(self.requests_by_status.items(), key=str)
        )
        return (
            f"{self.total_requests} requests ({statuses or 'none'}), {self.in_flight} in flight "
            f"({self.hanging} hanging), "
            f"{self.total_accepted} events accepted, {self.total_rejected} rejected, "
            f"{self.total_duplicates} duplicates"
        )


def _matching(
    counter: Counter[tuple[str, str]], site: str | None, event_type: str | None
) -> Iterable[int]:
    for (counted_site, counted_type), value in counter.items():
        if (site is None or counted_site == site) and (
            event_type is None or counted_type == event_type
        ):
            yield value
