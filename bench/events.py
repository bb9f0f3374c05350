"""Producer envelopes for the benchmarks: 1.2 KB carts and a mix of types and sizes.

Envelopes are built from byte templates, because building and encoding a dict per
event would make the fill step slower than the drain it prepares.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import orjson

CREATED = "2026-11-20T15:16:10.000Z"
CHANGED = "2026-11-21T09:01:44.000Z"
# The placeholder `bench_ts` value is replaced by the push time (seconds since the
# epoch) in the latency scenarios; the sink reads it back from the delivered data.
NO_TS = b"0.0"


def site_ids(count: int, first: int = 1001) -> list[str]:
    return [str(first + index) for index in range(count)]


def _customer(number: str, first_name: str = "Ada", last_name: str = "Lovelace") -> dict:
    return {
        "id": f"c{number}",
        "create_date": CREATED,
        "change_date": CHANGED,
        "email": f"customer{number}@example.com",
        "first_name": first_name,
        "last_name": last_name,
        "active_flag": True,
    }


def _product(number: int, name: str) -> dict:
    return {
        "id": f"p{number}",
        "code": f"SKU-{number}",
        "is_product": True,
        "is_sku": True,
        "create_date": CREATED,
        "change_date": CHANGED,
        "name": name,
        "categories": [{"id": "cat1", "name": "Shoes"}],
    }


def _item(field: str, number: int, name: str) -> dict:
    return {
        "id": f"i{number}",
        "create_date": CREATED,
        "change_date": CHANGED,
        field: str(number),
        "quantity": 2,
        "price": 19.99,
        "discount_price": 0,
        "product": _product(number, name),
    }


_TOTALS = {
    "subtotal": 39.98,
    "total": 44.98,
    "total_tax": 3.0,
    "total_shipping": 2.0,
    "total_payment_cost": 0,
    "total_discounts": 0,
}

_VISIT = {
    "visit_id": "1394551234123456",
    "visitor_id": "1394551234987654",
    "pageview_id": "1394551299000001",
    "last_pageview_id": "1394551299000000",
}


def _cart(items: int, name: str = "Trail runner") -> dict:
    return {
        "id": "cart@N@",
        "create_date": CREATED,
        "change_date": CHANGED,
        **_TOTALS,
        "currency": "USD",
        "customer": _customer("@N@"),
        "items": [_item("cart_item_number", number, f"{name} {number}") for number in range(1, items + 1)],
        "cart_id": "cart@N@",
        "cookies": {
            "session": "3f2a9c1e7b5d4f60a1b2c3d4e5f60718",
            "ab": "checkout-b",
            "utm_source": "newsletter",
            "utm_campaign": "winter-sale-2026",
        },
        "visit": _VISIT,
        "bench_ts": "@TS@",
    }


def _order(items: int, name: str) -> dict:
    return {
        "order_number": "o@N@",
        "customer": _customer("@N@"),
        "order_date": CREATED,
        "create_date": CREATED,
        "change_date": CHANGED,
        "status": "accepted",
        "currency": "USD",
        "items": [
            {**_item("order_item_number", number, f"{name} {number}"), "status": "accepted"}
            for number in range(1, items + 1)
        ],
        **_TOTALS,
        "channel": "online",
        "delivery_address": {"city": "London", "country": "GB"},
        "bench_ts": "@TS@",
    }


def _small(event_type: str, name: str) -> dict:
    if event_type == "category":
        return {"id": "cat@N@", "name": name, "create_date": CREATED, "change_date": CHANGED,
                "parent_categories": [{"id": "cat0"}], "bench_ts": "@TS@"}
    if event_type == "product":
        return {**_product(0, name), "id": "p@N@", "bench_ts": "@TS@"}
    if event_type == "customer":
        return {**_customer("@N@", *name.split(" ", 1)), "bench_ts": "@TS@"}
    if event_type == "employee":
        return {**_customer("@N@", *name.split(" ", 1)), "id": "e@N@", "bench_ts": "@TS@"}
    if event_type == "product.inventory":
        return {"sku_code": "SKU-@N@", "inventory_level": 7, "change_date": CHANGED,
                "effective_date": "2026-11-21", "low_stock_alert": 5, "bench_ts": "@TS@"}
    if event_type == "product.cost":
        return {"sku_code": "SKU-@N@", "sku_cost": 7.5, "change_date": CHANGED,
                "effective_date": "2026-11-21", "bench_ts": "@TS@"}
    raise KeyError(event_type)


class Template:
    """One envelope as bytes with three slots: site id, event number and push time."""

    def __init__(self, event_type: str, data: dict) -> None:
        envelope = orjson.dumps({"site_id": "@S@", "type": event_type, "id": "ev-@N@", "data": data})
        # The quotes around "@TS@" go too, so that the push time is a JSON number.
        text = envelope.replace(b"%", b"%%").replace(b'"@TS@"', b"%(ts)s")
        self.format = text.replace(b"@S@", b"%(site)s").replace(b"@N@", b"%(n)d")
        self.event_type = event_type
        self.size = len(self.render(b"1001", 1))

    def render(self, site: bytes, number: int, ts: bytes = NO_TS) -> bytes:
        return self.format % {b"site": site, b"n": number, b"ts": ts}


def cart_template() -> Template:
    """The 1.2 KB cart envelope of scenario 1 (one item, cookies and a visit link)."""
    return Template("cart", _cart(1))


# (weight, type, number of items for carts and orders or a name for the rest).
# Names with accents and CJK text make about one event in five non-ASCII.
_MIX: list[tuple[int, str, object]] = [
    (25, "cart", 1),
    (8, "cart", 3),
    (2, "cart", 8),
    (16, "product", "Chaussure de randonnée"),
    (8, "product", "Trail runner"),
    (12, "product.inventory", ""),
    (6, "product.cost", ""),
    (8, "category", "Shoes"),
    (2, "category", "靴とブーツ"),
    (5, "customer", "Ada Lovelace"),
    (2, "customer", "Zoë Ångström"),
    (1, "employee", "Grace Hopper"),
    (3, "order", 1),
    (1, "order", 12),
    (1, "order", 40),
]


def mix_templates() -> list[tuple[int, Template]]:
    """The weighted templates of the mixed scenario: small categories to 40-item orders."""
    templates = []
    for weight, event_type, shape in _MIX:
        if event_type == "cart":
            data = _cart(int(shape))  # type: ignore[arg-type]
        elif event_type == "order":
            name = "Wanderstiefel Größe" if shape == 12 else "Trail runner"
            data = _order(int(shape), name)  # type: ignore[arg-type]
        else:
            data = _small(event_type, str(shape))
        templates.append((weight, Template(event_type, data)))
    return templates


def envelopes(
    count: int, sites: list[str], templates: list[tuple[int, Template]], seed: int = 7
) -> Iterator[bytes]:
    """Yield `count` envelopes, sites round robin, types drawn by weight with a fixed seed."""
    site_bytes = [site.encode() for site in sites]
    rng = random.Random(seed)
    choices = [template for _, template in templates]
    weights = [weight for weight, _ in templates]
    if len(choices) == 1:
        only = choices[0]
        for number in range(count):
            yield only.render(site_bytes[number % len(site_bytes)], number)
        return
    # Draw in blocks: one choices() call per 10,000 events is much cheaper than per event.
    number = 0
    while number < count:
        block = rng.choices(choices, weights, k=min(10_000, count - number))
        for template in block:
            yield template.render(site_bytes[number % len(site_bytes)], number)
            number += 1


def mean_size(templates: list[tuple[int, Template]]) -> float:
    total = sum(weight for weight, _ in templates)
    return sum(weight * template.size for weight, template in templates) / total
