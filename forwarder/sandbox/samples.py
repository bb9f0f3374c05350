"""Valid sample events of every type, for tests, demos and benchmarks.

Each call returns a new object, so callers may change it freely. `sample_event("order")`
returns an accepted order. Use `sample_order(status)` for the placed and cancelled shapes.
"""

from __future__ import annotations

from typing import Any

_CREATED = "2014-03-11T15:16:10.000Z"
_CHANGED = "2014-03-12T09:01:44.000Z"


def _customer(number: int = 1) -> dict[str, Any]:
    return {
        "id": f"c{number}",
        "create_date": _CREATED,
        "change_date": _CHANGED,
        "email": f"customer{number}@example.com",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "active_flag": True,
    }


def _product(number: int = 1) -> dict[str, Any]:
    return {
        "id": f"p{number}",
        "code": f"SKU-{number}",
        "is_product": True,
        "is_sku": True,
        "create_date": _CREATED,
        "change_date": _CHANGED,
        "name": f"Product {number}",
        "categories": [{"id": "cat1", "name": "Shoes"}],
    }


def _item(number_field: str, number: int) -> dict[str, Any]:
    return {
        "id": f"i{number}",
        "create_date": _CREATED,
        "change_date": _CHANGED,
        number_field: str(number),
        "quantity": 2,
        "price": 19.99,
        "discount_price": 0,
        "product": _product(number),
    }


def _visit_link() -> dict[str, str]:
    return {
        "visit_id": "1394551234123456",
        "visitor_id": "1394551234987654",
        "pageview_id": "1394551299000001",
        "last_pageview_id": "1394551299000000",
    }


def _totals() -> dict[str, float]:
    return {
        "subtotal": 39.98,
        "total": 44.98,
        "total_tax": 3.0,
        "total_shipping": 2.0,
        "total_payment_cost": 0,
        "total_discounts": 0,
    }


def sample_order(status: str = "accepted", number: int = 1) -> dict[str, Any]:
    """Return a valid order of the shape `status`: placed, accepted or cancelled."""
    if status == "placed":
        return {
            "order_number": f"o{number}",
            "customer": _customer(),
            "status": "placed",
            "order_date": _CREATED,
            "cart_id": f"cart{number}",
            "visit": _visit_link(),
        }
    if status == "accepted":
        item = {**_item("order_item_number", 1), "status": "accepted"}
        return {
            "order_number": f"o{number}",
            "customer": _customer(),
            "order_date": _CREATED,
            "create_date": _CREATED,
            "change_date": _CHANGED,
            "status": "accepted",
            "currency": "USD",
            "items": [item],
            **_totals(),
            "channel": "online",
            "delivery_address": {"city": "London", "country": "GB"},
        }
    if status == "cancelled":
        return {"order_number": f"o{number}", "cancel_date": _CHANGED, "status": "cancelled"}
    raise ValueError(f"unknown order status {status!r}: expected placed, accepted or cancelled")


def sample_event(event_type: str, number: int = 1) -> dict[str, Any]:
    """Return a valid event of `event_type` (a batch key or a tracker type).

    `number` goes into the ids, so different numbers give different events.
    """
    if event_type == "customer":
        return _customer(number)
    if event_type == "employee":
        return {**_customer(number), "id": f"e{number}", "email": f"staff{number}@example.com"}
    if event_type == "category":
        return {
            "id": f"cat{number}",
            "name": "Shoes",
            "create_date": _CREATED,
            "change_date": _CHANGED,
            "parent_categories": [{"id": "cat0"}],
        }
    if event_type == "product":
        return _product(number)
    if event_type == "cart":
        return {
            "id": f"cart{number}",
            "create_date": _CREATED,
            "change_date": _CHANGED,
            **_totals(),
            "currency": "USD",
            "customer": _customer(),
            "items": [_item("cart_item_number", 1)],
            "visit": _visit_link(),
        }
    if event_type == "order":
        return sample_order("accepted", number)
    if event_type == "product.cost":
        return {
            "sku_code": f"SKU-{number}",
            "sku_cost": 7.5,
            "change_date": _CHANGED,
            "effective_date": "2015-01-01",
        }
    if event_type == "product.inventory":
        return {
            "sku_code": f"SKU-{number}",
            "inventory_level": 0,
            "change_date": _CHANGED,
            "effective_date": "2015-01-01",
            "low_stock_alert": 5,
        }
    if event_type == "pageview":
        return {
            "site": "1001",
            "org": "acme",
            "timestamp": _CREATED,
            "visit": {"id": "1394551234123456", "visitor": "1394551234987654"},
            "pageview": {
                "page_type": "product",
                "product": {"product_code": f"SKU-{number}", "name": f"Product {number}"},
            },
        }
    if event_type == "visit":
        return {
            "site": "1001",
            "visit": {
                "id": f"{1394551234123456 + number}",
                "visitor": "1394551234987654",
                "landing_url": "https://shop.example.com/",
                "referrer_url": "",
                "user_agent": "Mozilla/5.0",
                "tag_attribution": ["newsletter"],
                "rule_attribution": [],
            },
        }
    raise KeyError(f"unknown event type {event_type!r}")
