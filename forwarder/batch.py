"""Batch bodies: assembly from already-encoded event bytes, exact sizing, and results.

A batch body is `{"cart":[d1,d2],"order":[d3]}` where each `d` is the producer's
`data` bytes, copied untouched. Sizes are exact byte counts of that encoding.
`blocks.take_prefix` uses the same arithmetic to cut a prefix of a lane that fits the
limit, and `tests/test_batch.py` checks both against real encodings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from forwarder.envelope import BATCH_TYPES, EVENT_TYPES, Item

# `"cart":[` plus `]`: the fixed bytes each present type adds around its array.
TYPE_OVERHEAD: dict[str, int] = {name: len(name) + 5 for name in BATCH_TYPES}
_TYPE_PREFIX: list[bytes] = [f'"{name}":['.encode() for name in EVENT_TYPES]


def batch_size(data_lengths_by_type: dict[str, list[int]]) -> int:
    """Return the exact byte size of the batch body holding events of these sizes."""
    present = [name for name, lengths in data_lengths_by_type.items() if lengths]
    if not present:
        return 2
    size = 2 + len(present) - 1
    for name in present:
        lengths = data_lengths_by_type[name]
        size += TYPE_OVERHEAD[name] + sum(lengths) + len(lengths) - 1
    return size


def single_event_size(event_type: str, data_length: int) -> int:
    """Return the size of a batch body holding one event of `data_length` bytes."""
    return 2 + TYPE_OVERHEAD[event_type] + data_length


@dataclass(slots=True)
class BatchBody:
    body: bytes
    # For each batch key, the lane positions of its events in body order: element k of
    # the response array for that key is the result of the event at positions[k].
    positions: dict[str, list[int]]


def build_batch(items: Sequence[Item]) -> BatchBody:
    """Assemble a batch body from lane items, grouping by type and keeping lane order."""
    groups: dict[int, list[memoryview]] = {}
    positions: dict[int, list[int]] = {}
    for position, item in enumerate(items):
        group = groups.get(item.type_index)
        if group is None:
            group = groups[item.type_index] = []
            positions[item.type_index] = []
        group.append(item.data)
        positions[item.type_index].append(position)
    parts: list[bytes | memoryview] = [b"{"]
    first = True
    for type_index in sorted(groups):
        if not first:
            parts.append(b",")
        first = False
        parts.append(_TYPE_PREFIX[type_index])
        # bytes.join accepts memoryviews, so the data slices are copied once, here.
        parts.append(b",".join(groups[type_index]))
        parts.append(b"]")
    parts.append(b"}")
    return BatchBody(
        b"".join(parts),
        {EVENT_TYPES[index]: pos for index, pos in positions.items()},
    )


@dataclass(slots=True, frozen=True)
class EventResult:
    ok: bool
    error_type: str | None = None
    # The element's failure object re-encoded, for the dead letter.
    error_body: bytes | None = None


def read_batch_results(body: bytes, batch: BatchBody, count: int) -> list[EventResult] | None:
    """Map a 200 batch response to one result per lane position.

    Return None when the body cannot be read as per-event results (not JSON, keys or
    lengths differ from the request), which the policy treats as "accepted, count it".
    """
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    results: list[EventResult | None] = [None] * count
    for name, positions in batch.positions.items():
        elements = parsed.get(name)
        if not isinstance(elements, list) or len(elements) != len(positions):
            return None
        for position, element in zip(positions, elements, strict=True):
            results[position] = _element_result(element)
    if any(result is None for result in results):
        return None
    return results  # type: ignore[return-value]


_OK = EventResult(True)


def _element_result(element: Any) -> EventResult:
    if isinstance(element, dict) and element.get("success") is True:
        return _OK
    if isinstance(element, dict):
        error_type = element.get("error_type")
        return EventResult(
            False,
            error_type if isinstance(error_type, str) else "unknown",
            orjson.dumps(element, option=orjson.OPT_SORT_KEYS),
        )
    return EventResult(False, "unreadable_result", orjson.dumps(element))


_SUCCESS = {"success": True}


def read_failures(
    body: bytes, type_counts: list[tuple[int, int]], type_sequence: bytes
) -> list[tuple[int, EventResult]] | None:
    """Return the failed events of a 200 batch response as (lane position, result).

    An empty list means every event succeeded; None means the body cannot be read as
    per-event results (not JSON, keys or lengths differ from the request), which the
    policy treats as "accepted, count it".
    """
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    failed_types: list[tuple[int, list[Any]]] = []
    for type_index, count in type_counts:
        elements = parsed.get(EVENT_TYPES[type_index])
        if not isinstance(elements, list) or len(elements) != count:
            return None
        # Fast path: list.count compares in C, so an all-success array costs no Python loop.
        if elements.count(_SUCCESS) != len(elements):
            failed_types.append((type_index, elements))
    failures: list[tuple[int, EventResult]] = []
    for type_index, elements in failed_types:
        positions = [position for position, value in enumerate(type_sequence) if value == type_index]
        for position, element in zip(positions, elements, strict=True):
            result = _element_result(element)
            if not result.ok:
                failures.append((position, result))
    failures.sort(key=lambda failure: failure[0])
    return failures
