"""The intake: claims entries from the producer list and routes them to site lanes.

One instance at a time is the intake leader, so that entries are routed in exactly
the order producers pushed them, also when several instances share one queue. A
chunk stays in `{p}:intake:claimed` from claim until route; whoever is leader next
routes a left-over chunk first, so a crash between the two loses and reorders nothing.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from forwarder.batch import single_event_size
from forwarder.envelope import TRACKER_TYPES, TYPE_INDEX, EnvelopeError, parse_envelope
from forwarder.logs import get_logger
from forwarder.metrics import DEAD_REASONS, bounded

if TYPE_CHECKING:
    from forwarder.daemon import Daemon

log = get_logger(__name__)

# Slack on top of max_batch_bytes for the envelope around `data` (site_id, type, id).
ENVELOPE_SLACK_BYTES = 4096
# The route script addresses claimed entries with 2-byte indexes, and keeps a chunk's
# items in memory while it pushes them.
MAX_CHUNK_EVENTS = 5000
# Per routed event: its index in the claimed list, then the lane item header.
ROUTE_ENTRY = struct.Struct(">HBII")


class Intake:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.leader = False
        self._chunk_ids = itertools.count()
        self._validators: dict[str, Callable[[Any], Any]] = {}

    async def run(self) -> None:
        daemon = self.daemon
        store = daemon.store
        while not daemon.stopping.is_set():
            # Read on every pass, so that a reload's limits apply to the next claim.
            config = daemon.config
            chunk = min(config.batch.intake_chunk_events, MAX_CHUNK_EVENTS)
            if not self.leader:
                self.leader = await daemon.redis_call(
                    store.acquire_leadership, daemon.instance_id, daemon.lease_ttl_ms
                )
                if not self.leader:
                    await daemon.wait_stopping(config.lease.renew_interval_s)
                    continue
                log.info("intake leadership acquired", instance=daemon.instance_id)
            status, items, oversized = await daemon.redis_call(
                store.claim, daemon.instance_id, chunk, config.dead_letter.max_entries,
                config.dead_letter.max_bytes, config.api.max_batch_bytes + ENVELOPE_SLACK_BYTES,
                daemon.lease_ttl_ms,
            )
            if oversized:
                daemon.metrics.events_dead.labels("invalid", "unknown", "event_too_large").inc(oversized)
                log.warning("queue entries over the size limit dead-lettered without reading them",
                            entries=oversized,
                            max_entry_bytes=config.api.max_batch_bytes + ENVELOPE_SLACK_BYTES)
            if status == -1:
                log.warning("intake leadership lost", instance=daemon.instance_id)
                self.leader = False
                continue
            if status == -2:
                daemon.set_dead_full(True)
                log.error("dead-letter store is full: intake stopped until dead letters are replayed or purged",
                          max_entries=config.dead_letter.max_entries)
                await daemon.wait_stopping(1.0)
                continue
            daemon.set_dead_full(False)
            if not items:
                # Block until a producer pushes; BLMOVE moves the entry into the claimed
                # list atomically, so it is safe even if this process dies right after.
                await daemon.redis_call(
                    daemon.redis.blmove, store.keys.events, store.keys.claimed,
                    config.redis.block_timeout_s, "RIGHT", "RIGHT",
                )
                continue
            await self.route(items)

    async def route(self, items: list[bytes]) -> None:
        daemon = self.daemon
        config = daemon.config
        max_bytes = config.api.max_batch_bytes
        validate = config.batch.validate_events
        lanes: dict[str, list[Any]] = {}
        dead: list[tuple[int, bytes]] = []
        received: dict[tuple[str, str], int] = {}
        max_entry_bytes = max_bytes + ENVELOPE_SLACK_BYTES
        for index, raw in enumerate(items):
            if len(raw) > max_entry_bytes:
                # Too large to send whatever it holds: not worth parsing (an entry moved
                # by BLMOVE reaches here without the claim script's size check).
                dead.append((index, orjson.dumps({
                    "reason": "event_too_large", "size": len(raw), "site_id": None, "type": None,
                    "status": None, "attempts": 0,
                    "detail": f"queue entry of {len(raw)} bytes exceeds {max_entry_bytes} bytes",
                })))
                continue
            try:
                envelope = parse_envelope(raw)
            except EnvelopeError as exc:
                dead.append((index, _envelope_meta(exc.reason, exc.detail, raw)))
                continue
            size = (
                envelope.data_length
                if envelope.type in TRACKER_TYPES
                else single_event_size(envelope.type, envelope.data_length)
            )
            if size > max_bytes:
                dead.append((index, _event_meta(envelope, "event_too_large", f"{size} bytes exceed {max_bytes}", size)))
                continue
            if envelope.type in TRACKER_TYPES:
                problem = tracker_site_problem(raw, envelope)
                if problem is not None:
                    dead.append((index, _event_meta(envelope, "site_mismatch", problem, None)))
                    continue
            if validate:
                problem = self._validate(envelope.type, raw, envelope.data_offset, envelope.data_length)
                if problem is not None:
                    dead.append((index, _event_meta(envelope, "schema_validation", problem, None)))
                    continue
            lane = envelope.lane
            entry = lanes.get(lane)
            if entry is None:
                entry = lanes[lane] = [0, 0, bytearray()]
            entry[0] += 1
            entry[1] += envelope.data_length + 1
            # The route script rebuilds the item from this header and the claimed entry,
            # so the entry's bytes are not sent back to Redis.
            entry[2] += ROUTE_ENTRY.pack(index, envelope.type_index, envelope.data_offset, envelope.data_length)
            key = (envelope.site_id, envelope.type)
            received[key] = received.get(key, 0) + 1

        chunk_id = f"{daemon.instance_id}:{next(self._chunk_ids)}"
        result = await daemon.redis_call(
            daemon.store.route, daemon.instance_id, chunk_id, len(items), config.batch.linger_ms,
            config.batch.max_events, daemon.byte_ceiling, config.dead_letter.max_entries,
            config.dead_letter.max_bytes, lanes, dead,
        )
        if result == -1:
            log.warning("intake leadership lost before routing; the next leader routes the chunk")
            self.leader = False
            return
        if result == -2:
            daemon.set_dead_full(True)
            log.error("dead-letter store is full: intake stopped until dead letters are replayed or purged",
                      max_entries=config.dead_letter.max_entries, dead_letters_needed=len(dead))
            await daemon.wait_stopping(1.0)
            return
        if result == -3:
            log.error("claimed list changed under the intake leader; re-reading it", events=len(items))
            return
        metrics = daemon.metrics
        for (site, event_type), number in received.items():
            metrics.events_received.labels(site, event_type).inc(number)
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
