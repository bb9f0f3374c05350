"""The sandbox's Event API over real HTTP: paths, tokens, errors, batches and leniency."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from forwarder.sandbox import Sandbox, sample_event, sample_order
from forwarder.sandbox.responses import PIXEL_GIF
from forwarder.sandbox.validation import PATH_TYPES

TOKENS = {"tok-a": {"1001", "1002"}, "tok-b": {"2001"}, "tok-all": {"*"}}


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(tokens=TOKENS) as sb:
        yield sb


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def send(
    session: aiohttp.ClientSession,
    url: str,
    body: Any,
    *,
    token: str | None = "tok-a",
    method: str = "POST",
    content_type: str | None = "application/json",
) -> tuple[int, Any, str]:
    """Send `body` (bytes as they are, anything else as JSON); return status, JSON and text."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    skip = []
    if content_type is None:
        skip.append("Content-Type")
    else:
        headers["Content-Type"] = content_type
    async with session.request(
        method, url, data=data, headers=headers, skip_auto_headers=skip
    ) as response:
        text = await response.text()
        parsed = orjson.loads(text) if response.content_type == "application/json" else None
        return response.status, parsed, text


@pytest.mark.parametrize(("path_type", "event_type"), sorted(PATH_TYPES.items()))
async def test_site_path_accepts_its_event_type(
    sandbox: Sandbox, session: aiohttp.ClientSession, path_type: str, event_type: str
) -> None:
    event = sample_event(event_type)

    status, body, _ = await send(session, f"{sandbox.base_url}/1001/{path_type}", event)

    assert status == 200
    assert body == {"success": True}
    assert sandbox.state.data("1001", event_type) == [event]


def test_path_types_match_the_api() -> None:
    assert PATH_TYPES["inventory"] == "product.inventory"
    assert sorted(PATH_TYPES) == [
        "cart", "category", "customer", "employee", "inventory", "order", "product", "product.cost",
    ]  # fmt: skip


@pytest.mark.parametrize(("path_type", "event_type"), sorted(PATH_TYPES.items()))
async def test_site_path_rejects_invalid_event(
    sandbox: Sandbox, session: aiohttp.ClientSession, path_type: str, event_type: str
) -> None:
    event = sample_event(event_type)
    field = next(iter(event))
    event[field] = None

    status, body, _ = await send(session, f"{sandbox.base_url}/1001/{path_type}", event)

    assert status == 400
    assert body["error_type"] == "validation"
    assert body["success"] is False
    assert list(body["errors"]) == [field]
    assert sandbox.state.accepted_count() == 0
    assert sandbox.state.rejected[("1001", event_type)] == 1


@pytest.mark.parametrize("tracker_type", ["pageview", "visit"])
async def test_tracker_path_accepts_event_for_body_site(
    sandbox: Sandbox, session: aiohttp.ClientSession, tracker_type: str
) -> None:
    event = sample_event(tracker_type)
    event["site"] = "1002"

    status, body, _ = await send(session, f"{sandbox.base_url}/tracker/{tracker_type}", event)

    assert status == 200
    assert body == {"success": True}
    assert sandbox.state.data("1002", tracker_type) == [event]
    assert sandbox.state.requests[-1].site == "1002"


async def test_tracker_path_authorises_body_site(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    event = sample_event("pageview")
    event["site"] = "2001"

    status, body, _ = await send(
        session, f"{sandbox.base_url}/tracker/pageview", event, token="tok-a"
    )

    assert status == 403
    assert body["error_type"] == "authorization"


async def test_tracker_path_without_site_is_validation_error(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    event = sample_event("visit")
    del event["site"]

    status, body, _ = await send(session, f"{sandbox.base_url}/tracker/visit", event)

    assert status == 400
    assert body == {
        "error_type": "validation",
        "errors": {"site": "'site' is a required property"},
        "success": False,
    }


async def test_tracker_path_invalid_event(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    event = sample_event("pageview")
    event["pageview"]["page_type"] = "landing"

    status, body, _ = await send(session, f"{sandbox.base_url}/tracker/pageview", event)

    assert status == 400
    assert list(body["errors"]) == ["pageview.page_type"]
    assert sandbox.state.accepted_count() == 0


@pytest.mark.parametrize("name", ["pageview", "visit"])
async def test_tracker_pixel_returns_gif(
    sandbox: Sandbox, session: aiohttp.ClientSession, name: str
) -> None:
    async with session.get(f"{sandbox.base_url}/tracker/{name}.gif?site=1001") as response:
        body = await response.read()

        assert response.status == 200
        assert response.content_type == "image/gif"
    assert body == PIXEL_GIF
    assert body[:6] == b"GIF89a"
    assert int.from_bytes(body[6:8], "little") == 1  # width
    assert int.from_bytes(body[8:10], "little") == 1  # height
    assert body[-1:] == b";"
    assert len(body) == 43


# Every row of the API's error table: (case, method, path, token, body, status, error_type).
ERROR_TABLE: list[tuple[str, str, str, str | None, Any, int, str]] = [
    ("body not JSON", "POST", "/1001/cart", "tok-a", b"{not json", 400, "bad_json"),
    ("empty body", "POST", "/1001/customer", "tok-a", b"", 400, "bad_json"),
    ("invalid UTF-8", "POST", "/1001/batch", "tok-a", b'{"cart": ["\xff"]}', 400, "bad_json"),
    ("batch body an array", "POST", "/1001/batch", "tok-a", [], 400, "bad_json"),
    ("batch body a string", "POST", "/1001/batch", "tok-a", "cart", 400, "bad_json"),
    ("batch value not an array", "POST", "/1001/batch", "tok-a", {"cart": {}}, 400, "bad_json"),
    ("tracker body not JSON", "POST", "/tracker/pageview", "tok-a", b"<xml/>", 400, "bad_json"),
    ("unknown path type", "POST", "/1001/shipment", "tok-a", {}, 400, "invalid_type"),
    ("batch key as path", "POST", "/1001/product.inventory", "tok-a", {}, 400, "invalid_type"),
    ("unknown tracker type", "POST", "/tracker/click", "tok-a", {}, 400, "invalid_type"),
    ("unknown batch key", "POST", "/1001/batch", "tok-a", {"cart": [], "inventory": []}, 400, "invalid_type"),
    ("unknown key beats non-array", "POST", "/1001/batch", "tok-a", {"shipment": 1}, 400, "invalid_type"),
    ("path type before body", "POST", "/1001/shipment", "tok-a", b"{not json", 400, "invalid_type"),
    ("schema violation", "POST", "/1001/customer", "tok-a", {"id": "c1"}, 400, "validation"),
    ("missing token", "POST", "/1001/batch", None, {}, 403, "invalid_token"),
    ("unknown token", "POST", "/1001/batch", "tok-z", {}, 403, "invalid_token"),
    ("unknown token on tracker", "POST", "/tracker/visit", "tok-z", {}, 403, "invalid_token"),
    ("token before path type", "POST", "/1001/shipment", "tok-z", {}, 403, "invalid_token"),
    ("site of another token", "POST", "/2001/batch", "tok-a", {}, 403, "authorization"),
    ("site before body", "POST", "/2001/cart", "tok-a", b"{not json", 403, "authorization"),
    ("extra path segment", "POST", "/1001/batch/extra", "tok-a", {"cart": []}, 404, "not_found"),
    ("site id not digits", "POST", "/abc/batch", "tok-all", {"cart": []}, 404, "not_found"),
    ("site id before token", "POST", "/abc/batch", "tok-z", {"cart": []}, 404, "not_found"),
    ("site id before path type", "PUT", "/abc/shipment", "tok-all", {}, 404, "not_found"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "method", "path", "token", "body", "status", "error_type"),
    ERROR_TABLE,
    ids=[row[0] for row in ERROR_TABLE],
)
async def test_error_table_row(
    sandbox: Sandbox,
    session: aiohttp.ClientSession,
    case: str,
    method: str,
    path: str,
    token: str | None,
    body: Any,
    status: int,
    error_type: str,
) -> None:
    got_status, got_body, _ = await send(
        session, sandbox.base_url + path, body, token=token, method=method
    )

    assert got_status == status
    assert got_body["error_type"] == error_type
    assert got_body["success"] is False
    assert sandbox.state.accepted_count() == 0
    assert sandbox.state.requests[-1].error_type == error_type


async def test_unknown_error_is_503_with_message(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    sandbox.faults.add("error", message="database unavailable")

    status, body, _ = await send(session, f"{sandbox.base_url}/1001/batch", {"cart": []})

    assert status == 503
    assert body == {"error_type": "unknown", "message": "database unavailable", "success": False}


async def test_wildcard_token_writes_any_site(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    status, _, _ = await send(
        session, f"{sandbox.base_url}/987654/customer", sample_event("customer"), token="tok-all"
    )

    assert status == 200
    assert sandbox.state.accepted_count("987654") == 1


async def test_error_body_is_pretty_printed_with_sorted_keys(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    customer = sample_event("customer")
    customer["create_date"] = None

    _, _, text = await send(session, f"{sandbox.base_url}/1001/customer", customer)

    assert text == (
        "{\n"
        '  "error_type": "validation",\n'
        '  "errors": {\n'
        '    "create_date": "None is not of type \'string\'"\n'
        "  },\n"
        '  "success": false\n'
        "}"
    )


async def test_batch_mirrors_request_with_partial_failures(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    good_products = [sample_event("product", number) for number in range(3)]
    bad_product = sample_event("product", 9)
    del bad_product["code"]
    bad_cost = sample_event("product.cost")
    bad_cost["sku_cost"] = "free"
    # Keys in reverse order: the response must sort them.
    batch = {
        "product.inventory": [sample_event("product.inventory")],
        "product.cost": [bad_cost, sample_event("product.cost", 2)],
        "product": [good_products[0], bad_product, good_products[1], good_products[2]],
        "order": [sample_order("placed"), sample_order("accepted"), sample_order("cancelled")],
        "cart": [],
    }

    status, body, text = await send(session, f"{sandbox.base_url}/1001/batch", batch)

    assert status == 200
    assert list(body) == ["cart", "order", "product", "product.cost", "product.inventory"]
    assert text.index('"cart"') < text.index('"order"') < text.index('"product"')
    assert {key: len(results) for key, results in body.items()} == {
        key: len(events) for key, events in batch.items()
    }
    assert body["cart"] == []
    assert body["order"] == [{"success": True}] * 3
    assert body["product"][0] == {"success": True}
    assert body["product"][1] == {
        "error_type": "validation",
        "errors": {"code": "'code' is a required property"},
        "success": False,
    }
    assert body["product"][2:] == [{"success": True}] * 2
    assert body["product.cost"][0]["errors"] == {"sku_cost": "'free' is not of type 'number'"}
    assert body["product.cost"][1] == {"success": True}
    assert body["product.inventory"] == [{"success": True}]
    assert sandbox.state.data("1001", "product") == good_products
    assert sandbox.state.accepted_count("1001") == 3 + 3 + 1 + 1
    assert sandbox.state.rejected[("1001", "product")] == 1
    assert sandbox.state.requests[-1].events == 10
    assert sandbox.state.requests[-1].accepted == 8


async def test_empty_batch_returns_empty_object(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    status, body, _ = await send(session, f"{sandbox.base_url}/1001/batch", {})

    assert status == 200
    assert body == {}


async def test_batch_event_not_an_object_fails_alone(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    status, body, _ = await send(
        session, f"{sandbox.base_url}/1001/batch", {"customer": [7, sample_event("customer")]}
    )

    assert status == 200
    assert body["customer"][0]["errors"] == {"": "7 is not of type 'object'"}
    assert body["customer"][1] == {"success": True}


@pytest.mark.parametrize("path", ["/1001/batch", "/1001/cart", "/tracker/pageview"])
async def test_put_is_accepted_like_post(
    sandbox: Sandbox, session: aiohttp.ClientSession, path: str
) -> None:
    if path.endswith("batch"):
        body: Any = {"cart": [sample_event("cart")]}
    else:
        body = sample_event(path.rsplit("/", 1)[1])

    status, _, _ = await send(session, sandbox.base_url + path, body, method="PUT")

    assert status == 200
    assert sandbox.state.accepted_count("1001") == 1
    assert sandbox.state.requests[-1].method == "PUT"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_any_or_missing_content_type_is_accepted(
    sandbox: Sandbox, session: aiohttp.ClientSession, content_type: str | None
) -> None:
    status, _, _ = await send(
        session,
        f"{sandbox.base_url}/1001/batch",
        {"customer": [sample_event("customer")]},
        content_type=content_type,
    )

    assert status == 200
    assert sandbox.state.accepted_count("1001", "customer") == 1


async def test_get_on_event_path_is_not_allowed(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{sandbox.base_url}/1001/batch") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST,PUT"


@pytest.mark.parametrize(
    "path",
    [
        "/v2/1001/batch/extra",
        "/v2/v2/1001/batch",
        "/v2/1001",
        "/v2",
        "/v2/",
        "/v2//batch",
        "/v2/tracker/pageview/extra",
    ],
)
async def test_unknown_api_path_is_json_404(
    sandbox: Sandbox, session: aiohttp.ClientSession, path: str
) -> None:
    body = orjson.dumps({"cart": [sample_event("cart")]})

    status, parsed, text = await send(session, sandbox.url + path, body, token="tok-all")

    assert status == 404
    assert parsed["error_type"] == "not_found"
    assert parsed["success"] is False
    assert parsed["message"].startswith(f"path {path} not found: ")
    assert "base URL ends in /v2" in parsed["message"]
    assert list(parsed) == ["error_type", "message", "success"]
    assert text.startswith('{\n  "error_type": "not_found",\n  "message": ')
    assert sandbox.state.accepted_count() == 0
    record = sandbox.state.requests[-1]
    assert record.path == path
    assert record.site is None
    assert record.status == 404
    assert record.error_type == "not_found"
    assert record.token == "token-3"
    assert record.body_bytes == len(body)
    assert sandbox.state.requests_by_status[404] == 1


async def test_unknown_api_path_in_request_log_and_stats(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    await send(session, f"{sandbox.url}/v2/1001/batch/extra", {"cart": []})
    await send(session, f"{sandbox.url}/v2/abc/batch", {"cart": []})

    async with session.get(f"{sandbox.url}/_sandbox/requests") as response:
        log = await response.json()
    async with session.get(f"{sandbox.url}/_sandbox/requests?site=abc") as response:
        abc_log = await response.json()
    async with session.get(f"{sandbox.url}/_sandbox/stats") as response:
        stats = await response.json()

    assert [(entry["path"], entry["status"], entry["error_type"]) for entry in log] == [
        ("/v2/1001/batch/extra", 404, "not_found"),
        ("/v2/abc/batch", 404, "not_found"),
    ]
    assert [entry["path"] for entry in abc_log] == ["/v2/abc/batch"]
    assert stats["requests"]["total"] == 2
    assert stats["requests"]["by_status"] == {"404": 2}


async def test_unknown_api_path_ignores_faults(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    error = sandbox.faults.add("error", status=503)
    reset = sandbox.faults.add("reset")

    status, body, _ = await send(session, f"{sandbox.url}/v2/1001/batch/extra", {"cart": []})

    assert status == 404
    assert body["error_type"] == "not_found"
    assert error.fired == 0
    assert reset.fired == 0


@pytest.mark.parametrize(
    ("quoted", "site"),
    [
        ("abc", "abc"),
        ("10a1", "10a1"),
        ("-1001", "-1001"),
        ("1001.0", "1001.0"),
        ("%C2%B2", "\u00b2"),  # superscript two, which str.isdigit() accepts
        ("%D9%A1%D9%A0", "\u0661\u0660"),  # Arabic-Indic digits
        ("10%2F01", "10/01"),
    ],
)
async def test_site_id_must_be_ascii_digits(
    sandbox: Sandbox, session: aiohttp.ClientSession, quoted: str, site: str
) -> None:
    batch = {"customer": [sample_event("customer")]}

    status, body, _ = await send(
        session, f"{sandbox.base_url}/{quoted}/batch", batch, token="tok-all"
    )

    assert status == 404
    assert body["error_type"] == "not_found"
    assert body["success"] is False
    assert body["message"].startswith(f"invalid site id {site!r} in the path ")
    assert body["message"].endswith("a site id is a string of digits, such as 1001")
    assert sandbox.state.accepted_count() == 0
    assert sandbox.state.requests[-1].site == site
    assert sandbox.state.requests[-1].status == 404


@pytest.mark.parametrize("path", ["/", "/v1/1001/batch", "/v2xyz", "/_sandbox/nosuch"])
async def test_path_outside_api_is_plain_404(
    sandbox: Sandbox, session: aiohttp.ClientSession, path: str
) -> None:
    status, body, text = await send(session, sandbox.url + path, {"cart": []})

    assert status == 404
    assert body is None
    assert text == "404: Not Found"
    assert sandbox.state.total_requests == 0


@pytest.mark.parametrize(
    ("event_type", "field", "value"),
    [
        ("customer", "create_date", "2014-03-11T15:16:10+0000"),
        ("customer", "change_date", "2014-03-11T11:16:10-04:00"),
        ("customer", "change_date", "2014-03-11T99:99"),
        ("product.cost", "effective_date", "March 2015"),
        ("cart", "unexpected_property", {"nested": True}),
        ("order", "items", []),
    ],
)
async def test_batch_is_lenient_like_live_server(
    sandbox: Sandbox, session: aiohttp.ClientSession, event_type: str, field: str, value: Any
) -> None:
    event = sample_event(event_type)
    event[field] = value

    status, body, _ = await send(session, f"{sandbox.base_url}/1001/batch", {event_type: [event]})

    assert status == 200
    assert body == {event_type: [{"success": True}]}


@pytest.mark.parametrize("status", ["placed", "accepted", "cancelled"])
async def test_order_shapes_accepted_over_http(
    sandbox: Sandbox, session: aiohttp.ClientSession, status: str
) -> None:
    got_status, _, _ = await send(session, f"{sandbox.base_url}/1001/order", sample_order(status))

    assert got_status == 200


async def test_order_canceled_spelling_rejected(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    order = sample_order("cancelled")
    order["status"] = "canceled"

    status, body, _ = await send(session, f"{sandbox.base_url}/1001/order", order)

    assert status == 400
    assert body["errors"] == {
        "status": "'canceled' is not one of ['placed', 'accepted', 'cancelled']"
    }


async def test_counting_mode_skips_validation(session: aiohttp.ClientSession) -> None:
    async with Sandbox(tokens=TOKENS, validate=False) as sandbox:
        batch = {"cart": [{"not": "a cart"}, 5], "order": [{"status": "canceled"}]}

        status, body, _ = await send(session, f"{sandbox.base_url}/1001/batch", batch)
        single_status, _, _ = await send(session, f"{sandbox.base_url}/1001/customer", {"id": None})
        unknown_status, unknown_body, _ = await send(
            session, f"{sandbox.base_url}/1001/batch", {"shipment": []}
        )

    assert status == 200
    assert body == {"cart": [{"success": True}] * 2, "order": [{"success": True}]}
    assert single_status == 200
    assert unknown_status == 400
    assert unknown_body["error_type"] == "invalid_type"
    assert sandbox.state.accepted_count("1001") == 4


COUNTING_ERRORS: list[tuple[str, bytes, str]] = [
    ("not JSON", b'{"cart": [', "bad_json"),
    ("invalid UTF-8", b'{"cart": [{"name": "\xff"}]}', "bad_json"),
    ("body an array", b"[]", "bad_json"),
    ("value not an array", b'{"cart": {}}', "bad_json"),
    ("unknown batch key", b'{"cart": [], "shipment": []}', "invalid_type"),
]


@pytest.mark.parametrize(
    ("case", "body", "error_type"), COUNTING_ERRORS, ids=[row[0] for row in COUNTING_ERRORS]
)
async def test_counting_mode_reports_malformed_batches(
    session: aiohttp.ClientSession, case: str, body: bytes, error_type: str
) -> None:
    async with Sandbox(tokens=TOKENS, validate=False, record="count") as sandbox:
        status, got, _ = await send(session, f"{sandbox.base_url}/1001/batch", body)

    assert status == 400
    assert got["error_type"] == error_type
    assert sandbox.state.total_accepted == 0


async def test_counting_mode_does_not_decode_events(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_decode(body: bytes) -> Any:
        raise AssertionError("the counting path decoded the events")

    monkeypatch.setattr("forwarder.sandbox.app._decode", fail_decode)
    batch = {"cart": [sample_event("cart")] * 3, "order": [sample_event("order")]}
    async with Sandbox(tokens=TOKENS, validate=False, record="count") as sandbox:
        status, body, _ = await send(session, f"{sandbox.base_url}/1001/batch", batch)

    assert status == 200
    assert body == {"cart": [{"success": True}] * 3, "order": [{"success": True}]}
    assert sandbox.state.accepted_count("1001", "cart") == 3
    assert sandbox.state.requests[-1].events == 4
