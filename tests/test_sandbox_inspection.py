"""Recorded state, the /_sandbox/ inspection endpoints, record modes, waiting and logging."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import structlog

from forwarder.sandbox import Sandbox, sample_event

TOKENS = {"secret-token-a": {"1001", "1002"}, "secret-token-b": {"2001"}}


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(tokens=TOKENS) as sb:
        yield sb


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def post(
    session: aiohttp.ClientSession, url: str, body: Any, token: str = "secret-token-a"
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.post(url, data=orjson.dumps(body), headers=headers) as response:
        return response.status, orjson.loads(await response.read())


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        return response.status, orjson.loads(await response.read())


async def test_received_returns_accepted_events_in_order(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    carts = [sample_event("cart", number) for number in range(3)]
    invalid = sample_event("cart", 9)
    del invalid["currency"]
    await post(session, f"{sandbox.base_url}/1001/batch", {"cart": [carts[0], invalid, carts[1]]})
    await post(session, f"{sandbox.base_url}/1001/cart", carts[2])
    await post(session, f"{sandbox.base_url}/1002/customer", sample_event("customer"))
    await post(
        session, f"{sandbox.base_url}/1001/batch", {"customer": [sample_event("customer", 5)]}
    )

    status, received = await get(session, f"{sandbox.url}/_sandbox/received?site=1001")
    _, carts_only = await get(session, f"{sandbox.url}/_sandbox/received?site=1001&type=cart")
    _, unknown_site = await get(session, f"{sandbox.url}/_sandbox/received?site=4242")

    assert status == 200
    assert received == [
        {"type": "cart", "data": carts[0]},
        {"type": "cart", "data": carts[1]},
        {"type": "cart", "data": carts[2]},
        {"type": "customer", "data": sample_event("customer", 5)},
    ]
    assert [event["data"] for event in carts_only] == carts
    assert unknown_site == []


async def test_received_requires_site(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    status, body = await get(session, f"{sandbox.url}/_sandbox/received")

    assert status == 400
    assert "site" in body["error"]


@pytest.mark.parametrize("event_type", ["nosuch", "inventory", "Cart", ""])
async def test_received_rejects_unknown_type(
    sandbox: Sandbox, session: aiohttp.ClientSession, event_type: str
) -> None:
    await post(session, f"{sandbox.base_url}/1001/cart", sample_event("cart"))

    status, body = await get(
        session, f"{sandbox.url}/_sandbox/received?site=1001&type={event_type}"
    )

    assert status == 400
    assert body["error"] == (
        f"invalid type {event_type!r}: expected one of cart, category, customer, employee, "
        "order, product, product.cost, product.inventory, pageview, visit"
    )


@pytest.mark.parametrize("event_type", ["product.inventory", "pageview"])
async def test_received_accepts_every_event_type(
    sandbox: Sandbox, session: aiohttp.ClientSession, event_type: str
) -> None:
    event = sample_event(event_type)
    if event_type == "pageview":
        event["site"] = "1001"
        await post(session, f"{sandbox.base_url}/tracker/pageview", event)
    else:
        await post(session, f"{sandbox.base_url}/1001/inventory", event)

    status, body = await get(
        session, f"{sandbox.url}/_sandbox/received?site=1001&type={event_type}"
    )

    assert status == 200
    assert body == [{"type": event_type, "data": event}]


async def test_duplicates_are_kept_and_counted(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    cart = sample_event("cart")
    reordered = dict(reversed(list(cart.items())))  # same data, keys in another order
    await post(session, f"{sandbox.base_url}/1001/batch", {"cart": [cart, cart]})
    await post(session, f"{sandbox.base_url}/1001/cart", reordered)
    # The same data for another site or type is not a duplicate.
    await post(session, f"{sandbox.base_url}/1002/cart", cart)

    _, stats = await get(session, f"{sandbox.url}/_sandbox/stats")

    assert len(sandbox.state.events("1001")) == 3
    assert sandbox.state.duplicate_count("1001", "cart") == 2
    assert stats["duplicates"] == {"total": 2, "by_site": {"1001": {"cart": 2}}}


async def test_stats_counts_requests_and_events(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    invalid = sample_event("product")
    del invalid["id"]
    await post(
        session, f"{sandbox.base_url}/1001/batch", {"product": [sample_event("product"), invalid]}
    )
    await post(session, f"{sandbox.base_url}/1001/batch", {"order": [sample_event("order")]})
    await post(
        session,
        f"{sandbox.base_url}/2001/batch",
        {"customer": [sample_event("customer")]},
        "secret-token-b",
    )
    await post(session, f"{sandbox.base_url}/2001/batch", {}, "secret-token-a")
    await post(session, f"{sandbox.base_url}/1001/customer", {"id": None})

    status, stats = await get(session, f"{sandbox.url}/_sandbox/stats")

    assert status == 200
    assert stats["requests"] == {
        "total": 5,
        "in_flight": 0,
        "hanging": 0,
        "by_status": {"200": 3, "400": 1, "403": 1},
    }
    assert stats["accepted"] == {
        "total": 3,
        "by_site": {"1001": {"product": 1, "order": 1}, "2001": {"customer": 1}},
    }
    assert stats["rejected"] == {"total": 2, "by_site": {"1001": {"product": 1, "customer": 1}}}
    assert stats["duplicates"]["total"] == 0
    assert stats["record"] == "full"


async def test_request_log_records_each_request(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    body = {"cart": [sample_event("cart")], "customer": [sample_event("customer"), {"id": 1}]}
    await post(session, f"{sandbox.base_url}/1001/batch", body)
    await post(session, f"{sandbox.base_url}/1001/batch", {}, token="wrong")
    await post(session, f"{sandbox.base_url}/2001/batch", {}, token="secret-token-b")

    status, log = await get(session, f"{sandbox.url}/_sandbox/requests")
    _, last = await get(session, f"{sandbox.url}/_sandbox/requests?limit=1")
    _, site_2001 = await get(session, f"{sandbox.url}/_sandbox/requests?site=2001")

    assert status == 200
    assert len(log) == 3
    first = log[0]
    assert first["method"] == "POST"
    assert first["path"] == "/v2/1001/batch"
    assert first["site"] == "1001"
    assert first["token"] == "token-1"
    assert first["token"] == sandbox.token_label("secret-token-a")
    assert first["body_bytes"] == len(orjson.dumps(body))
    assert first["status"] == 200
    assert first["outcome"] == "response"
    assert first["events"] == 3
    assert first["accepted"] == 2
    assert first["time"] > 0
    assert first["duration_s"] >= 0
    assert log[1]["token"] == "unknown"
    assert log[1]["error_type"] == "invalid_token"
    assert log[2]["token"] == "token-2"
    assert last == log[2:]
    assert site_2001 == log[2:]
    assert "secret-token" not in orjson.dumps(log).decode()


async def test_request_log_limit_keeps_latest(session: aiohttp.ClientSession) -> None:
    async with Sandbox(tokens=TOKENS, request_log_limit=2) as sandbox:
        for site in ("1001", "1002", "1001"):
            await post(session, f"{sandbox.base_url}/{site}/batch", {})

    assert [record.site for record in sandbox.state.requests] == ["1002", "1001"]
    assert sandbox.state.total_requests == 3
    assert sandbox.state.requests_by_status[200] == 3


async def test_reset_clears_state_and_faults(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    await post(session, f"{sandbox.base_url}/1001/batch", {"cart": [sample_event("cart")] * 2})
    sandbox.faults.add("error", site="1002")

    async with session.post(f"{sandbox.url}/_sandbox/reset") as response:
        reset_status = response.status
    _, stats = await get(session, f"{sandbox.url}/_sandbox/stats")
    _, received = await get(session, f"{sandbox.url}/_sandbox/received?site=1001")
    _, faults = await get(session, f"{sandbox.url}/_sandbox/faults")
    status_after, _ = await post(session, f"{sandbox.base_url}/1002/batch", {})

    assert reset_status == 200
    assert stats["requests"]["total"] == 0
    assert stats["accepted"]["total"] == 0
    assert stats["duplicates"]["total"] == 0
    assert received == []
    assert faults == []
    assert status_after == 200


async def test_count_mode_keeps_counters_only(session: aiohttp.ClientSession) -> None:
    async with Sandbox(tokens=TOKENS, record="count", validate=False) as sandbox:
        batch = {"cart": [{"n": 1}, {"n": 1}, {"n": 2}], "order": [{}]}
        await post(session, f"{sandbox.base_url}/1001/batch", batch)
        received_status, received = await get(session, f"{sandbox.url}/_sandbox/received?site=1001")
        _, stats = await get(session, f"{sandbox.url}/_sandbox/stats")

    assert received_status == 409
    assert "record mode 'count'" in received["error"]
    assert stats["accepted"] == {"total": 4, "by_site": {"1001": {"cart": 3, "order": 1}}}
    assert stats["duplicates"] == {"total": None, "by_site": None}
    assert sandbox.state.received == {}
    with pytest.raises(RuntimeError, match="record mode 'count'"):
        sandbox.state.events("1001")


async def test_digest_mode_counts_duplicates_without_events(session: aiohttp.ClientSession) -> None:
    async with Sandbox(tokens=TOKENS, record="digest", validate=False) as sandbox:
        await post(
            session, f"{sandbox.base_url}/1001/batch", {"cart": [{"n": 1}, {"n": 1}, {"n": 2}]}
        )
        await post(session, f"{sandbox.base_url}/1001/batch", {"cart": [{"n": 2}]})

    assert sandbox.state.accepted_count("1001", "cart") == 4
    assert sandbox.state.duplicate_count("1001", "cart") == 2
    assert sandbox.state.received == {}


async def test_wait_for_returns_when_condition_holds(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    async def send_all() -> None:
        for number in range(20):
            await post(
                session,
                f"{sandbox.base_url}/1001/batch",
                {"customer": [sample_event("customer", number)]},
            )

    sender = asyncio.create_task(send_all())
    state = await sandbox.wait_for(lambda state: state.total_accepted >= 20, timeout=10)
    await sender

    assert state.total_accepted == 20


async def test_wait_for_sees_brief_conditions(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    # The task starts only when the test awaits, so the waiter registers first.
    sender = asyncio.create_task(post(session, f"{sandbox.base_url}/1001/batch", {}))

    await sandbox.wait_for(lambda state: state.in_flight == 1, timeout=5)
    status, _ = await sender

    assert status == 200
    assert sandbox.state.in_flight == 0


async def test_wait_for_timeout_reports_state(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    await post(session, f"{sandbox.base_url}/1001/batch", {})

    with pytest.raises(TimeoutError) as raised:
        await sandbox.wait_for(lambda state: state.total_accepted >= 1, timeout=0.05)

    assert "not met within 0.05 s" in str(raised.value)
    assert "1 requests (200: 1)" in str(raised.value)


async def test_wait_for_requests(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    sender = asyncio.create_task(post(session, f"{sandbox.base_url}/1001/batch", {}))

    state = await sandbox.wait_for_requests(1)

    assert state.total_requests == 1
    await sender


async def test_request_is_logged_without_token(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    with structlog.testing.capture_logs() as logs:
        await post(session, f"{sandbox.base_url}/1001/batch", {"cart": [sample_event("cart")]})
        await post(session, f"{sandbox.base_url}/1001/batch", {}, token="secret-token-unknown")

    requests = [entry for entry in logs if entry["event"] == "sandbox request"]
    assert len(requests) == 2
    assert requests[0]["log_level"] == "info"
    assert requests[0]["method"] == "POST"
    assert requests[0]["path"] == "/v2/1001/batch"
    assert requests[0]["site"] == "1001"
    assert requests[0]["status"] == 200
    assert requests[0]["events"] == 1
    assert requests[0]["accepted"] == 1
    assert requests[0]["body_bytes"] > 0
    assert requests[0]["token"] == "token-1"
    assert requests[1]["status"] == 403
    assert requests[1]["token"] == "unknown"
    assert "secret-token" not in repr(logs)
