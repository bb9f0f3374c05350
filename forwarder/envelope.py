"""Producer envelopes: parsing and checking.

A producer pushes `{"site_id": "1234", "type": "cart", "data": {...}, "id": "..."}`.
The daemon never rewrites `data`: it keeps the producer's bytes and copies them into
the batch body untouched, so the size on the wire is known exactly and nothing is
re-encoded on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

# Batch keys, in a fixed order: an item stores the index into EVENT_TYPES as one byte.
BATCH_TYPES: tuple[str, ...] = (
    "cart",
    "category",
    "customer",
    "employee",
    "order",
    "product",
    "product.cost",
    "product.inventory",
)
TRACKER_TYPES: tuple[str, ...] = ("pageview", "visit")
EVENT_TYPES: tuple[str, ...] = BATCH_TYPES + TRACKER_TYPES
TYPE_INDEX: dict[str, int] = {name: index for index, name in enumerate(EVENT_TYPES)}
TRACKER_INDEXES = frozenset(TYPE_INDEX[name] for name in TRACKER_TYPES)

# Lane kinds: all batchable types of a site share the "batch" lane. Each tracker type
# has its own lane because tracker events are sent one per request.
LANE_BATCH = "batch"

class _Envelope(msgspec.Struct):
    site_id: str | int
    type: str
    # Raw keeps the producer's bytes for `data` without decoding them (about 1 us per
    # 1.2 KB envelope instead of about 5 us for a full parse and re-encode).
    data: msgspec.Raw
    id: str | int | None = None


_decoder = msgspec.json.Decoder(_Envelope)
# For the intake's fast path, which checks the decoded fields itself.
decode_envelope = _decoder.decode


class EnvelopeError(ValueError):
    """A queue entry that cannot be delivered; `reason` is the dead-letter reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class Envelope:
    site_id: str
    type: str
    type_index: int
    event_id: str | None
    data_offset: int
    data_length: int

    @property
    def lane(self) -> str:
        return lane_name(self.site_id, self.type)


def lane_name(site_id: str, event_type: str) -> str:
    kind = event_type if event_type in TRACKER_TYPES else LANE_BATCH
    return f"{site_id}:{kind}"


def split_lane(lane: str) -> tuple[str, str]:
    site_id, _, kind = lane.rpartition(":")
    return site_id, kind


def find_data(raw: bytes, data: Any) -> int:
    # Fast path: `data` nearly always follows the first `"data":` key, so one find
    # and one comparison locate it. The fallback search is correct in every case
    # because any occurrence of the same bytes is an equal slice.
    start = raw.find(b'"data":')
    if start >= 0:
        start += 7
        while raw[start : start + 1] in (b" ", b"\t", b"\r", b"\n"):
            start += 1
        if raw.startswith(data, start):
            return start
    return raw.find(data)


def parse_envelope(raw: bytes) -> Envelope:
    """Parse and check one queue entry; raise EnvelopeError with a dead-letter reason."""
    if not raw:
        raise EnvelopeError("invalid_json", "empty entry")
    # msgspec does not check UTF-8 inside the strings it skips, so check it here.
    # ASCII is the common case and the check for it is much cheaper than a decode.
    if not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EnvelopeError("invalid_utf8", f"invalid UTF-8 at byte {exc.start}") from None
    try:
        envelope = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise _field_error(raw, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise EnvelopeError("invalid_json", str(exc)) from None
    except RecursionError:
        raise EnvelopeError("invalid_json", "JSON nested too deeply") from None

    site_id = envelope.site_id
    if isinstance(site_id, int):
        # A number stands for its digits, so it has the same 32-digit limit as a string.
        if site_id < 0:
            raise EnvelopeError("invalid_site_id", f"site_id must be digits, got {site_id}")
        if site_id >= 10**32:
            raise EnvelopeError("invalid_site_id", "site_id must be 1 to 32 digits, got a longer number")
        site_id = str(site_id)
    elif not site_id.isdigit() or not site_id.isascii() or len(site_id) > 32:
        raise EnvelopeError("invalid_site_id", f"site_id must be a string of digits, got {site_id!r:.60}")

    type_index = TYPE_INDEX.get(envelope.type)
    if type_index is None:
        raise EnvelopeError("unknown_type", f"unknown event type {envelope.type!r:.60}")

    data = bytes(envelope.data)
    if data[:1] != b"{":
        raise EnvelopeError("invalid_data", "data must be a JSON object")

    event_id = envelope.id
    if event_id is not None:
        event_id = str(event_id)
    return Envelope(site_id, envelope.type, type_index, event_id, find_data(raw, data), len(data))


def _field_error(raw: bytes, message: str) -> EnvelopeError:
    # msgspec reports "Object missing required field `x`" or "Expected `str`, got `int` - at `$.x`".
    if "Expected `object`" in message and "at `$" not in message:
        return EnvelopeError("not_an_object", "entry is JSON but not an object")
    for field in ("site_id", "type", "data"):
        if f"`{field}`" in message or f"$.{field}" in message:
            reason = "missing_field" if "missing required field" in message else f"invalid_{field}"
            return EnvelopeError(reason, message)
    return EnvelopeError("invalid_envelope", message)


@dataclass(slots=True)
class Item:
    """One event read back from a lane: its type and the producer's bytes."""

    type_index: int
    raw: memoryview
    data: memoryview

    @property
    def type(self) -> str:
        return EVENT_TYPES[self.type_index]
