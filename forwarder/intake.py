"""The intake: reads entries from the producer list and routes them to site lanes.

One instance at a time is the intake leader, so that entries are routed in exactly
the order producers pushed them, also when several instances share one queue. The
leader reads the oldest entries without removing them, and one script removes them
and appends them to their lanes, so a crash between the two loses and reorders nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import orjson

from forwarder.batch import single_event_size
from forwarder.blocks import MAX_BLOCK_EVENTS, BlockBuilder
from forwarder.envelope import (
    TRACKER_TYPES,
    TYPE_INDEX,
    EnvelopeError,
    decode_envelope,
    find_data,
    parse_envelope,
    split_lane,
)
from forwarder.logs import get_logger
from forwarder.metrics import DEAD_REASONS, bounded

if TYPE_CHECKING:
    from forwarder.daemon import Daemon

log = get_logger(__name__)

# Slack on top of max_batch_bytes for the envelope around `data` (site_id, type, id).
ENVELOPE_SLACK_BYTES = 4096
# The daemon keeps a chunk's entries in memory while it routes them, so a chunk is
# bounded by count and, from the sizes of the previous chunk, by bytes.
MAX_CHUNK_EVENTS = 5000
CHUNK_BYTES = 16 * 1024 * 1024
# Site and type pairs remembered for the fast path; the cache starts over when full.
MAX_ROUTES = 10_000


@dataclass(slots=True, frozen=True)
class _Route:
    """Destination of events of one site and batch type, checked in full once before."""

    lane: str
    type_index: int
    # Bytes a batch body of one such event has besides its data.
    overhead: int


class Intake:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.leader = False
        self._chunk_ids = itertools.count()
        self._routes: dict[tuple[str | int, str], _Route] = {}
        # Mean size of the entries of the last chunk.
        self._entry_bytes = 1
        self._validators: dict[str, Callable[[Any], Any]] = {}

    async def run(self) -> None:
        daemon = self.daemon
        store = daemon.store
        while not daemon.stopping.is_set():
            # Read on every pass, so that a reload's limits apply to the next claim.
            config = daemon.config
            # NOTE: the first read after a run of small entries can still bring a chunk
            # of large ones into memory. Only the next read is cut down.
            chunk = min(config.batch.intake_chunk_events, MAX_CHUNK_EVENTS,
                        max(1, CHUNK_BYTES // self._entry_bytes))
            if not self.leader:
                self.leader = await daemon.redis_call(
                    store.acquire_leadership, daemon.instance_id, daemon.lease_ttl_ms
                )
                if not self.leader:
                    await daemon.wait_stopping(config.lease.renew_interval_s)
                    continue
                log.info("intake leadership acquired", instance=daemon.instance_id)
                await self._hand_back_claimed()
            readable, items = await daemon.redis_call(
                store.read_chunk, chunk, config.dead_letter.max_entries, config.dead_letter.max_bytes,
            )
            if not readable:
                daemon.set_dead_full(True)
                log.error("dead-letter store is full: intake stopped until dead letters are replayed or purged",
                          max_entries=config.dead_letter.max_entries)
                await daemon.wait_stopping(1.0)
                continue
            daemon.set_dead_full(False)
            if not items:
                # Block until a producer pushes. Moving the oldest entry to the same end
                # of the same list changes nothing, so no entry ever leaves Redis here.
                await daemon.redis_call(
                    daemon.redis.blmove, store.keys.events, store.keys.events,
                    config.redis.block_timeout_s, "RIGHT", "RIGHT",
                )
                continue
            self._entry_bytes = max(1, sum(map(len, items)) // len(items))
            await self.route(items)

    async def _hand_back_claimed(self) -> None:
        # Left by a version before lane blocks: entries in a claimed list, and lanes
        # without an event count.
        returned = await self.daemon.redis_call(self.daemon.store.return_claimed, self.daemon.instance_id)
        if returned > 0:
            log.info("claimed entries handed back to the queue", events=returned)
        counted = await self.daemon.redis_call(self.daemon.store.count_legacy_lanes)
        if counted:
            log.info("lanes from an earlier version counted", lanes=counted)

    async def route(self, items: list[bytes]) -> None:
        daemon = self.daemon
        config = daemon.config
        max_bytes = config.api.max_batch_bytes
        max_entry_bytes = max_bytes + ENVELOPE_SLACK_BYTES
        builders: dict[str, BlockBuilder] = {}
        dead: list[tuple[int, bytes]] = []
        routes = self._routes
        if config.batch.validate_events:
            routes = {}
        decode = decode_envelope
        for index, raw in enumerate(items):
            # Fast path: an ASCII envelope of a batch type for a site and type routed
            # before (so both are known to be valid), with schema validation off. It
            # skips the checks that parse_envelope repeats for every entry; anything
            # else, and every problem, takes the full path.
            if raw.isascii() and len(raw) <= max_entry_bytes:
                try:
                    envelope = decode(raw)
                except (msgspec.DecodeError, RecursionError):
                    envelope = None
                if envelope is not None:
                    route = routes.get((envelope.site_id, envelope.type))
                    if route is not None:
                        data = envelope.data
                        offset = find_data(raw, data)
                        if raw[offset] == 123 and len(data) + route.overhead <= max_bytes:
                            builder = builders.get(route.lane)
                            if builder is None:
                                builder = builders[route.lane] = BlockBuilder()
                            builder.add(route.type_index, raw, data, offset)
                            continue
            self._route_entry(index, raw, builders, dead)

        routed = {}
        for lane, builder in builders.items():
            blocks = builder.finish()
            routed[lane] = (builder.events, builder.data_bytes + builder.events, blocks)
        chunk_id = f"{daemon.instance_id}:{next(self._chunk_ids)}"
        conflicts = 0
        while True:
            result = await daemon.redis_call(
                daemon.store.route, daemon.instance_id, chunk_id, len(items), items[0], config.batch.linger_ms,
                config.batch.max_events, daemon.byte_ceiling, config.dead_letter.max_entries,
                config.dead_letter.max_bytes, routed, dead,
            )
            # A watched key changed (a renewal of the leadership): try again, and the
            # checks decide afresh.
            if result != -4:
                break
            conflicts += 1
            if conflicts % 10 == 0:
                log.warning("route transaction keeps being aborted by changes to watched keys",
                            attempts=conflicts, events=len(items))
                await daemon.wait_stopping(min(1.0, 0.01 * conflicts))
        if result == -1:
            log.warning("intake leadership lost", instance=daemon.instance_id,
                        detail="the chunk stays in the queue for the next leader")
            self.leader = False
            return
        if result == -2:
            daemon.set_dead_full(True)
            log.error("dead-letter store is full: intake stopped until dead letters are replayed or purged",
                      max_entries=config.dead_letter.max_entries, dead_letters_needed=len(dead))
            await daemon.wait_stopping(1.0)
            return
        if result == -3:
            log.error("oldest queue entry changed under the intake leader; re-reading the queue", events=len(items))
            return
        metrics = daemon.metrics
        for lane, builder in builders.items():
            site = split_lane(lane)[0]
            for type_index, number in enumerate(builder.type_counts):
                if number:
                    metrics.count_received(site, type_index, number)
        for index, meta in dead:
            record = orjson.loads(meta)
            # Label values come from producer input here, so only well-formed site ids
            # and known types become labels: the series count stays bounded.
            site = record.get("site_id")
            event_type = record.get("type")
            metrics.events_dead.labels(
                site if isinstance(site, str) and site.isdigit() and len(site) <= 32 else "invalid",
                event_type if event_type in TYPE_INDEX else "unknown",
                bounded(record["reason"], DEAD_REASONS),
            ).inc()
            log.warning("queue entry dead-lettered", reason=record["reason"], detail=record.get("detail"),
                        site=record.get("site_id"), type=record.get("type"), entry_bytes=len(items[index]))
        daemon.routed_total += len(items)
        daemon.wake_scheduler()

    def _route_entry(self, index: int, raw: bytes, builders: dict[str, BlockBuilder],
                     dead: list[tuple[int, bytes]]) -> None:
        """Check one entry in full and add it to its lane, or to `dead` with the reason."""
        config = self.daemon.config
        max_bytes = config.api.max_batch_bytes
        max_entry_bytes = max_bytes + ENVELOPE_SLACK_BYTES
        if len(raw) > max_entry_bytes:
            # Too large to send whatever it holds: not worth parsing.
            # NOTE: the entry was read into memory once to get here.
            dead.append((index, orjson.dumps({
                "reason": "event_too_large", "size": len(raw), "site_id": None, "type": None,
                "status": None, "attempts": 0,
                "detail": f"queue entry of {len(raw)} bytes exceeds {max_entry_bytes} bytes",
            })))
            return
        try:
            envelope = parse_envelope(raw)
        except EnvelopeError as exc:
            dead.append((index, _envelope_meta(exc.reason, exc.detail, raw)))
            return
        tracker = envelope.type in TRACKER_TYPES
        size = envelope.data_length if tracker else single_event_size(envelope.type, envelope.data_length)
        if size > max_bytes:
            dead.append((index, _event_meta(envelope, "event_too_large", f"{size} bytes exceed {max_bytes}", size)))
            return
        if tracker:
            problem = tracker_site_problem(raw, envelope)
            if problem is not None:
                dead.append((index, _event_meta(envelope, "site_mismatch", problem, None)))
                return
        if config.batch.validate_events:
            problem = self._validate(envelope.type, raw, envelope.data_offset, envelope.data_length)
            if problem is not None:
                dead.append((index, _event_meta(envelope, "schema_validation", problem, None)))
                return
        lane = envelope.lane
        builder = builders.get(lane)
        if builder is None:
            # A tracker lane sends one event per request, so each event is its own block
            # and an ack never rewrites one.
            builder = builders[lane] = BlockBuilder(max_events=1 if tracker else MAX_BLOCK_EVENTS)
        view = memoryview(raw)
        offset = envelope.data_offset
        builder.add(envelope.type_index, raw, view[offset : offset + envelope.data_length], offset)
        if not tracker and not config.batch.validate_events:
            if len(self._routes) >= MAX_ROUTES:
                self._routes.clear()
            # Keyed by the values as decoded (a site id may be a JSON number).
            site_key = decode_envelope(raw).site_id
            self._routes[(site_key, envelope.type)] = _Route(
                lane, envelope.type_index, single_event_size(envelope.type, 0)
            )

    def _validate(self, event_type: str, raw: bytes, offset: int, length: int) -> str | None:
        validator = self._validators.get(event_type)
        if validator is None:
            from forwarder.schemas import validator as load_validator

            validator = self._validators[event_type] = load_validator(event_type)
        try:
            validator(orjson.loads(raw[offset : offset + length]))
        except orjson.JSONDecodeError as exc:
            return f"data is not valid JSON: {exc}"
        except Exception as exc:  # fastjsonschema.JsonSchemaException and its subclasses
            return str(exc)[:500]
        return None


def tracker_site_problem(raw: bytes, envelope: Any) -> str | None:
    """Return why a tracker event's `data.site` disagrees with its `site_id`, or None.

    The tracker API authorises a request by the site in its body, so a mismatch would
    be sent with one site's token for another site and fail forever.
    """
    try:
        data = orjson.loads(raw[envelope.data_offset : envelope.data_offset + envelope.data_length])
    except orjson.JSONDecodeError as exc:
        return f"data is not valid JSON: {exc}"
    site = data.get("site")
    if isinstance(site, int) and not isinstance(site, bool):
        site = str(site)
    if site != envelope.site_id:
        return f"data.site {site!r:.40} differs from site_id {envelope.site_id!r}"
    return None


def _envelope_meta(reason: str, detail: str, raw: bytes) -> bytes:
    # Best effort to name the site and type of a broken entry, for filtering.
    site_id = event_type = None
    try:
        parsed = orjson.loads(raw)
        if isinstance(parsed, dict):
            site_value = parsed.get("site_id")
            type_value = parsed.get("type")
            valid_site = isinstance(site_value, str | int) and not isinstance(site_value, bool)
            site_id = str(site_value)[:64] if valid_site else None
            event_type = type_value[:64] if isinstance(type_value, str) else None
    except (orjson.JSONDecodeError, RecursionError):
        pass
    return orjson.dumps({"reason": reason, "detail": detail, "site_id": site_id, "type": event_type,
                         "status": None, "attempts": 0})


def _event_meta(envelope: Any, reason: str, detail: str, size: int | None) -> bytes:
    return orjson.dumps({"reason": reason, "detail": detail, "site_id": envelope.site_id,
                         "type": envelope.type, "id": envelope.event_id, "status": None,
                         "size": size, "attempts": 0})
