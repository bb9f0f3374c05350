"""Sending one lane: a site's batch lane or one of its tracker lanes.

A lane task owns the lane's lease, reads a prefix of the lane from Redis, sends it,
and acknowledges it. Events leave Redis only in that acknowledgement, so a crash at
any point leaves them in the lane for the next owner. Because every request is a
prefix of the lane, per-site per-type order is kept across retries and bisection.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from forwarder.backoff import backoff_delay_s, throttle_delay_s
from forwarder.batch import read_failures
from forwarder.blocks import MAX_BLOCK_BYTES, encode_block
from forwarder.envelope import LANE_BATCH, Item, split_lane
from forwarder.logs import get_logger
from forwarder.metrics import DEAD_REASONS, OUTCOMES, bounded
from forwarder.outcome import Action, Outcome
from forwarder.redis_store import Peek

if TYPE_CHECKING:
    from forwarder.daemon import Daemon

log = get_logger(__name__)

_ack_ids = itertools.count()

# A lane must not bisect below this body size after a 413: the API's documented
# limit is 10 MB, and a server that rejects a kilobyte is broken, not small.
MIN_BYTE_CEILING = 1024


@dataclass(slots=True)
class LaneState:
    """In-memory view of one lane; the persistent part (attempts) lives in Redis."""

    cap_events: int
    failures: int = 0
    # Monotonic time the current failure streak began. A success anywhere after it shows
    # that the API works, so the failing events themselves are at fault.
    failing_since: float | None = None
    # How many events at the head of the lane were in a failed request and are not yet
    # acknowledged: while any remain, bisection is isolating a culprit among them and
    # the successes of their neighbours do not end the failure streak.
    suspects: int = 0
    # Consecutive throttled responses (429 or Retry-After), which never count as attempts.
    throttles: int = 0
    # The current wait is one the API asked for (Retry-After), so it is never cut short.
    throttled: bool = False
    state: str = "ok"
    last_error: str | None = None
    last_success_ms: int | None = None
    # Events and bytes per lane element seen in the last read, which size the next read.
    events_per_block: float = 8.0
    bytes_per_block: float = MAX_BLOCK_BYTES
    extra: dict[str, Any] = field(default_factory=dict)

    def state_json(self) -> bytes:
        return orjson.dumps({
            "state": self.state, "last_error": self.last_error, "last_success_ms": self.last_success_ms,
            "throttled": self.throttled,
        })


class LaneLost(Exception):
    """The lane's lease now belongs to another instance; stop without touching it."""


class LaneSender:
    def __init__(self, daemon: Daemon, lane: str, lease_token: str, flush_only: bool) -> None:
        self.daemon = daemon
        self.lane = lane
        # Every lane operation presents this token, so it acts only under this lease.
        self.lease_token = lease_token
        self.last_ack_status = 0
        self.site_id, self.kind = split_lane(lane)
        self.tracker = self.kind != LANE_BATCH
        self.flush_only = flush_only
        config = daemon.config
        self.state = daemon.lane_states.get(lane)
        if self.state is None:
            self.state = daemon.lane_states[lane] = LaneState(cap_events=config.batch.max_events)

    async def run(self) -> None:
        daemon = self.daemon
        store = daemon.store
        sent_batches = 0
        while True:
            max_count = 1 if self.tracker else self.state.cap_events
            peek = await daemon.redis_call(
                store.peek, self.lease_token, self.lane, max_count, daemon.byte_ceiling,
                self.state.events_per_block, self.state.bytes_per_block,
            )
            if peek.prefix.count:
                self.state.events_per_block = peek.prefix.count / len(peek.prefix.sources)
                self.state.bytes_per_block = peek.bytes_read / peek.blocks_read
            if peek.status < 0:
                log.info("lane lease lost", lane=self.lane)
                return
            if peek.count == 0:
                await self._ack(peek, 0, [], keep_lease=False)
                return
            # Read at each batch, so that a reload's new token applies to the next request.
            token = daemon.config.token_for(self.site_id)
            if token is None:
                await self._pause(peek, "no token configured for this site", None)
                return

            # Only the configured limit dead-letters an event unsent. A ceiling learned
            # from a 413 limits batches, but a single event above it is still sent, and
            # only the API's own 413 for that event dead-letters it.
            if peek.count == 1 and peek.body_bytes > daemon.config.api.max_batch_bytes:
                item = self._items(peek)[0]
                meta = self._dead_meta(item, "event_too_large", None, None, peek, size=peek.body_bytes)
                if not await self._ack(peek, 1, [(0, meta)], keep_lease=True):
                    return
                continue

            body = peek.prefix.body(self.tracker)
            if self.tracker:
                url = daemon.api.tracker_url(self.kind)
            else:
                url = daemon.api.batch_url(self.site_id)

            async with daemon.request_slots:
                response = await daemon.api.post(url, token, body, batch=not self.tracker)
            outcome = response.outcome
            self._observe(outcome, peek.count, len(body), response.elapsed_s)
            sent_batches += 1

            more = await self._handle(outcome, response.body, peek, len(body))
            if not more or daemon.stopping.is_set() or (self.flush_only and sent_batches >= 1):
                if more:
                    # The lease is still ours after a kept ack: hand the rest back now.
                    await daemon.redis_call(store.release_instance_lane, self.lease_token, self.lane)
                return

    def _items(self, peek: Peek) -> list[Item]:
        """Return the prefix's events with their envelopes, needed only to dead-letter some."""
        items = []
        for type_index, envelope, offset, length in peek.prefix.events():
            view = memoryview(envelope)
            items.append(Item(type_index, view, view[offset : offset + length]))
        return items

    async def _handle(self, outcome: Outcome, payload: bytes, peek: Peek, size: int) -> bool:
        """Act on one outcome; return True when the lane task keeps the lease for another batch."""
        daemon = self.daemon
        config = daemon.config
        state = self.state
        count = peek.count
        action = outcome.action

        if action in (Action.RESULTS, Action.ACCEPTED):
            dead: list[tuple[int, bytes]] = []
            if action is Action.RESULTS and not self.tracker:
                failures = read_failures(payload, peek.prefix.type_counts(), peek.type_sequence)
                if failures is None:
                    daemon.metrics.unreadable_results.inc()
                    log.warning("batch response without per-event results, all events acknowledged",
                                lane=self.lane, events=count, status=outcome.status)
                elif failures:
                    items = self._items(peek)
                    for position, result in failures:
                        reason = result.error_type or "rejected"
                        dead.append((position, self._dead_meta(
                            items[position], reason, outcome.status, result.error_body, peek)))
            if self._succeeded(peek.now_ms, count):
                await daemon.bring_forward_retries(peek.now_ms)
            state.cap_events = min(config.batch.max_events, state.cap_events * 2)
            more = await self._ack(peek, count, dead, keep_lease=False)
            if self.last_ack_status != -1:
                # Popped (with a full dead-letter store, all but the failed events).
                self._count_delivered(peek, {position for position, _ in dead})
            return more

        state.last_error = f"{outcome.reason} (HTTP {outcome.status})" if outcome.status else outcome.reason

        if action is Action.REJECTED or (action is Action.TOO_LARGE and outcome.status == 413):
            if action is Action.TOO_LARGE and count > 1:
                # The server's limit is below this body: later batches stay under it.
                daemon.byte_ceiling = max(MIN_BYTE_CEILING, min(daemon.byte_ceiling, size - 1))
                log.warning("API rejected a body as too large, lowering the batch size limit",
                            lane=self.lane, body_bytes=size, new_limit_bytes=daemon.byte_ceiling)
            if count > 1:
                state.cap_events = max(1, count // 2)
                daemon.metrics.retries.labels(self.site_id, "split").inc()
                log.info("splitting batch", lane=self.lane, events=count, next_events=state.cap_events,
                         reason=outcome.reason, status=outcome.status)
                return True
            reason = "event_too_large" if action is Action.TOO_LARGE else outcome.reason
            item = self._items(peek)[0]
            meta = self._dead_meta(item, reason, outcome.status, payload, peek, size=size)
            return await self._ack(peek, 1, [(0, meta)], keep_lease=True)

        if action is Action.PAUSE:
            await self._pause(peek, outcome.reason, outcome.status)
            return False

        # RETRY, and TOO_LARGE from a reset upload: transient, back off.
        if outcome.throttled:
            # Consecutive throttles grow the fallback delay like failures do, without
            # counting as attempts; a Retry-After of 0 or in the past still waits base_s.
            state.throttles += 1
            fallback = backoff_delay_s(state.throttles, config.retry.base_s, config.retry.cap_s)
            delay = throttle_delay_s(outcome.retry_after_s, config.retry.max_retry_after_s, fallback)
            delay = max(delay, config.retry.base_s)
            daemon.metrics.retries.labels(self.site_id, "throttled").inc()
            log.info("throttled, retrying later", lane=self.lane, status=outcome.status,
                     delay_s=round(delay, 3), retry_after_s=outcome.retry_after_s)
            state.state = "retrying"
            await self._retry_later(delay, count_attempt=False, throttled=True)
            return False

        now = time.monotonic()
        if state.failing_since is None:
            state.failing_since = now
        state.suspects = max(state.suspects, count)
        state.failures += 1
        # Evidence that the API works for others: a success anywhere after this lane
        # started failing. Without it the failure is treated as an outage.
        others_succeed = daemon.last_success > state.failing_since
        if count > 1:
            state.cap_events = max(1, count // 2)
            if others_succeed:
                daemon.metrics.retries.labels(self.site_id, "split").inc()
                log.info("splitting batch that fails while other requests succeed", lane=self.lane,
                         events=count, next_events=state.cap_events, reason=outcome.reason)
                return True
            delay = backoff_delay_s(state.failures, config.retry.base_s, config.retry.cap_s)
            state.state = "retrying"
            daemon.metrics.retries.labels(self.site_id, "backoff").inc()
            log.warning("request failed, retrying with backoff", lane=self.lane, events=count,
                        reason=outcome.reason, status=outcome.status, delay_s=round(delay, 3),
                        failures=state.failures)
            await self._retry_later(delay, count_attempt=False)
            return False

        attempts = peek.attempts + 1
        first_ms = peek.first_attempt_ms or peek.now_ms
        outage_expired = peek.now_ms - first_ms >= config.retry.max_outage_s * 1000
        if (attempts >= config.retry.max_attempts and others_succeed) or outage_expired:
            reason = "max_outage_exceeded" if outage_expired and not others_succeed else "retries_exhausted"
            item = self._items(peek)[0]
            meta = self._dead_meta(item, reason, outcome.status, payload, peek, attempts=attempts,
                                   detail=state.last_error)
            return await self._ack(peek, 1, [(0, meta)], keep_lease=True,
                                   keep_failure_start=reason == "max_outage_exceeded")
        delay = backoff_delay_s(attempts, config.retry.base_s, config.retry.cap_s)
        state.state = "retrying"
        daemon.metrics.retries.labels(self.site_id, "backoff").inc()
        log.warning("event failed, retrying with backoff", lane=self.lane, attempts=attempts,
                    reason=outcome.reason, status=outcome.status, delay_s=round(delay, 3))
        await self._retry_later(delay, count_attempt=True)
        return False

    def _succeeded(self, now_ms: int, count: int) -> bool:
        """Record a success; return True when it is the first after a quiet spell.

        After an outage, that first success is the sign that the API is back, and the
        lanes still backing off from it can be tried again soon.
        """
        state = self.state
        daemon = self.daemon
        now = time.monotonic()
        first_after_gap = now - daemon.last_success > max(1.0, 2 * daemon.config.retry.base_s)
        daemon.last_success = now
        if state.state != "ok":
            log.info("site lane recovered", lane=self.lane, previous_state=state.state, failures=state.failures)
        state.state = "ok"
        state.throttles = 0
        state.throttled = False
        self._settled(count)
        state.last_success_ms = now_ms
        daemon.metrics.set_site_state(self.site_id, self.kind, "ok")
        return first_after_gap

    def _settled(self, count: int) -> None:
        """Count `count` head events as delivered or dead; end the streak when no suspect is left."""
        state = self.state
        state.suspects = max(0, state.suspects - count)
        if state.suspects == 0:
            state.failures = 0
            state.failing_since = None
            if state.state == "retrying":
                state.state = "ok"

    async def _pause(self, peek: Any, reason: str, status: int | None) -> None:
        daemon = self.daemon
        config = daemon.config
        state = self.state
        state.failures += 1
        delay = backoff_delay_s(state.failures, config.retry.pause_base_s, config.retry.pause_cap_s)
        # Probe no sooner than half the base, so a paused site is never polled in a loop.
        delay = max(delay, config.retry.pause_base_s / 2)
        if state.state != "paused":
            if status in (404, 405):
                message = "site paused: the API does not serve this path, check api.base_url; events are kept"
            elif status is None:
                message = "site paused: no token configured for this site; events are kept"
            else:
                message = "site paused: the API rejected its credentials; events are kept"
            log.error(message, lane=self.lane, site=self.site_id, reason=reason, status=status)
        state.state = "paused"
        state.last_error = f"{reason} (HTTP {status})" if status else reason
        daemon.metrics.set_site_state(self.site_id, self.kind, "paused")
        daemon.metrics.retries.labels(self.site_id, "pause_probe").inc()
        await self._retry_later(delay, count_attempt=False)

    async def _retry_later(self, delay_s: float, count_attempt: bool, throttled: bool = False) -> None:
        daemon = self.daemon
        self.state.throttled = throttled
        if self.state.state == "retrying":
            daemon.metrics.set_site_state(self.site_id, self.kind, "retrying")
        await daemon.redis_call(
            daemon.store.retry_later, self.lease_token, self.lane, int(delay_s * 1000), count_attempt,
            self.state.state_json(),
        )

    async def _ack(
        self, peek: Peek, pop_count: int, dead: list[tuple[int, bytes]], keep_lease: bool,
        keep_failure_start: bool = False,
    ) -> bool:
        """Pop `pop_count` events (all of the prefix, or 0) and write the dead letters."""
        daemon = self.daemon
        config = daemon.config
        now_ms = peek.now_ms
        dead_letters: list[tuple[bytes, bytes]] = []
        back: tuple[bytes, int, int] = (b"", 0, 0)
        if dead:
            events = peek.prefix.events()
            failed = [events[position] for position, _ in dead]
            dead_letters = [(events[position][1], meta) for position, meta in dead]
            back = (encode_block(failed), len(failed), sum(length + 1 for _, _, _, length in failed))
        if dead and pop_count == 1:
            # Settle the dead-lettered head first, so that the state stored with this
            # ack is already "ok" when nothing else failed.
            self._settled(1)
        ack_id = f"{daemon.instance_id}:{next(_ack_ids)}"
        status, _ = await daemon.redis_call(
            daemon.store.ack, self.lease_token, self.lane, ack_id, peek.prefix, pop_count > 0,
            # A tracker lane sends one event per request, so any event left is a full
            # request's worth and the lease is kept for it.
            now_ms + config.batch.linger_ms, 1 if self.tracker else config.batch.max_events, daemon.byte_ceiling,
            config.dead_letter.max_entries, config.dead_letter.max_bytes, daemon.lease_ttl_ms,
            keep_lease and not daemon.stopping.is_set(), self.state.state_json(), dead_letters, back,
            keep_failure_start,
        )
        self.last_ack_status = status
        if status == -2:
            daemon.set_dead_full(True)
            log.error("dead-letter store is full: lane waits until it is emptied", lane=self.lane,
                      dead_letters_needed=len(dead))
            self.state.state = "retrying"
            self.state.last_error = "dead-letter store full"
            # The failed events now lead the lane. A smaller next batch also needs fewer
            # dead letters at once, so a batch with more failures than the store has room
            # for does not come back unchanged forever.
            self.state.cap_events = max(1, min(self.state.cap_events, len(dead)) // 2)
            await self._retry_later(5.0, count_attempt=False)
            return False
        if status == -1:
            log.warning("lane lease lost before acknowledgement; the new owner resends", lane=self.lane)
            return False
        for _, meta in dead:
            self._log_dead(meta)
        return status == 1

    def _dead_meta(
        self, item: Item, reason: str, status: int | None, payload: bytes | None, peek: Any,
        size: int | None = None, attempts: int | None = None, detail: str | None = None,
    ) -> bytes:
        excerpt_bytes = self.daemon.config.dead_letter.excerpt_bytes
        response = None
        if payload:
            response = payload[:excerpt_bytes].decode("utf-8", "replace")
        return orjson.dumps(
            {
                "reason": reason,
                "site_id": self.site_id,
                "type": item.type,
                "id": _event_id(item),
                "status": status,
                "response": response,
                "detail": detail,
                "size": size,
                "attempts": attempts if attempts is not None else peek.attempts + 1,
                "first_attempt_ms": peek.first_attempt_ms or peek.now_ms,
                "last_attempt_ms": peek.now_ms,
            }
        )

    def _log_dead(self, meta: bytes) -> None:
        record = orjson.loads(meta)
        reason = record["reason"]
        event_type = record["type"]
        self.daemon.metrics.events_dead.labels(self.site_id, event_type, bounded(reason, DEAD_REASONS)).inc()
        log.warning("event dead-lettered", lane=self.lane, site=self.site_id, type=event_type,
                    event_id=record.get("id"), reason=reason, status=record.get("status"),
                    attempts=record.get("attempts"))

    def _count_delivered(self, peek: Peek, failed: set[int]) -> None:
        # Per type from the groups; only failed positions need a look at the sequence.
        failed_by_type: dict[int, int] = {}
        for position in failed:
            type_index = peek.type_sequence[position]
            failed_by_type[type_index] = failed_by_type.get(type_index, 0) + 1
        delivered = 0
        for type_index, count in peek.prefix.type_counts():
            number = count - failed_by_type.get(type_index, 0)
            if number:
                self.daemon.metrics.count_delivered(self.site_id, type_index, number)
                delivered += number
        self.daemon.delivered_total += delivered

    def _observe(self, outcome: Outcome, count: int, size: int, elapsed_s: float) -> None:
        metrics = self.daemon.metrics
        if outcome.throttled:
            label = "throttled"
        elif outcome.action is Action.RETRY:
            # A transport failure by its kind; an HTTP 5xx as "retry".
            label = "retry" if outcome.status is not None else outcome.reason
        else:
            label = _OUTCOME_LABELS[outcome.action]
        metrics.requests.labels(self.site_id, bounded(label, OUTCOMES)).inc()
        metrics.request_seconds.observe(elapsed_s)
        metrics.batch_bytes.observe(size)
        metrics.batch_events.observe(count)


_OUTCOME_LABELS = {
    Action.RESULTS: "ok",
    Action.ACCEPTED: "ok",
    Action.REJECTED: "rejected",
    Action.TOO_LARGE: "too_large",
    Action.PAUSE: "paused",
}


def _event_id(item: Item) -> str | None:
    # The producer's optional id; parsed again only for dead letters, which are rare.
    try:
        parsed = orjson.loads(item.raw)
    except orjson.JSONDecodeError:
        return None
    value = parsed.get("id") if isinstance(parsed, dict) else None
    return None if value is None else str(value)
