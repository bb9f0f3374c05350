"""Event validation with the live server's error format.

The live server reported one validation error per event, as a map from the field path
to a message worded like the Python `jsonschema` package, for example
`{"create_date": "None is not of type 'string'"}`. This module produces the same shape
from fastjsonschema's first error. Field paths join property names and array indexes
with dots (`items.0.price`). A missing property is reported under its own path
(`customer.id`), and an event that is not an object under the empty path `""`.
"""

from __future__ import annotations

from typing import Any

import fastjsonschema

from forwarder.schemas import validator

# Path segment after /v2/{site}/ for each batch type. Only inventory differs from its key.
PATH_TYPES: dict[str, str] = {
    "cart": "cart",
    "category": "category",
    "customer": "customer",
    "employee": "employee",
    "order": "order",
    "product": "product",
    "product.cost": "product.cost",
    "inventory": "product.inventory",
}


def _python_repr(value: Any) -> str:
    # repr() of the decoded JSON value, as jsonschema prints it (None, True, 'text').
    text = repr(value)
    if len(text) > 200:
        text = text[:197] + "..."
    return text


def _message(exc: fastjsonschema.JsonSchemaValueException, missing: str | None) -> str:
    rule = exc.rule
    expected = exc.rule_definition
    value = _python_repr(exc.value)
    if rule == "required":
        return f"{missing!r} is a required property"
    if rule == "type":
        types = expected if isinstance(expected, list) else [expected]
        return f"{value} is not of type {', '.join(repr(t) for t in types)}"
    if rule == "enum":
        return f"{value} is not one of {expected!r}"
    if rule == "const":
        return f"{expected!r} was expected"
    if rule == "minimum":
        return f"{value} is less than the minimum of {expected!r}"
    if rule == "maximum":
        return f"{value} is greater than the maximum of {expected!r}"
    if rule == "minLength":
        return f"{value} is too short"
    if rule == "maxItems":
        return f"{value} is too long"
    # Rules the schemas do not use today: fall back to fastjsonschema's own wording.
    return exc.message


def _first_missing(exc: fastjsonschema.JsonSchemaValueException) -> str | None:
    if exc.rule != "required" or not isinstance(exc.value, dict):
        return None
    for name in exc.rule_definition or ():
        if name not in exc.value:
            return name
    return None


def first_error(event_type: str, data: Any) -> dict[str, str] | None:
    """Validate one event and return its first error as `{field_path: message}`.

    Returns None when the event is valid. `event_type` is a batch key or a tracker
    type. Raises KeyError for any other type.
    """
    try:
        validator(event_type)(data)
    except fastjsonschema.JsonSchemaValueException as exc:
        missing = _first_missing(exc)
        # exc.path starts with the root name "data", and array indexes are strings already.
        parts = [str(part) for part in exc.path[1:]]
        if missing is not None:
            parts.append(missing)
        return {".".join(parts): _message(exc, missing)}
    return None
