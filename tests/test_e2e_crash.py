"""Crash safety and shutdown: SIGKILL, SIGTERM, several instances, Redis faults, hostile entries."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import signal
import time
from collections import Counter

import redis.asyncio as aioredis

from forwarder.sandbox import Sandbox
from tests.daemon_proc import DaemonProcess, daemon_env
from tests.e2e import (
    dead_export,
    envelope,
    expected_order,
    lane_length,
    mixed_events,
    push,
    received_order,
    wait_drained,
    wait_redis,
)
from tests.proxy import BlackholeProxy
from tests.servers import RedisServer

SITES = ["1001", "1002", "1003", "1004", "1005"]
FAST = {
    "retry_base_s": 0.05,
    "retry_cap_s": 0.5,
    "batch_linger_ms": 20,
    "lease_ttl_s": 2,
    "lease_renew_interval_s": 0.5,
}


def first_occurrence_order(sandbox: Sandbox) -> dict[tuple[str, str], list[int]]:
    order: dict[tuple[str, str], list[int]] = {}
    for (site, event_type), seqs in received_order(sandbox).items():
        seen: set[int] = set()
        order[(site, event_type)] = [s for s in seqs if not (s in seen or seen.add(s))]
    return order


async def assert_nothing_claimed(client: aioredis.Redis) -> None:
    assert await client.llen("jirafe:intake:claimed") == 0
    assert await client.keys("jirafe:lease:*") == []
    assert await client.get("jirafe:intake:leader") is None
    assert await client.hlen("jirafe:instances") == 0


async def test_sigkill_loop_loses_nothing(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    entries = mixed_events(SITES, 30_000)
    rng = random.Random(20261204)
    max_events = 200
    concurrency = 4
    async with Sandbox(tokens={"token-default": set(SITES)}, validate=False) as sandbox:
        sandbox.faults.add("latency", latency_s=0.02)
        env = daemon_env(redis_server.url, sandbox.base_url, batch_max_events=max_events,
                         api_max_concurrency=concurrency, **FAST)
        await push(redis_client, entries)
        kills = Counter()
        for iteration in range(21):
            daemon = await DaemonProcess(env).start()
            moment = ("random", "mid_request", "after_answer")[iteration % 3]
            if moment == "random":
                await asyncio.sleep(rng.uniform(0.05, 0.5))  # a random instant is the point here
            elif moment == "mid_request":
                await sandbox.wait_for(lambda state: state.in_flight > 0, timeout=20)
            else:
                done = sandbox.state.total_requests
                await sandbox.wait_for(lambda state, done=done: state.total_requests > done, timeout=20)
            daemon.signal(signal.SIGKILL)
            await daemon.wait()
            kills[moment] += 1
        assert sandbox.state.total_accepted < len(entries)

        daemon = await DaemonProcess(env).start()
        await sandbox.wait_for(lambda state: _unique(state) >= len(entries), timeout=120)
        await wait_drained(redis_client)
        assert await daemon.stop() == 0
        await assert_nothing_claimed(redis_client)

        assert first_occurrence_order(sandbox) == expected_order(entries)
        duplicates = sandbox.state.total_duplicates
        # Only requests in flight at a kill are sent again: at most one batch per lane
        # slot per kill.
        assert duplicates <= sum(kills.values()) * concurrency * max_events
        assert sandbox.state.total_accepted == len(entries) + duplicates
        assert kills == Counter({"random": 7, "mid_request": 7, "after_answer": 7})


def _unique(state) -> int:
    return state.total_accepted - state.total_duplicates


async def test_killed_instance_claims_taken_over(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    entries = mixed_events(SITES, 5000)
    async with Sandbox(tokens={"token-default": set(SITES)}, validate=False) as sandbox:
        sandbox.faults.add("latency", latency_s=0.05)
        env = daemon_env(redis_server.url, sandbox.base_url, batch_max_events=100, **FAST)
        first = await DaemonProcess(env).start()
        second = await DaemonProcess(env).start()
        await push(redis_client, entries)
        await sandbox.wait_for(lambda state: state.in_flight > 0 and state.total_accepted > 500, timeout=30)
        first.signal(signal.SIGKILL)
        await first.wait()
        await sandbox.wait_for(lambda state: _unique(state) >= len(entries), timeout=60)
        await wait_drained(redis_client)
        assert await second.stop() == 0
        assert first_occurrence_order(sandbox) == expected_order(entries)
        released = second.logs("released claims of a stopped instance")
        assert released and released[0]["reason"] == "process gone"
        await assert_nothing_claimed(redis_client)


async def test_frozen_instance_loses_lease_not_events(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    entries = mixed_events(SITES, 3000)
    async with Sandbox(tokens={"token-default": set(SITES)}, validate=False) as sandbox:
        sandbox.faults.add("latency", latency_s=0.05)
        env = daemon_env(redis_server.url, sandbox.base_url, batch_max_events=100, **FAST)
        frozen = await DaemonProcess(env).start()
        await push(redis_client, entries)
        await sandbox.wait_for(lambda state: state.total_accepted > 300, timeout=30)
        # SIGSTOP: the process is alive (its pid exists) but renews nothing, so its
        # claims come back only when its lease expires.
        frozen.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        survivor = await DaemonProcess(env).start()
        released = await survivor.wait_for_log("released claims of a stopped instance", timeout=30)
        assert released["reason"] == "heartbeat expired"
        assert time.monotonic() - stopped_at >= FAST["lease_ttl_s"] * 0.9
        await sandbox.wait_for(lambda state: _unique(state) >= len(entries), timeout=60)
        frozen.signal(signal.SIGCONT)
        await wait_drained(redis_client)
        assert await survivor.stop() == 0
        await frozen.stop()
        assert first_occurrence_order(sandbox) == expected_order(entries)


async def test_slow_alive_instance_keeps_claims(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    entries = mixed_events(SITES, 300)
    async with Sandbox(tokens={"token-default": set(SITES)}, validate=False) as sandbox:
        # Each request takes longer than the lease: only renewal keeps it.
        sandbox.faults.add("latency", latency_s=3.0)
        env = daemon_env(redis_server.url, sandbox.base_url, batch_max_events=50, api_timeout_s=10,
                         api_read_timeout_s=8, **FAST)
        first = await DaemonProcess(env).start()
        second = await DaemonProcess(env).start()
        await push(redis_client, entries)
        await sandbox.wait_for(lambda state: state.total_accepted >= len(entries), timeout=90)
        await wait_drained(redis_client)
        assert await first.stop() == 0
        assert await second.stop() == 0
        assert sandbox.state.total_duplicates == 0
        assert received_order(sandbox) == expected_order(entries)
        for daemon in (first, second):
            assert daemon.logs("lane lease lost before acknowledgement; the new owner resends") == []


async def test_sigterm_flushes_partial_batch(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    entries = [envelope("1001", "cart", n) for n in range(7)]
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        env = daemon_env(redis_server.url, sandbox.base_url, batch_linger_ms=60_000)
        daemon = await DaemonProcess(env).start()
        await push(redis_client, entries)
        await wait_redis(lambda: lane_length(redis_client, "1001:batch"), 7)
        assert sandbox.state.total_requests == 0
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=30) == 0
        # Far sooner than the 60 s linger: the stop flushed at once.
        assert time.monotonic() - started < 30
        assert [event.data["seq"] for event in sandbox.state.events("1001")] == list(range(7))
        await assert_nothing_claimed(redis_client)


async def test_sigterm_during_outage_keeps_events(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    entries = mixed_events(SITES, 500)
    async with Sandbox(tokens={"token-default": set(SITES)}) as sandbox:
        sandbox.faults.add("error", status=503)
        env = daemon_env(redis_server.url, sandbox.base_url, **FAST)
        daemon = await DaemonProcess(env).start()
        await push(redis_client, entries)
        await sandbox.wait_for(lambda state: state.total_requests >= 10, timeout=30)
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        code = await daemon.wait(timeout=30)
        assert code == 0
        assert time.monotonic() - started < 25  # shutdown.hard_deadline_s
        await assert_nothing_claimed(redis_client)
        lanes = [key.decode().removeprefix("jirafe:lane:") for key in await redis_client.keys("jirafe:lane:*")]
        queued = sum([await lane_length(redis_client, lane) for lane in lanes]) + await redis_client.llen("jirafe:events")
        assert queued == len(entries)
        assert await redis_client.zcard("jirafe:dead:index") == 0


async def test_second_signal_forces_fast_exit(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    entries = [envelope("1001", "order", n) for n in range(20)]
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        sandbox.faults.add("hang")
        env = daemon_env(redis_server.url, sandbox.base_url, api_timeout_s=120, api_read_timeout_s=100,
                         shutdown_grace_s=20, shutdown_hard_deadline_s=25, **FAST)
        daemon = await DaemonProcess(env).start()
        await push(redis_client, entries)
        await sandbox.wait_for(lambda state: state.in_flight > 0, timeout=20)
        daemon.signal(signal.SIGTERM)
        await daemon.wait_for_log("stopping: intake stopped, flushing partial batches")
        daemon.signal(signal.SIGTERM)
        code = await daemon.wait(timeout=15)
        assert code != 0
        assert daemon.logs("forced stop: cancelling in-flight work, events stay in Redis")
        assert await lane_length(redis_client, "1001:batch") == 20
        assert sandbox.state.total_accepted == 0


async def test_redis_restarted_twice_during_drain(own_redis: RedisServer) -> None:
    client = aioredis.Redis.from_url(own_redis.url)
    entries = mixed_events(SITES, 20_000)
    async with Sandbox(tokens={"token-default": set(SITES)}, validate=False) as sandbox:
        sandbox.faults.add("latency", latency_s=0.01)
        env = daemon_env(own_redis.url, sandbox.base_url, redis_socket_timeout_s=2, redis_block_timeout_s=0.5,
                         **FAST)
        await push(client, entries)
        daemon = await DaemonProcess(env).start()
        for fraction in (0.2, 0.5):
            await sandbox.wait_for(lambda state, f=fraction: state.total_accepted >= len(entries) * f, timeout=60)
            await client.aclose()
            own_redis.restart()
            client = aioredis.Redis.from_url(own_redis.url)
        await sandbox.wait_for(lambda state: _unique(state) >= len(entries), timeout=120)
        await wait_drained(client)
        assert await daemon.stop() == 0
        assert first_occurrence_order(sandbox) == expected_order(entries)
        assert daemon.logs("redis call failed, retrying")
    await client.aclose()


async def test_redis_blackholed_longer_than_socket_timeout(own_redis: RedisServer) -> None:
    proxy = BlackholeProxy(own_redis.port)
    await proxy.start()
    client = aioredis.Redis.from_url(own_redis.url)
    entries = mixed_events(SITES, 5000)
    try:
        async with Sandbox(tokens={"token-default": set(SITES)}, validate=False) as sandbox:
            sandbox.faults.add("latency", latency_s=0.01)
            env = daemon_env(f"redis://127.0.0.1:{proxy.port}/0", sandbox.base_url, redis_socket_timeout_s=1,
                             redis_block_timeout_s=0.3, redis_connect_timeout_s=1, **{**FAST, "lease_ttl_s": 10,
                                                                                       "lease_renew_interval_s": 2})
            daemon = await DaemonProcess(env).start()
            await push(client, entries)
            await sandbox.wait_for(lambda state: state.total_accepted >= 1000, timeout=60)
            proxy.blackhole()
            await daemon.wait_for(
                lambda records: any(r.get("event") == "redis call failed, retrying" and "Timeout" in r.get("error", "")
                                    for r in records), timeout=30)
            proxy.restore()
            await sandbox.wait_for(lambda state: _unique(state) >= len(entries), timeout=60)
            await wait_drained(client)
            assert await daemon.stop() == 0
            assert first_occurrence_order(sandbox) == expected_order(entries)
    finally:
        await proxy.stop()
        await client.aclose()


async def test_redis_readonly_failover_survived(own_redis: RedisServer) -> None:
    client = aioredis.Redis.from_url(own_redis.url)
    entries = mixed_events(SITES, 2000)
    async with Sandbox(tokens={"token-default": set(SITES)}, validate=False) as sandbox:
        env = daemon_env(own_redis.url, sandbox.base_url, **FAST)
        daemon = await DaemonProcess(env).start()
        # A replica of a master that cannot be reached keeps its data but replies
        # READONLY to writes, as a demoted primary does during a failover.
        await push(client, entries[:1000])
        await sandbox.wait_for(lambda state: state.total_accepted >= 200, timeout=30)
        await client.execute_command("REPLICAOF", "127.0.0.1", "1")
        await daemon.wait_for(lambda records: any("ReadOnly" in r.get("error", "") for r in records), timeout=30)
        await client.execute_command("REPLICAOF", "NO", "ONE")
        await push(client, entries[1000:])
        await sandbox.wait_for(lambda state: _unique(state) >= len(entries), timeout=60)
        await wait_drained(client)
        assert await daemon.stop() == 0
        assert first_occurrence_order(sandbox) == expected_order(entries)
    await client.aclose()


HOSTILE = {
    "huge": b'{"site_id":"1001","type":"cart","data":{"blob":"' + b"x" * 50_000_000 + b'"}}',
    "deep": b'{"site_id":"1001","type":"cart","data":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "nan": b'{"site_id":"1001","type":"cart","data":{"total":NaN}}',
    "lone_surrogate": b'{"site_id":"1001","type":"cart","data":{"name":"\\udc00"}}',
    "empty": b"",
    "not_utf8": b'{"site_id":"1001","type":"cart","data":{"name":"\xfe\xff\xc0"}}',
}


async def test_hostile_entries_contained_across_restart(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    good = [envelope("1001", "cart", n) for n in range(100)]
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        env = daemon_env(redis_server.url, sandbox.base_url, **FAST)
        # As if a daemon had claimed them and died before routing them.
        await redis_client.rpush("jirafe:intake:claimed", HOSTILE["deep"], HOSTILE["nan"])
        await push(redis_client, [*good[:50], HOSTILE["huge"], HOSTILE["lone_surrogate"]])
        daemon = await DaemonProcess(env).start()
        await sandbox.wait_for(lambda state: state.total_accepted >= 50, timeout=60)
        daemon.signal(signal.SIGKILL)
        await daemon.wait()
        await push(redis_client, [HOSTILE["empty"], HOSTILE["not_utf8"], *good[50:]])
        daemon = await DaemonProcess(env).start()
        await sandbox.wait_for(lambda state: state.total_accepted >= 100, timeout=60)
        await wait_drained(redis_client)
        assert await daemon.stop() == 0
        # The kill may have come between the API's response and the acknowledgement.
        assert first_occurrence_order(sandbox) == {("1001", "cart"): list(range(100))}
        assert sandbox.state.total_duplicates <= 50

    dead = await dead_export(env)
    assert len(dead) == len(HOSTILE)
    by_digest = {}
    for record in dead:
        raw = record["raw"].encode() if record["raw"] is not None else base64.b64decode(record["raw_base64"])
        by_digest[hashlib.sha256(raw).hexdigest()] = record["reason"]
    expected = {
        "huge": "event_too_large", "deep": "invalid_json", "nan": "invalid_json",
        "lone_surrogate": "invalid_json", "empty": "invalid_json", "not_utf8": "invalid_utf8",
    }
    for name, raw in HOSTILE.items():
        assert by_digest[hashlib.sha256(raw).hexdigest()] == expected[name], name
