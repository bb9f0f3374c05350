"""Event schemas and the live-format validation errors, without a server."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import forwarder.schemas
from forwarder.sandbox.samples import sample_event, sample_order
from forwarder.sandbox.validation import first_error
from forwarder.schemas import BATCH_TYPES, EVENT_TYPES, TRACKER_TYPES, load_schema, validator

SCHEMA_DIR = Path(forwarder.schemas.__file__).parent


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_schema_files_cover_every_event_type() -> None:
    files = sorted(path.name for path in SCHEMA_DIR.glob("*.json"))

    assert files == sorted(f"{event_type}.json" for event_type in EVENT_TYPES)
    assert set(BATCH_TYPES) == {
        "cart", "category", "customer", "employee", "order", "product",
        "product.cost", "product.inventory",
    }  # fmt: skip
    assert TRACKER_TYPES == ("pageview", "visit")


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_schema_file_is_draft07_with_resolvable_refs(event_type: str) -> None:
    raw = json.loads((SCHEMA_DIR / f"{event_type}.json").read_text())

    assert raw["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert raw["title"] == event_type
    for ref in _refs(raw):
        if ref.startswith("#/definitions/"):
            assert ref.removeprefix("#/definitions/") in raw["definitions"]
        else:
            assert (SCHEMA_DIR / ref).is_file(), ref


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_load_schema_is_self_contained(event_type: str) -> None:
    schema = load_schema(event_type)

    for ref in _refs(schema):
        assert ref.startswith("#/definitions/"), ref
        assert ref.removeprefix("#/definitions/") in schema["definitions"]


def test_load_schema_embeds_referenced_types() -> None:
    cart = load_schema("cart")

    assert cart["properties"]["customer"] == {"$ref": "#/definitions/customer"}
    assert cart["definitions"]["customer"]["required"] == ["id", "create_date", "change_date"]
    assert cart["definitions"]["product"]["required"][:2] == ["id", "code"]


def test_load_schema_returns_a_copy() -> None:
    schema = load_schema("customer")
    schema["required"].append("nickname")

    assert "nickname" not in load_schema("customer")["required"]


def test_load_schema_unknown_type_raises() -> None:
    with pytest.raises(KeyError, match="inventory"):
        load_schema("inventory")


def test_validator_is_cached_and_keeps_data() -> None:
    customer = sample_event("customer")
    del customer["active_flag"]

    validator("customer")(customer)

    assert validator("customer") is validator("customer")
    assert "active_flag" not in customer  # the schema's default is not filled in


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_sample_event_is_valid(event_type: str) -> None:
    assert first_error(event_type, sample_event(event_type)) is None


@pytest.mark.parametrize("status", ["placed", "accepted", "cancelled"])
def test_order_shapes_are_valid(status: str) -> None:
    assert first_error("order", sample_order(status)) is None


Mutation = Callable[[dict[str, Any]], None]


def _delete(*path: str | int) -> Mutation:
    def mutate(event: dict[str, Any]) -> None:
        node: Any = event
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


def _set(value: Any, *path: str | int) -> Mutation:
    def mutate(event: dict[str, Any]) -> None:
        node: Any = event
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


INVALID_CASES: list[tuple[str, Mutation, dict[str, str]]] = [
    ("customer", _delete("id"), {"id": "'id' is a required property"}),
    ("customer", _set(None, "create_date"), {"create_date": "None is not of type 'string'"}),
    ("customer", _set("yes", "active_flag"), {"active_flag": "'yes' is not of type 'boolean'"}),
    ("customer", _set(42, "id"), {"id": "42 is not of type 'string'"}),
    ("employee", _delete("email"), {"email": "'email' is a required property"}),
    ("employee", _delete("change_date"), {"change_date": "'change_date' is a required property"}),
    ("category", _delete("name"), {"name": "'name' is a required property"}),
    ("category", _set([{}], "parent_categories"), {"parent_categories.0.id": "'id' is a required property"}),
    ("product", _delete("is_sku"), {"is_sku": "'is_sku' is a required property"}),
    ("product", _set("5", "rating"), {"rating": "'5' is not of type 'number'"}),
    ("product", _set([{"id": "c", "name": 3}], "categories"), {"categories.0.name": "3 is not of type 'string'"}),
    ("product", _set([{}], "images"), {"images.0.url": "'url' is a required property"}),
    ("cart", _delete("customer"), {"customer": "'customer' is a required property"}),
    ("cart", _delete("customer", "id"), {"customer.id": "'id' is a required property"}),
    ("cart", _set(-1, "total_tax"), {"total_tax": "-1 is less than the minimum of 0"}),
    ("cart", _set(1.5, "items", 0, "quantity"), {"items.0.quantity": "1.5 is not of type 'integer'"}),
    ("cart", _set(-0.01, "items", 0, "price"), {"items.0.price": "-0.01 is less than the minimum of 0"}),
    ("cart", _delete("items", 0, "product", "code"), {"items.0.product.code": "'code' is a required property"}),
    ("cart", _set({"visit_id": "1"}, "visit"), {"visit.visitor_id": "'visitor_id' is a required property"}),
    ("order", _set("canceled", "status"), {"status": "'canceled' is not one of ['placed', 'accepted', 'cancelled']"}),
    ("order", _delete("status"), {"status": "'status' is a required property"}),
    ("order", _delete("currency"), {"currency": "'currency' is a required property"}),
    ("order", _set("phone", "channel"), {"channel": "'phone' is not one of ['online', 'retail', 'wholesale', 'pr']"}),
    ("order", _set("gone", "items", 0, "status"), {"items.0.status": "'gone' is not one of ['accepted', 'cancelled']"}),
    ("order", _delete("items", 0, "order_item_number"), {"items.0.order_item_number": "'order_item_number' is a required property"}),
    ("product.cost", _set("", "sku_code"), {"sku_code": "'' is too short"}),
    ("product.cost", _set("7.5", "sku_cost"), {"sku_cost": "'7.5' is not of type 'number'"}),
    ("product.cost", _delete("effective_date"), {"effective_date": "'effective_date' is a required property"}),
    ("product.inventory", _set(None, "inventory_level"), {"inventory_level": "None is not of type 'integer'"}),
    ("product.inventory", _delete("inventory_level"), {"inventory_level": "'inventory_level' is a required property"}),
    ("pageview", _delete("site"), {"site": "'site' is a required property"}),
    ("pageview", _set("landing", "pageview", "page_type"), {"pageview.page_type": "'landing' is not one of ['homepage', 'cart', 'order_confirm', 'order_success', 'checkout', 'product', 'category', 'search', 'other']"}),
    ("pageview", _delete("visit", "visitor"), {"visit.visitor": "'visitor' is a required property"}),
    ("visit", _delete("visit", "user_agent"), {"visit.user_agent": "'user_agent' is a required property"}),
    ("visit", _set(list("abcdef"), "visit", "tag_attribution"), {"visit.tag_attribution": "['a', 'b', 'c', 'd', 'e', 'f'] is too long"}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("event_type", "mutate", "expected"),
    INVALID_CASES,
    ids=[f"{case[0]}-{next(iter(case[2]))}" for case in INVALID_CASES],
)
def test_invalid_event_reports_first_error(
    event_type: str, mutate: Mutation, expected: dict[str, str]
) -> None:
    event = sample_event(event_type)
    mutate(event)

    assert first_error(event_type, event) == expected


def test_every_event_type_has_an_invalid_case() -> None:
    assert {case[0] for case in INVALID_CASES} == set(EVENT_TYPES)


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_event_that_is_not_an_object_is_rejected(event_type: str) -> None:
    assert first_error(event_type, [1]) == {"": "[1] is not of type 'object'"}


def test_only_first_error_is_reported() -> None:
    customer = sample_event("customer")
    del customer["id"]
    customer["create_date"] = None

    errors = first_error("customer", customer)

    assert errors == {"id": "'id' is a required property"}


ORDER_SHAPE_CASES: list[tuple[str, Mutation, dict[str, str]]] = [
    # A placed order needs no items or totals, but does need the customer.
    ("placed", _delete("customer"), {"customer": "'customer' is a required property"}),
    ("placed", _delete("order_date"), {"order_date": "'order_date' is a required property"}),
    # A cancelled order needs only its number, date and status.
    ("cancelled", _delete("cancel_date"), {"cancel_date": "'cancel_date' is a required property"}),
    # The shape follows the status: a cancelled order relabelled "placed" lacks customer.
    ("cancelled", _set("placed", "status"), {"customer": "'customer' is a required property"}),
    ("placed", _set("accepted", "status"), {"create_date": "'create_date' is a required property"}),
    ("accepted", _set("cancelled", "status"), {"cancel_date": "'cancel_date' is a required property"}),
    ("cancelled", _set("canceled", "status"), {"status": "'canceled' is not one of ['placed', 'accepted', 'cancelled']"}),
]  # fmt: skip


@pytest.mark.parametrize(("status", "mutate", "expected"), ORDER_SHAPE_CASES)
def test_order_shape_follows_status(
    status: str, mutate: Mutation, expected: dict[str, str]
) -> None:
    order = sample_order(status)
    mutate(order)

    assert first_error("order", order) == expected


LENIENT_CASES: list[tuple[str, Mutation]] = [
    ("customer", _set("2014-03-11T15:16:10+0000", "create_date")),
    ("customer", _set("2014-03-11T11:16:10-04:00", "change_date")),
    ("customer", _set("2014-03-11T25:99:99", "change_date")),
    ("customer", _set("yesterday", "create_date")),
    ("product.cost", _set("01/02/2015", "effective_date")),
    ("product.inventory", _set("2015-1-1", "effective_date")),
    ("customer", _set("free", "loyalty_tier")),
    ("cart", _set({"any": ["thing"]}, "extension")),
    ("cart", _set("x", "items", 0, "product", "color")),
    ("order", _set([], "items")),
    ("cart", _set([], "items")),
    ("order", _set(-5, "total_discounts")),
    ("product.inventory", _set(-3, "inventory_level")),
    ("product", _delete("name")),
]


@pytest.mark.parametrize(("event_type", "mutate"), LENIENT_CASES)
def test_live_server_leniency_is_kept(event_type: str, mutate: Mutation) -> None:
    event = sample_event(event_type)
    mutate(event)

    assert first_error(event_type, event) is None


def test_samples_are_fresh_objects() -> None:
    first = sample_event("cart")
    original = copy.deepcopy(first)
    first["items"].clear()

    assert sample_event("cart") == original
