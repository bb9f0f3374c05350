"""Lane blocks: how a lane stores its events, many to one list element.

The intake writes the events of one lane from one chunk as a few blocks, and a lane
sender reads whole blocks back. Redis then moves one list element per block instead
of one per event. A block already holds each type's `data` joined by commas, so a
batch body is assembled from a few slices per block with no Python work per event.

Layout of a block (integers little-endian):

    header      magic 0xB1, event count n (u32), number of types present m (u8)
    type table  m times: type index (u8), events of that type (u32), run length (u32)
    types       n bytes: each event's type index, in lane order
    lengths     3 * n u32: data lengths, then envelope prefix lengths (the bytes
                before `data`), then envelope suffix lengths (the bytes after it)
    runs        for each type of the table, its events' `data` joined by ","
    prefixes    each event's envelope prefix, in lane order
    suffixes    each event's envelope suffix, in lane order

An event's envelope is prefix + data + suffix: the producer's bytes, exactly, which
dead letters keep.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from forwarder.envelope import BATCH_TYPES, EVENT_TYPES

MAGIC = 0xB1
_HEADER = struct.Struct("<BIB")
_TYPE_ENTRY = struct.Struct("<BII")

# A lane sender that sends part of a block rewrites the rest of it in the ack, and
# bisection after a failure sends one event at a time, so blocks stay small enough
# that the rewrite is cheap.
MAX_BLOCK_EVENTS = 256
MAX_BLOCK_BYTES = 256 * 1024

# Fixed bytes each present batch type adds around its array: `"cart":[` plus `]`.
_TYPE_OVERHEAD = [len(name) + 5 for name in BATCH_TYPES]
_TRACKER_FIRST_INDEX = len(BATCH_TYPES)
_TYPE_PREFIX = [f'"{name}":['.encode() for name in EVENT_TYPES]


class BlockError(ValueError):
    """A lane element that is not a block of this format."""


# One event on its way into a block: type index, envelope, data offset, data length.
EventRef = tuple[int, bytes, int, int]


class BlockBuilder:
    """Collects one lane's events, in lane order, into blocks.

    A block is closed once it holds `max_events` events or MAX_BLOCK_BYTES bytes of
    envelopes, unless `bounded` is false: then all events go into one block.
    """

    __slots__ = (
        "_bounded",
        "_datas",
        "_envelopes",
        "_max_events",
        "_offsets",
        "_size",
        "_types",
        "blocks",
        "data_bytes",
        "events",
        "type_counts",
    )

    def __init__(self, bounded: bool = True, max_events: int = MAX_BLOCK_EVENTS) -> None:
        self.blocks: list[bytes] = []
        # Events, data bytes and events per type index of the closed blocks.
        self.events = 0
        self.data_bytes = 0
        self.type_counts = [0] * len(EVENT_TYPES)
        self._bounded = bounded
        self._max_events = max_events
        self._start()

    def _start(self) -> None:
        self._types = bytearray()
        self._envelopes: list[Any] = []
        self._datas: list[Any] = []
        self._offsets: list[int] = []
        self._size = 0

    def add(self, type_index: int, envelope: Any, data: Any, offset: int) -> None:
        """Add one event: `data` (any buffer) equals the bytes of `envelope` at `offset`."""
        # Called once per event on the intake's hot path: only appends here, and the
        # per-event arithmetic happens in _close in comprehensions.
        self._types.append(type_index)
        self._envelopes.append(envelope)
        self._datas.append(data)
        self._offsets.append(offset)
        self._size += len(envelope)
        if self._bounded and (self._size >= MAX_BLOCK_BYTES or len(self._types) >= self._max_events):
            self._close()

    def _close(self) -> None:
        types = self._types
        envelopes = self._envelopes
        datas = self._datas
        offsets = self._offsets
        count = len(types)

        lengths = list(map(len, datas))
        suffixes = [
            len(envelope) - offset - length
            for envelope, offset, length in zip(envelopes, offsets, lengths, strict=True)
        ]
        if types.count(types[0]) == count:
            groups: list[tuple[int, list[Any]]] = [(types[0], datas)]
        else:
            by_type: dict[int, list[Any]] = {}
            for type_index, data in zip(types, datas, strict=True):
                by_type.setdefault(type_index, []).append(data)
            groups = sorted(by_type.items())

        table = []
        runs = []
        for type_index, group in groups:
            run = b",".join(group)
            table.append(_TYPE_ENTRY.pack(type_index, len(group), len(run)))
            runs.append(run)
            self.type_counts[type_index] += len(group)
        self.events += count
        self.data_bytes += sum(lengths)

        self.blocks.append(b"".join([
            _HEADER.pack(MAGIC, count, len(table)), *table, types,
            struct.pack(f"<{3 * count}I", *lengths, *offsets, *suffixes), *runs,
            *[envelope[:offset] for envelope, offset in zip(envelopes, offsets, strict=True)],
            *[envelope[offset + length :] for envelope, offset, length in zip(envelopes, offsets, lengths, strict=True)],
        ]))
        self._start()

    def finish(self) -> list[bytes]:
        """Close the last block and return all blocks."""
        if self._types:
            self._close()
        return self.blocks


def encode_block(events: Sequence[EventRef]) -> bytes:
    """Encode events, in lane order, as one block, whatever its size."""
    builder = BlockBuilder(bounded=False)
    for type_index, envelope, offset, length in events:
        builder.add(type_index, envelope, memoryview(envelope)[offset : offset + length], offset)
    return builder.finish()[0]


@dataclass(slots=True)
class Block:
    """One decoded block header; the per-event arrays are decoded only when needed."""

    raw: bytes
    count: int
    # (type index, events of that type, offset of its run in raw, run length), by type index.
    runs: list[tuple[int, int, int, int]]
    types_offset: int
    parts_offset: int
    _lengths: tuple[int, ...] | None = None

    @property
    def type_sequence(self) -> bytes:
        return self.raw[self.types_offset : self.types_offset + self.count]

    @property
    def data_bytes(self) -> int:
        # A run is its events' data with a comma between each two of them.
        return sum(length - count + 1 for _, count, _, length in self.runs)

    def lengths(self) -> tuple[int, ...]:
        """Return data lengths, prefix lengths and suffix lengths, n of each, in one tuple."""
        if self._lengths is None:
            self._lengths = struct.unpack_from(f"<{3 * self.count}I", self.raw, self.types_offset + self.count)
        return self._lengths

    def split(self, taken: int) -> tuple[list[tuple[int, memoryview]], bytes]:
        """Split after the first `taken` events: their runs, and the other events as a new block."""
        count = self.count
        lengths = self.lengths()
        types = self.type_sequence
        run_taken: dict[int, list[int]] = {}
        for position in range(taken):
            run_taken.setdefault(types[position], []).append(lengths[position])

        view = memoryview(self.raw)
        head = []
        table = []
        rest_runs = []
        for type_index, events, offset, length in self.runs:
            taken_lengths = run_taken.get(type_index, [])
            # The first events' data and the commas between them; the rest starts after one more comma.
            cut = sum(taken_lengths) + len(taken_lengths) - 1 if taken_lengths else -1
            if taken_lengths:
                head.append((type_index, view[offset : offset + cut]))
            if events > len(taken_lengths):
                rest = view[offset + cut + 1 : offset + length]
                table.append(_TYPE_ENTRY.pack(type_index, events - len(taken_lengths), len(rest)))
                rest_runs.append(rest)

        rest_count = count - taken
        prefix_at = self.parts_offset
        suffix_at = prefix_at + sum(lengths[count : 2 * count])
        rest_lengths = struct.pack(
            f"<{3 * rest_count}I",
            *lengths[taken:count], *lengths[count + taken : 2 * count], *lengths[2 * count + taken :],
        )
        remainder = b"".join([
            _HEADER.pack(MAGIC, rest_count, len(table)), *table, types[taken:], rest_lengths, *rest_runs,
            view[prefix_at + sum(lengths[count : count + taken]) : suffix_at],
            view[suffix_at + sum(lengths[2 * count : 2 * count + taken]) :],
        ])
        return head, remainder

    def events(self) -> list[tuple[int, bytes, int, int]]:
        """Return every event as (type index, envelope, data offset, data length)."""
        lengths = self.lengths()
        count = self.count
        raw = self.raw
        run_position = {type_index: offset for type_index, _, offset, _ in self.runs}
        prefix_at = self.parts_offset
        suffix_at = prefix_at + sum(lengths[count : 2 * count])
        events = []
        for position, type_index in enumerate(self.type_sequence):
            length = lengths[position]
            prefix = lengths[count + position]
            suffix = lengths[2 * count + position]
            data_at = run_position[type_index]
            run_position[type_index] = data_at + length + 1
            envelope = (raw[prefix_at : prefix_at + prefix] + raw[data_at : data_at + length]
                        + raw[suffix_at : suffix_at + suffix])
            prefix_at += prefix
            suffix_at += suffix
            events.append((type_index, envelope, prefix, length))
        return events


# A lane element written before blocks: type index, data offset and data length in
# the envelope (big-endian), then the envelope. Read as a block of one event, so lanes
# left by an earlier version drain after an upgrade.
_LEGACY_ITEM = struct.Struct(">BII")


def decode_block(raw: bytes) -> Block:
    """Decode a block's header; raise BlockError for anything else."""
    if raw[:1] != bytes([MAGIC]) and len(raw) > _LEGACY_ITEM.size:
        type_index, offset, length = _LEGACY_ITEM.unpack_from(raw)
        envelope = raw[_LEGACY_ITEM.size :]
        if type_index < len(EVENT_TYPES) and offset + length <= len(envelope):
            return decode_block(encode_block([(type_index, envelope, offset, length)]))
    if len(raw) < _HEADER.size or raw[0] != MAGIC:
        raise BlockError(f"lane element of {len(raw)} bytes is not a block (first byte {raw[:1]!r})")
    _, count, type_count = _HEADER.unpack_from(raw)
    offset = _HEADER.size
    table = []
    for _ in range(type_count):
        table.append(_TYPE_ENTRY.unpack_from(raw, offset))
        offset += _TYPE_ENTRY.size
    types_offset = offset
    run_offset = types_offset + count + 12 * count
    runs = []
    for type_index, events, length in table:
        runs.append((type_index, events, run_offset, length))
        run_offset += length
    if run_offset > len(raw) or sum(events for _, events, _ in table) != count:
        raise BlockError(f"block of {len(raw)} bytes is truncated or inconsistent")
    return Block(raw, count, runs, types_offset, run_offset)


@dataclass(slots=True)
class Prefix:
    """The events at the head of a lane that fit one request, and how to pop them."""

    count: int
    body_bytes: int
    # Sum of the events' data lengths.
    data_bytes: int
    # One byte per event in lane order: its index into EVENT_TYPES.
    type_sequence: bytes
    # (type index, slices of runs that hold its events' data in lane order), by type index.
    groups: list[tuple[int, list[Any]]]
    # Blocks popped whole by the ack, and the rest of a block sent in part (or b"").
    whole_blocks: int
    remainder: bytes
    # The blocks the events come from, with how many events each gave, in lane order.
    sources: list[tuple[Block, int]]

    def body(self, tracker: bool) -> bytes:
        """Assemble the request body: a tracker event's data, or a batch body."""
        if tracker:
            return bytes(self.groups[0][1][0])
        # One join, so the events' bytes are copied once.
        parts: list[Any] = [b"{"]
        for index, runs in self.groups:
            if len(parts) > 1:
                parts.append(b"],")
            parts.append(_TYPE_PREFIX[index])
            for run in runs:
                parts.append(run)
                parts.append(b",")
            parts.pop()
        parts.append(b"]}")
        return b"".join(parts)

    def type_counts(self) -> list[tuple[int, int]]:
        """Return (type index, events) for each type present, by type index."""
        return [(index, self.type_sequence.count(index)) for index, _ in self.groups]

    def events(self) -> list[tuple[int, bytes, int, int]]:
        """Return the prefix's events as (type index, envelope, data offset, data length)."""
        events = []
        for block, taken in self.sources:
            events.extend(block.events()[:taken])
        return events


def take_prefix(blocks: list[Block], max_count: int, max_bytes: int) -> Prefix:
    """Take the longest prefix of `blocks` whose body fits `max_bytes`, at most `max_count` events.

    The first event is always taken, even when it alone exceeds `max_bytes`. Sizes are
    exact byte counts of the body that `Prefix.body` assembles.
    """
    count = 0
    size = 2
    data_bytes = 0
    groups: dict[int, list[Any]] = {}
    sequences = []
    sources = []
    whole = 0
    remainder = b""
    for block in blocks:
        if count >= max_count:
            break
        # Fast path: a whole block adds one run per type, so its size needs no per-event work.
        add = 0
        present = len(groups)
        for type_index, _, _, length in block.runs:
            if type_index >= _TRACKER_FIRST_INDEX:
                add += length - 2
            elif type_index in groups:
                add += length + 1
            else:
                add += length + _TYPE_OVERHEAD[type_index] + (1 if present else 0)
                present += 1
        if count + block.count <= max_count and (size + add <= max_bytes or (count == 0 and block.count == 1)):
            raw = block.raw
            for type_index, _, offset, length in block.runs:
                groups.setdefault(type_index, []).append(memoryview(raw)[offset : offset + length])
            size += add
            data_bytes += block.data_bytes
            count += block.count
            sequences.append(block.type_sequence)
            sources.append((block, block.count))
            whole += 1
            continue
        taken, size, data_bytes = _take_part(block, groups, max_count - count, max_bytes, size, data_bytes, count)
        if taken:
            count += taken
            sequences.append(block.type_sequence[:taken])
            sources.append((block, taken))
            head_runs, remainder = block.split(taken)
            for type_index, run in head_runs:
                groups.setdefault(type_index, []).append(run)
        break
    return Prefix(count, size, data_bytes, b"".join(sequences), sorted(groups.items()), whole, remainder, sources)


def _take_part(
    block: Block, groups: dict[int, list[Any]], max_count: int, max_bytes: int, size: int, data_bytes: int,
    count: int,
) -> tuple[int, int, int]:
    """Size the longest prefix of one block that fits; return (events taken, size, data bytes)."""
    lengths = block.lengths()
    types = block.type_sequence
    present = set(groups)
    taken = 0
    while taken < block.count and taken < max_count:
        type_index = types[taken]
        length = lengths[taken]
        if type_index >= _TRACKER_FIRST_INDEX:
            add = length - 2
        elif type_index in present:
            add = length + 1
        else:
            add = length + _TYPE_OVERHEAD[type_index] + (1 if present else 0)
        if count + taken > 0 and size + add > max_bytes:
            break
        present.add(type_index)
        size += add
        data_bytes += length
        taken += 1
    return taken, size, data_bytes


def count_events(elements: Sequence[bytes]) -> int:
    """Return how many events these lane elements hold."""
    return sum(decode_block(element).count for element in elements)


def lane_envelopes(elements: Sequence[bytes]) -> list[tuple[str, bytes]]:
    """Return (type, envelope) of every event in these lane elements, in lane order."""
    return [
        (EVENT_TYPES[type_index], envelope)
        for element in elements
        for type_index, envelope, _, _ in decode_block(element).events()
    ]
