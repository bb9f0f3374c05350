"""The real daemon, a real redis-server and the sandbox over HTTP: the main job."""

from __future__ import annotations

import base64

import orjson
import redis.asyncio as aioredis

from forwarder.envelope import EVENT_TYPES
from forwarder.sandbox import Sandbox
from tests.daemon_proc import DaemonProcess, daemon_env
from tests.e2e import (
    dead_export,
    envelope,
    expected_order,
    mixed_events,
    push,
    push_with_redis_cli,
    received_order,
    wait_drained,
)
from tests.servers import RedisServer

SITES = ["1001", "1002", "1003", "1004", "1005"]

MALFORMED = [
    (b"{not json", "invalid_json"),
    (b"", "invalid_json"),
    (b'{"site_id":"1001","type":"cart","data":{"a":NaN}}', "invalid_json"),
    (b'["list"]', "not_an_object"),
    (b'{"site_id":"1001","type":"basket","data":{}}', "unknown_type"),
    (b'{"site_id":"1002","data":{}}', "missing_field"),
    (b'{"site_id":"x1","type":"cart","data":{}}', "invalid_site_id"),
    (b'{"site_id":"1003","type":"cart","data":[]}', "invalid_data"),
    (b'{"site_id":"1005","type":"pageview","data":{"site":"1001","pageview":{"page_type":"other"}}}',
     "site_mismatch"),
    (b'{"site_id":"1004","type":"cart","data":{"name":"\xc3\x28"}}', "invalid_utf8"),
]


async def test_drain_20000_events_of_every_type(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    # Sites 1001 and 1002 have tokens of their own; the rest use the default token.
    tokens = {"token-default": {"1003", "1004", "1005"}, "token-1001": {"1001"}, "token-1002": {"1002"}}
    entries = mixed_events(SITES, 20_000)
    # Spread the malformed entries through the stream.
    for position, (raw, _) in enumerate(MALFORMED):
        entries.insert(1 + position * 2000, raw)
    max_batch_bytes = 300_000

    async with Sandbox(tokens=tokens) as sandbox:
        env = daemon_env(
            redis_server.url, sandbox.base_url, token="token-default",
            api_max_batch_bytes=max_batch_bytes, batch_linger_ms=50,
            sites_1001_token="token-1001", sites_1002_token="token-1002",
        )
        daemon = await DaemonProcess(env).start()
        await push_with_redis_cli(redis_server.port, entries)
        await sandbox.wait_for(lambda state: state.total_accepted >= 20_000, timeout=90)
        await wait_drained(redis_client)
        assert await daemon.stop() == 0

        state = sandbox.state
        assert state.total_accepted == 20_000
        assert state.total_duplicates == 0
        assert received_order(sandbox) == expected_order(entries)
        for site in SITES:
            for event_type in EVENT_TYPES:
                assert state.accepted_count(site, event_type) == 400

        bodies = [record.body_bytes for record in state.requests]
        assert max(bodies) <= max_batch_bytes
        assert sum(record.events > 1 for record in state.requests) > 0
        expected_label = {
            "1001": sandbox.token_label("token-1001"),
            "1002": sandbox.token_label("token-1002"),
            **{site: sandbox.token_label("token-default") for site in ("1003", "1004", "1005")},
        }
        for record in state.requests:
            assert record.status == 200, record
            assert record.token == expected_label[record.site], record

    dead = await dead_export(env)
    assert sorted(record["reason"] for record in dead) == sorted(reason for _, reason in MALFORMED)
    by_reason = {record["reason"]: record for record in dead}
    assert by_reason["invalid_utf8"]["raw"] is None
    assert base64.b64decode(by_reason["invalid_utf8"]["raw_base64"]) == MALFORMED[-1][0]
    assert by_reason["unknown_type"]["raw"] == MALFORMED[4][0].decode()
    assert by_reason["unknown_type"]["site_id"] == "1001"
    for record in dead:
        assert record["attempts"] == 0
        assert record["status"] is None


async def test_api_rejected_elements_dead_lettered_not_resent(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    good = [envelope("1001", "order", n) for n in range(30)]
    bad_order = orjson.loads(envelope("1001", "order", 100))
    bad_order["data"]["status"] = "canceled"
    bad_cart = orjson.loads(envelope("1001", "cart", 101))
    del bad_cart["data"]["total"]
    entries = [*good[:10], orjson.dumps(bad_order), *good[10:20], orjson.dumps(bad_cart), *good[20:]]

    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        env = daemon_env(redis_server.url, sandbox.base_url, batch_linger_ms=300)
        await push(redis_client, entries)
        daemon = await DaemonProcess(env).start()
        await sandbox.wait_for(lambda state: state.total_accepted >= 30, timeout=30)
        await wait_drained(redis_client)
        assert await daemon.stop() == 0
        assert sandbox.state.total_requests == 1
        assert sandbox.state.total_duplicates == 0
        assert [event.data["seq"] for event in sandbox.state.events("1001", "order")] == list(range(30))

    dead = await dead_export(env)
    assert [(record["reason"], record["type"], record["status"]) for record in dead] == [
        ("validation", "order", 200),
        ("validation", "cart", 200),
    ]
    assert "canceled" in dead[0]["response"]
    assert dead[0]["id"] == "1001-100"
    assert orjson.loads(dead[0]["raw"]) == bad_order


async def test_event_too_large_never_sent(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    big = envelope("1001", "product", 1, description="é" * 3000)
    small = envelope("1001", "product", 2)
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        env = daemon_env(redis_server.url, sandbox.base_url, api_max_batch_bytes=4096, batch_linger_ms=20)
        await push(redis_client, [big, small])
        daemon = await DaemonProcess(env).start()
        await sandbox.wait_for(lambda state: state.total_accepted >= 1, timeout=30)
        await wait_drained(redis_client)
        assert await daemon.stop() == 0
        assert [event.data["seq"] for event in sandbox.state.events("1001")] == [2]
        assert all(record.body_bytes <= 4096 for record in sandbox.state.requests)

    dead = await dead_export(env)
    assert len(dead) == 1
    assert dead[0]["reason"] == "event_too_large"
    assert dead[0]["size"] > 4096
    assert dead[0]["raw"].encode() == big


async def test_max_events_flushes_before_linger(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    entries = [envelope("1001", "cart", n) for n in range(25)]
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        # A linger of 60 s: only the event-count trigger can send within the test's timeout.
        env = daemon_env(redis_server.url, sandbox.base_url, batch_linger_ms=60_000, batch_max_events=10)
        daemon = await DaemonProcess(env).start()
        await push(redis_client, entries)
        await sandbox.wait_for(lambda state: state.total_accepted >= 20, timeout=20)
        assert [record.events for record in sandbox.state.requests] == [10, 10]
        assert await daemon.stop() == 0
        # The stop flushed the partial batch of 5 instead of waiting for the linger.
        assert [record.events for record in sandbox.state.requests] == [10, 10, 5]
        assert [event.data["seq"] for event in sandbox.state.events("1001")] == list(range(25))
