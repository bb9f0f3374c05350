"""Prometheus metrics of one daemon process.

Label values are bounded: `site` by the sites the shop has, `type` by the ten event
types, `reason` and `outcome` by the fixed sets below (anything else becomes "other").
Counters are incremented once per chunk or batch, never once per event.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from forwarder.envelope import EVENT_TYPES

DEAD_REASONS = frozenset(
    {
        "invalid_json", "invalid_utf8", "not_an_object", "missing_field", "invalid_site_id",
        "invalid_type", "invalid_data", "invalid_envelope", "unknown_type", "event_too_large",
        "validation", "bad_json", "retries_exhausted", "max_outage_exceeded", "rejected",
        "schema_validation", "site_mismatch", "unknown",
    }
)
OUTCOMES = frozenset(
    {
        "ok", "rejected", "too_large", "paused", "retry", "throttled", "timeout",
        "connect_error", "dns_error", "connection_reset", "upload_reset", "bad_response",
    }
)
SITE_STATES = ("ok", "retrying", "paused")


def bounded(value: str, allowed: frozenset[str]) -> str:
    return value if value in allowed else "other"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_received = Counter(
            "jirafe_forwarder_events_received", "Queue entries claimed from the producer list.",
            ["site", "type"], registry=r,
        )
        self.events_delivered = Counter(
            "jirafe_forwarder_events_delivered", "Events the API accepted.", ["site", "type"], registry=r
        )
        self._received: dict[tuple[str, int], Any] = {}
        self._delivered: dict[tuple[str, int], Any] = {}
        self.events_dead = Counter(
            "jirafe_forwarder_events_dead_lettered", "Events written to the dead-letter store.",
            ["site", "type", "reason"], registry=r,
        )
        self.requests = Counter(
            "jirafe_forwarder_requests", "API requests by outcome.", ["site", "outcome"], registry=r
        )
        self.retries = Counter(
            "jirafe_forwarder_retries", "Retry decisions (backoff, throttle, split, pause probe).",
            ["site", "kind"], registry=r,
        )
        self.unreadable_results = Counter(
            "jirafe_forwarder_unreadable_batch_results",
            "2xx batch responses without readable per-event results (all events acknowledged).",
            registry=r,
        )
        self.request_seconds = Histogram(
            "jirafe_forwarder_request_duration_seconds", "API request latency.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r,
        )
        self.batch_bytes = Histogram(
            "jirafe_forwarder_batch_size_bytes", "Request body size.",
            buckets=(1e3, 1e4, 1e5, 5e5, 1e6, 2.5e6, 5e6, 1e7), registry=r,
        )
        self.batch_events = Histogram(
            "jirafe_forwarder_batch_size_events", "Events per request.",
            buckets=(1, 2, 5, 10, 50, 100, 250, 500, 1000, 5000), registry=r,
        )
        self.backlog = Gauge(
            "jirafe_forwarder_backlog_events", "Entries waiting in the producer list.", registry=r
        )
        self.claimed = Gauge(
            "jirafe_forwarder_claimed_events", "Entries claimed by the intake and not yet routed.", registry=r
        )
        self.lane_backlog = Gauge(
            "jirafe_forwarder_site_backlog_events", "Events queued per site and lane (batch, pageview, visit).",
            ["site", "lane"], registry=r,
        )
        self.site_state = Gauge(
            "jirafe_forwarder_site_state", "1 for the current state of each site lane.",
            ["site", "lane", "state"], registry=r,
        )
        self.dead_entries = Gauge(
            "jirafe_forwarder_dead_letter_entries", "Dead letters stored.", registry=r
        )
        self.dead_fill = Gauge(
            "jirafe_forwarder_dead_letter_fill_ratio", "Dead-letter store fill, 0 to 1 (max of entries and bytes).",
            registry=r,
        )
        self.dead_full = Gauge(
            "jirafe_forwarder_dead_letter_full", "1 while the dead-letter store is full and intake is stopped.",
            registry=r,
        )
        self.up = Gauge("jirafe_forwarder_ready", "1 once Redis is reachable and the pipeline runs.", registry=r)

    def count_received(self, site: str, type_index: int, number: int) -> None:
        self._child(self._received, self.events_received, site, type_index).inc(number)

    def count_delivered(self, site: str, type_index: int, number: int) -> None:
        self._child(self._delivered, self.events_delivered, site, type_index).inc(number)

    @staticmethod
    def _child(cache: dict[tuple[str, int], Any], counter: Counter, site: str, type_index: int) -> Any:
        # Counted per chunk and per batch for each site and type: labels() validates and
        # locks on every call, so its result is kept.
        child = cache.get((site, type_index))
        if child is None:
            child = cache[(site, type_index)] = counter.labels(site, EVENT_TYPES[type_index])
        return child

    def set_site_state(self, site: str, lane: str, state: str) -> None:
        for name in SITE_STATES:
            self.site_state.labels(site, lane, name).set(1 if name == state else 0)
