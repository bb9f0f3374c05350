"""Fault injection: errors, Retry-After, latency, hangs, resets, size limits and poison events."""

from __future__ import annotations

import asyncio
import email.utils
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from forwarder.sandbox import Fault, Sandbox, sample_event

TOKENS = {"tok-a": {"1001", "1002"}}
AUTH = {"Authorization": "Bearer tok-a"}


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(tokens=TOKENS) as sb:
        yield sb


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=AUTH) as client:
        yield client


async def post(
    session: aiohttp.ClientSession, url: str, body: Any, **kwargs: Any
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    async with session.post(url, data=orjson.dumps(body), **kwargs) as response:
        return response.status, orjson.loads(await response.read()), response.headers


def one_customer_batch(number: int = 1) -> dict[str, list[dict[str, Any]]]:
    return {"customer": [sample_event("customer", number)]}


async def statuses(session: aiohttp.ClientSession, url: str, count: int) -> list[int]:
    result = []
    for number in range(count):
        status, _, _ = await post(session, url, one_customer_batch(number))
        result.append(status)
    return result


async def test_error_for_next_requests(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    sandbox.faults.add("error", count=2)

    got = await statuses(session, f"{sandbox.base_url}/1001/batch", 3)

    assert got == [503, 503, 200]
    assert sandbox.state.accepted_count() == 1
    assert sandbox.faults.snapshot()[0]["remaining"] == 0
    assert sandbox.faults.snapshot()[0]["fired"] == 2


async def test_error_for_one_site_spares_others(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    sandbox.faults.add("error", site="1002", status=500)

    first, _, _ = await post(session, f"{sandbox.base_url}/1001/batch", one_customer_batch())
    second, body, _ = await post(session, f"{sandbox.base_url}/1002/batch", one_customer_batch())

    assert first == 200
    assert second == 500
    assert body == {
        "error_type": "unknown",
        "message": "injected 500 unknown fault",
        "success": False,
    }


async def test_error_applies_before_token_check(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    sandbox.faults.add("error")

    status, _, _ = await post(
        session, f"{sandbox.base_url}/1001/batch", {}, headers={"Authorization": "Bearer nope"}
    )

    assert status == 503


async def test_error_custom_status_and_type(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    sandbox.faults.add("error", status=429, error_type="throttled", message="slow down")

    status, body, _ = await post(session, f"{sandbox.base_url}/1001/batch", one_customer_batch())

    assert status == 429
    assert body == {"error_type": "throttled", "message": "slow down", "success": False}


@pytest.mark.parametrize(("rate", "low", "high"), [(0.0, 0, 0), (1.0, 40, 40), (0.5, 10, 30)])
async def test_error_rate(session: aiohttp.ClientSession, rate: float, low: int, high: int) -> None:
    async with Sandbox(tokens=TOKENS, faults=[Fault("error", rate=rate)]) as sandbox:
        got = await statuses(session, f"{sandbox.base_url}/1001/batch", 40)

    assert low <= got.count(503) <= high
    assert got.count(503) + got.count(200) == 40


async def test_error_rate_repeats_with_seed(session: aiohttp.ClientSession) -> None:
    runs = []
    for seed in (7, 7, 8):
        async with Sandbox(tokens=TOKENS, seed=seed, faults=[Fault("error", rate=0.5)]) as sandbox:
            runs.append(await statuses(session, f"{sandbox.base_url}/1001/batch", 30))

    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


async def test_retry_after_seconds(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    sandbox.faults.add("error", retry_after_s=7)

    status, _, headers = await post(session, f"{sandbox.base_url}/1001/batch", {})

    assert status == 503
    assert headers["Retry-After"] == "7"


async def test_retry_after_http_date(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    sandbox.faults.add("error", retry_after_s=120, retry_after_format="date")

    before = time.time()
    status, _, headers = await post(session, f"{sandbox.base_url}/1001/batch", {})
    after = time.time()

    retry_at = email.utils.parsedate_to_datetime(headers["Retry-After"]).timestamp()
    assert status == 503
    assert headers["Retry-After"].endswith(" GMT")
    assert int(before) + 120 <= retry_at <= after + 120


async def test_no_retry_after_by_default(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    sandbox.faults.add("error")

    _, _, headers = await post(session, f"{sandbox.base_url}/1001/batch", {})

    assert "Retry-After" not in headers


async def test_latency_delays_response(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    sandbox.faults.add("latency", latency_s=0.3, count=1)
    loop = asyncio.get_running_loop()

    started = loop.time()
    status, _, _ = await post(session, f"{sandbox.base_url}/1001/batch", one_customer_batch())
    elapsed = loop.time() - started

    assert status == 200
    assert elapsed >= 0.3
    assert sandbox.state.requests[-1].duration_s >= 0.3


async def test_hang_ends_when_client_times_out(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    sandbox.faults.add("hang")

    with pytest.raises(TimeoutError):
        await post(
            session,
            f"{sandbox.base_url}/1001/batch",
            one_customer_batch(),
            timeout=aiohttp.ClientTimeout(total=0.3),
        )
    state = await sandbox.wait_for(lambda state: state.total_requests == 1)

    assert state.requests[0].outcome == "client_closed"
    assert state.requests[0].status is None
    assert state.in_flight == 0
    assert state.total_accepted == 0


async def test_hang_ends_when_fault_is_removed(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    hang = sandbox.faults.add("hang")
    pending = asyncio.create_task(
        post(session, f"{sandbox.base_url}/1001/batch", one_customer_batch())
    )
    await sandbox.wait_for(lambda state: state.hanging == 1)

    assert not pending.done()
    assert sandbox.state.total_requests == 0
    sandbox.faults.remove(hang.id)
    status, body, _ = await pending

    assert status == 200
    assert body == {"customer": [{"success": True}]}
    assert sandbox.state.accepted_count() == 1


async def test_hang_ends_when_sandbox_stops(session: aiohttp.ClientSession) -> None:
    async with Sandbox(tokens=TOKENS, faults=[Fault("hang")]) as sandbox:
        pending = asyncio.create_task(post(session, f"{sandbox.base_url}/1001/batch", {}))
        await sandbox.wait_for(lambda state: state.hanging == 1)
    status, _, _ = await pending

    assert status == 200
    assert sandbox.state.hanging == 0


async def test_reset_mid_body_is_client_error(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    sandbox.faults.add("reset", reset_after_bytes=65536, count=1)
    body = orjson.dumps({"customer": [sample_event("customer")]}) + b" " * 4_000_000
    url = f"{sandbox.base_url}/1001/batch"

    with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
        async with session.post(url, data=io.BytesIO(body)) as response:
            await response.read()
    async with session.post(url, data=io.BytesIO(body)) as retry:
        retry_status = retry.status

    first = sandbox.state.requests[0]
    assert first.outcome == "reset"
    assert first.status is None
    assert 65536 <= first.body_bytes < len(body)
    assert retry_status == 200
    assert sandbox.state.accepted_count() == 1


async def test_reset_reads_half_body_by_default(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    sandbox.faults.add("reset")
    body = b" " * 4_000_000

    with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
        async with session.post(
            f"{sandbox.base_url}/1001/batch", data=io.BytesIO(body)
        ) as response:
            await response.read()

    assert 2_000_000 <= sandbox.state.requests[0].body_bytes < 4_000_000


async def test_lower_size_limit(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    sandbox.faults.add("max_body", max_body_bytes=100, site="1001")
    small = b'{"customer": []}'
    large = small + b" " * 100
    url = f"{sandbox.base_url}/1001/batch"

    async with session.post(url, data=small) as small_response:
        small_status = small_response.status
    async with session.post(url, data=large) as large_response:
        large_body = orjson.loads(await large_response.read())
    async with session.post(f"{sandbox.base_url}/1002/batch", data=large) as other_site:
        other_status = other_site.status

    assert small_status == 200
    assert large_response.status == 413
    assert large_body["message"] == "request body is larger than the limit of 100 bytes"
    assert other_status == 200


async def test_lower_size_limit_for_next_request_only(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    sandbox.faults.add("max_body", max_body_bytes=10, count=1)
    body = b'{"customer": []}'

    async with session.post(f"{sandbox.base_url}/1001/batch", data=body) as first:
        first_status = first.status
    async with session.post(f"{sandbox.base_url}/1001/batch", data=body) as second:
        second_status = second.status

    assert (first_status, second_status) == (413, 200)


def poisoned_batch() -> dict[str, list[dict[str, Any]]]:
    poisoned = {**sample_event("cart", 2), "poison": True}
    return {"cart": [sample_event("cart", 1), poisoned], "customer": [sample_event("customer")]}


async def test_poison_fails_whole_request_with_validation(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    sandbox.faults.add("poison")

    status, body, _ = await post(session, f"{sandbox.base_url}/1001/batch", poisoned_batch())
    clean_status, _, _ = await post(
        session, f"{sandbox.base_url}/1001/batch", {"cart": [sample_event("cart", 1)]}
    )

    assert status == 400
    assert body == {
        "error_type": "validation",
        "errors": {"cart.1.poison": "event carries the poison marker poison=true (injected fault)"},
        "success": False,
    }
    assert clean_status == 200
    assert sandbox.state.accepted_count() == 1


async def test_poison_with_503(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    sandbox.faults.add("poison", status=503)

    status, body, _ = await post(session, f"{sandbox.base_url}/1001/batch", poisoned_batch())

    assert status == 503
    assert body["error_type"] == "unknown"
    assert "cart.1.poison" in body["message"]
    assert sandbox.state.accepted_count() == 0


async def test_poison_event_scope_fails_only_marked_event(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    sandbox.faults.add("poison", poison_scope="event")

    status, body, _ = await post(session, f"{sandbox.base_url}/1001/batch", poisoned_batch())

    assert status == 200
    assert body["cart"][0] == {"success": True}
    assert body["cart"][1]["error_type"] == "validation"
    assert list(body["cart"][1]["errors"]) == ["poison"]
    assert body["customer"] == [{"success": True}]
    assert sandbox.state.accepted_count() == 2


async def test_poison_custom_marker_matches_type(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    sandbox.faults.add("poison", marker_field="fail_me", marker_value=1)
    marked = {**sample_event("customer", 1), "fail_me": 1}
    same_value_other_type = {**sample_event("customer", 2), "fail_me": True}

    marked_status, marked_body, _ = await post(session, f"{sandbox.base_url}/1001/customer", marked)
    other_status, _, _ = await post(
        session, f"{sandbox.base_url}/1001/customer", same_value_other_type
    )

    assert marked_status == 400
    assert list(marked_body["errors"]) == ["fail_me"]
    assert other_status == 200


@pytest.mark.parametrize(
    ("marker_value", "shown"),
    [
        (True, "true"),
        (False, "false"),
        (None, "null"),
        ("P2", '"P2"'),
        ("it's", '"it\'s"'),
        (2, "2"),
        (1.5, "1.5"),
        ([1, "a"], '[1,"a"]'),
        ({"k": None}, '{"k":null}'),
    ],
)
async def test_poison_message_shows_marker_as_json(
    sandbox: Sandbox, session: aiohttp.ClientSession, marker_value: Any, shown: str
) -> None:
    sandbox.faults.add("poison", marker_field="sku_code", marker_value=marker_value)
    cost = {**sample_event("product.cost"), "sku_code": marker_value}

    status, body, _ = await post(
        session, f"{sandbox.base_url}/1001/batch", {"product.cost": [cost]}
    )

    assert status == 400
    assert body["errors"] == {
        "product.cost.0.sku_code": f"event carries the poison marker sku_code={shown} (injected fault)"
    }


async def test_poison_works_in_counting_mode(session: aiohttp.ClientSession) -> None:
    async with Sandbox(tokens=TOKENS, validate=False, record="count") as sandbox:
        sandbox.faults.add("poison", poison_scope="event")
        batch = {"cart": [{"poison": True}, {"anything": 1}]}

        status, body, _ = await post(session, f"{sandbox.base_url}/1001/batch", batch)

    assert status == 200
    assert body["cart"][0]["success"] is False
    assert body["cart"][1] == {"success": True}
    assert sandbox.state.accepted_count() == 1


async def test_poison_on_tracker_path(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    sandbox.faults.add("poison", site="1001")

    status, body, _ = await post(
        session, f"{sandbox.base_url}/tracker/visit", {**sample_event("visit"), "poison": True}
    )

    assert status == 400
    assert body["errors"] == {
        "poison": "event carries the poison marker poison=true (injected fault)"
    }


async def test_fault_endpoints(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    faults_url = f"{sandbox.url}/_sandbox/faults"

    async with session.post(
        faults_url, json={"kind": "error", "site": "1001", "count": 1}
    ) as added_one:
        one = await added_one.json()
    async with session.post(
        faults_url, json=[{"kind": "latency", "latency_s": 0.01}, {"kind": "poison"}]
    ) as added_two:
        two = await added_two.json()
    async with session.get(faults_url) as listed:
        listing = await listed.json()
    status, _, _ = await post(session, f"{sandbox.base_url}/1001/batch", {})
    async with session.get(faults_url) as after_request:
        after = await after_request.json()
    async with session.delete(f"{faults_url}/{one[0]['id']}") as deleted_one:
        deleted_one_body = await deleted_one.json()
    async with session.delete(f"{faults_url}/999") as missing:
        missing_status = missing.status
    async with session.delete(faults_url) as cleared:
        cleared_body = await cleared.json()

    assert added_one.status == 200
    assert one[0]["kind"] == "error"
    assert one[0]["site"] == "1001"
    assert [fault["kind"] for fault in two] == ["latency", "poison"]
    assert [fault["id"] for fault in listing] == [one[0]["id"], two[0]["id"], two[1]["id"]]
    assert listing[0]["remaining"] == 1
    assert status == 503
    assert after[0]["fired"] == 1
    assert after[0]["remaining"] == 0
    assert deleted_one_body == {"removed": 1}
    assert missing_status == 404
    assert cleared_body == {"removed": 2}
    assert len(sandbox.faults) == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "flood"}, "kind must be one of"),
        ({"status": 503}, "missing fault field 'kind'"),
        ({"kind": "error", "rate": 2}, "rate must be a number from 0 to 1"),
        ({"kind": "error", "colour": "red"}, "unknown fault field(s) colour"),
        ({"kind": "latency"}, "latency_s must be set"),
        ({"kind": "max_body"}, "max_body_bytes must be set"),
        ({"kind": "error", "status": 200}, "status must be from 400 to 599, got 200"),
        ([1], "expected a JSON object"),
    ],
)
async def test_fault_endpoint_rejects_invalid_spec(
    sandbox: Sandbox, session: aiohttp.ClientSession, spec: Any, message: str
) -> None:
    async with session.post(f"{sandbox.url}/_sandbox/faults", json=spec) as response:
        body = await response.json()

    assert response.status == 400
    assert message in body["error"]
    assert len(sandbox.faults) == 0


def test_fault_parse_key_value() -> None:
    fault = Fault.parse("kind=error, status=429, rate=0.25, count=3, site=1001, retry_after_s=5")

    assert fault == Fault(
        kind="error", status=429, rate=0.25, count=3, site="1001", retry_after_s=5
    )


def test_fault_parse_marker_value_as_json() -> None:
    assert Fault.parse("kind=poison,marker_value=true").marker_value is True
    assert Fault.parse("kind=poison,marker_value=2").marker_value == 2
    assert Fault.parse("kind=poison,marker_value=bad").marker_value == "bad"


def test_fault_parse_json() -> None:
    fault = Fault.parse('{"kind": "hang", "site": 1001}')

    assert fault == Fault(kind="hang", site="1001")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind=error,status", "expected key=value"),
        ("kind=error,rate=often", "expected a number"),
        ("kind=error,count=two", "expected an integer"),
        ("kind=error,speed=1", "unknown fault field 'speed'"),
        ("kind=error,count=0", "count must be a positive integer"),
        ("kind=error,retry_after_format=iso", "retry_after_format must be"),
        ("{bad json", "invalid fault JSON"),
    ],
)
def test_fault_parse_rejects_invalid_text(text: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        Fault.parse(text)

    assert message in str(raised.value)


@pytest.mark.parametrize("kind", ["error", "poison"])
@pytest.mark.parametrize("status", [100, 200, 204, 302, 399])
def test_failure_fault_rejects_status_below_400(kind: str, status: int) -> None:
    with pytest.raises(ValueError) as raised:
        Fault(kind, status=status)  # type: ignore[arg-type]

    assert str(raised.value) == (
        f"invalid {kind!r} fault: status must be from 400 to 599, got {status}: the fault "
        "sends a failure body, and a status below 400 would not report an error"
    )


@pytest.mark.parametrize("kind", ["error", "poison"])
@pytest.mark.parametrize("status", [400, 429, 503, 599])
def test_failure_fault_accepts_error_status(kind: str, status: int) -> None:
    assert Fault(kind, status=status).response_status == status  # type: ignore[arg-type]


def test_poison_fault_rejects_marker_value_not_json() -> None:
    with pytest.raises(ValueError) as raised:
        Fault("poison", marker_value={1, 2})

    assert "marker_value must be a JSON value, got {1, 2}" in str(raised.value)


def test_fault_defaults() -> None:
    assert Fault("error").response_status == 503
    assert Fault("error").response_error_type == "unknown"
    assert Fault("poison").response_status == 400
    assert Fault("poison").response_error_type == "validation"
    assert Fault("error", status=413).response_error_type == "too_large"
