"""JSON Schemas (draft-07) of the Jirafe Event API v2 events, one file per event type.

The files refer to each other by relative `$ref` (`"customer.json"`), so any validator
that resolves references against the file location can use them as they are.
`load_schema` returns a bundled copy in which those references point into the
schema's own `definitions`, which needs no resolver.

The schemas follow the live server rather than its documentation: date formats are
not checked, unknown properties are accepted and an accepted order may have an empty
`items` list.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
from collections.abc import Callable
from typing import Any

import fastjsonschema
import orjson

# The batch types (sent through /v2/{site}/batch) and tracker types (sent one by one).
from forwarder.envelope import BATCH_TYPES, EVENT_TYPES, TRACKER_TYPES

__all__ = ["BATCH_TYPES", "EVENT_TYPES", "TRACKER_TYPES", "load_schema", "validator"]

_SUFFIX = ".json"


def _read_schema_file(event_type: str) -> dict[str, Any]:
    if event_type not in EVENT_TYPES:
        raise KeyError(
            f"unknown event type {event_type!r}: expected one of {', '.join(EVENT_TYPES)}"
        )
    resource = importlib.resources.files(__package__).joinpath(event_type + _SUFFIX)
    return orjson.loads(resource.read_bytes())


def _bundle(node: Any, definitions: dict[str, Any]) -> Any:
    """Rewrite `{"$ref": "<type>.json"}` into a local reference and collect the target."""
    if isinstance(node, list):
        return [_bundle(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.endswith(_SUFFIX):
        event_type = ref.removesuffix(_SUFFIX)
        if event_type not in definitions:
            embedded = _read_schema_file(event_type)
            # A local "#/definitions/..." reference inside an embedded schema would point
            # at the wrong root after bundling, so embedded schemas must not have any.
            if "definitions" in embedded:
                raise ValueError(f"schema {ref} has definitions and cannot be embedded")
            embedded.pop("$schema", None)
            definitions[event_type] = None  # reserve the name in case of a cycle
            definitions[event_type] = _bundle(embedded, definitions)
        return {**node, "$ref": f"#/definitions/{event_type}"}
    return {key: _bundle(value, definitions) for key, value in node.items()}


@functools.cache
def _bundled_schema(event_type: str) -> dict[str, Any]:
    embedded: dict[str, Any] = {}
    bundled = _bundle(_read_schema_file(event_type), embedded)
    own = bundled.get("definitions", {})
    clashes = sorted(own.keys() & embedded.keys())
    if clashes:
        raise ValueError(
            f"schema {event_type}.json defines {clashes}, which clash with embedded schemas"
        )
    if embedded:
        bundled["definitions"] = {**own, **embedded}
    return bundled


def load_schema(event_type: str) -> dict[str, Any]:
    """Return the self-contained JSON Schema of an event type (a fresh copy).

    `event_type` is a batch key (`product.inventory`, not the path name `inventory`)
    or a tracker type. Raises KeyError for any other name.
    """
    return copy.deepcopy(_bundled_schema(event_type))


@functools.cache
def validator(event_type: str) -> Callable[[Any], Any]:
    """Return the compiled fastjsonschema validator of an event type.

    The validator raises `fastjsonschema.JsonSchemaValueException` at the first
    violation. It never fills in defaults, so validated data is left unchanged.
    """
    return fastjsonschema.compile(load_schema(event_type), use_default=False, use_formats=False)
