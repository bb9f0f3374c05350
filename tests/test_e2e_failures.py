"""Failure policy end to end: the real daemon against the sandbox's fault injection.

Each test checks every event's fate (delivered once, or dead with the right reason)
and per-site order.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from forwarder.sandbox import Sandbox
from tests.daemon_proc import DaemonProcess, daemon_env
from tests.e2e import (
    dead_export,
    envelope,
    expected_order,
    lane_events,
    lane_length,
    push,
    received_order,
    run_cli,
    wait_drained,
    wait_redis,
)
from tests.servers import RedisServer, free_port

# Fast retries so that the scenarios finish in seconds.
FAST = {
    "retry_base_s": 0.05,
    "retry_cap_s": 0.5,
    "retry_max_attempts": 3,
    "batch_linger_ms": 50,
    "lease_ttl_s": 3,
    "lease_renew_interval_s": 1,
}


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} missing for pid {pid}")


def poisoned(site: str, count: int, poison_at: set[int], event_type: str = "cart") -> list[bytes]:
    return [envelope(site, event_type, n, **({"poison": True} if n in poison_at else {})) for n in range(count)]


@pytest.mark.parametrize("status", [400, 503])
async def test_poison_event_among_1000_isolated(
    status: int, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    entries = poisoned("1001", 1000, {537}) + [envelope("1002", "cart", n) for n in range(200)]
    async with Sandbox(tokens={"token-default": {"1001", "1002"}}) as sandbox:
        sandbox.faults.add("poison", status=status)
        env = daemon_env(redis_server.url, sandbox.base_url, **FAST)
        await push(redis_client, entries)
        daemon = await DaemonProcess(env).start()
        await sandbox.wait_for(lambda state: state.total_accepted >= 1199, timeout=60)
        await wait_drained(redis_client)
        assert await daemon.stop() == 0

        received = [event.data["seq"] for event in sandbox.state.events("1001")]
        assert received == [n for n in range(1000) if n != 537]
        assert sandbox.state.accepted_count("1002") == 200
        assert sandbox.state.total_duplicates == 0
        # Bisection isolates the event in about log2(1000) requests per round, not 1000.
        site_requests = [record for record in sandbox.state.requests if record.site == "1001"]
        assert len(site_requests) < 60

    dead = await dead_export(env)
    assert len(dead) == 1
    assert dead[0]["id"] == "1001-537"
    if status == 400:
        assert dead[0]["reason"] == "validation"
        assert dead[0]["status"] == 400
    else:
        assert dead[0]["reason"] == "retries_exhausted"
        assert dead[0]["status"] == 503
        assert dead[0]["attempts"] == FAST["retry_max_attempts"]


async def test_failed_elements_only_dead_lettered(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    entries = poisoned("1001", 300, {3, 150, 299}, event_type="product")
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        sandbox.faults.add("poison", poison_scope="event")
        env = daemon_env(redis_server.url, sandbox.base_url, **{**FAST, "batch_linger_ms": 500})
        await push(redis_client, entries)
        daemon = await DaemonProcess(env).start()
        await sandbox.wait_for(lambda state: state.total_accepted >= 297, timeout=30)
        await wait_drained(redis_client)
        assert await daemon.stop() == 0
        # One request: the 200 response's failed elements are not re-sent.
        assert [record.events for record in sandbox.state.requests] == [300]
        assert sandbox.state.total_duplicates == 0

    dead = await dead_export(env)
    assert [record["id"] for record in dead] == ["1001-3", "1001-150", "1001-299"]
    assert {record["reason"] for record in dead} == {"validation"}


# (fault fields, expected fate of the 20 events, expected dead-letter reason)
POLICY_TABLE = [
    ({"status": 400, "count": 1}, "dead", "validation"),
    ({"status": 400, "error_type": "bad_json", "count": 1}, "dead", "bad_json"),
    ({"status": 400, "error_type": "invalid_type", "count": 1}, "dead", "invalid_type"),
    ({"status": 404, "count": 1}, "kept", None),
    ({"status": 405, "count": 1}, "kept", None),
    ({"status": 422, "count": 1}, "dead", "unknown"),
    ({"status": 413, "count": 1}, "dead", "event_too_large"),
    ({"status": 429, "count": 2}, "delivered", None),
    ({"status": 500, "count": 2}, "delivered", None),
    ({"status": 502, "count": 2}, "delivered", None),
    ({"status": 503, "count": 2}, "delivered", None),
    ({"status": 504, "count": 2}, "delivered", None),
    ({"status": 403, "error_type": "invalid_token", "count": 1}, "kept", None),
    ({"status": 403, "error_type": "authorization", "count": 1}, "kept", None),
]


@pytest.mark.parametrize(("fault", "fate", "reason"), POLICY_TABLE, ids=lambda value: str(value))
async def test_policy_table_single_event(
    fault: dict, fate: str, reason: str | None, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    # One event per request (tracker lane) so that a request-level status is the event's.
    entry = envelope("1001", "pageview", 1)
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        sandbox.faults.add("error", **fault)
        env = daemon_env(redis_server.url, sandbox.base_url, **FAST)
        await push(redis_client, [entry])
        daemon = await DaemonProcess(env).start()
        if fate == "delivered":
            await sandbox.wait_for(lambda state: state.total_accepted == 1, timeout=30)
            await wait_drained(redis_client)
        elif fate == "dead":
            await daemon.wait_for_log("event dead-lettered", timeout=30)
        else:
            await daemon.wait_for(lambda records: any(r.get("event", "").startswith("site paused") for r in records))
        assert await daemon.stop() == 0
        dead = await dead_export(env)
        if fate == "delivered":
            assert sandbox.state.accepted_count("1001", "pageview") == 1
            assert dead == []
        elif fate == "dead":
            assert sandbox.state.total_accepted == 0
            assert [record["reason"] for record in dead] == [reason]
            assert dead[0]["status"] == fault["status"]
        else:
            assert sandbox.state.total_accepted == 0
            assert dead == []
            assert await redis_client.lrange("jirafe:lane:1001:pageview", 0, -1) != []


async def test_retry_after_seconds_honoured(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        sandbox.faults.add("error", status=429, retry_after_s=2, count=1)
        env = daemon_env(redis_server.url, sandbox.base_url, **FAST)
        await push(redis_client, [envelope("1001", "cart", 1)])
        daemon = await DaemonProcess(env).start()
        await sandbox.wait_for(lambda state: state.total_accepted == 1, timeout=30)
        assert await daemon.stop() == 0
        first, second = list(sandbox.state.requests)
        assert first.status == 429
        assert second.status == 200
        assert second.time - first.time >= 2.0
        # A throttled wait is not an attempt.
        assert await redis_client.hget("jirafe:lanes:attempts", "1001:batch") is None


@pytest.mark.parametrize("retry_after_format", ["seconds", "date"])
async def test_retry_after_of_a_day_capped(
    retry_after_format: str, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        sandbox.faults.add("error", status=503, retry_after_s=86_400, retry_after_format=retry_after_format, count=1)
        env = daemon_env(redis_server.url, sandbox.base_url, retry_max_retry_after_s=1, **FAST)
        await push(redis_client, [envelope("1001", "cart", 1)])
        daemon = await DaemonProcess(env).start()
        await sandbox.wait_for(lambda state: state.total_accepted == 1, timeout=30)
        assert await daemon.stop() == 0
        first, second = list(sandbox.state.requests)
        assert 0.9 <= second.time - first.time
        throttled = daemon.logs("throttled, retrying later")
        assert throttled[0]["delay_s"] == 1.0


async def test_outage_keeps_everything_then_recovers(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    sites = [str(2000 + n) for n in range(20)]
    async with Sandbox(tokens={"token-default": set(sites)}) as sandbox:
        outage = sandbox.faults.add("error", status=503)
        env = daemon_env(redis_server.url, sandbox.base_url, **{**FAST, "retry_max_attempts": 2})
        daemon = await DaemonProcess(env).start()
        pushed: list[bytes] = []
        rss_samples = []
        # Producers keep pushing through the outage.
        for round_number in range(20):
            batch = [envelope(site, "order", round_number * 100 + n) for site in sites for n in range(10)]
            pushed.extend(batch)
            await push(redis_client, batch)
            await sandbox.wait_for(lambda state, r=round_number: state.total_requests >= 20 + r * 5, timeout=30)
            rss_samples.append(rss_kb(daemon.pid))
        assert sandbox.state.total_accepted == 0
        assert await redis_client.zcard("jirafe:dead:index") == 0
        # Memory flat: the backlog waits in Redis, not in the daemon.
        assert max(rss_samples) - rss_samples[2] < 20_000
        assert rss_kb(daemon.pid, "VmHWM") < 200_000

        # Each site's backoff delays are jittered, not in lockstep.
        first_retry_gaps = []
        for site in sites:
            times = [record.time for record in sandbox.state.requests if record.site == site]
            if len(times) >= 2:
                first_retry_gaps.append(times[1] - times[0])
        assert len(first_retry_gaps) >= 10
        assert statistics.pstdev(first_retry_gaps) > 0.005

        sandbox.faults.remove(outage.id)
        await sandbox.wait_for(lambda state: state.total_accepted >= len(pushed), timeout=60)
        await wait_drained(redis_client)
        assert await daemon.stop() == 0
        assert received_order(sandbox) == expected_order(pushed)
        assert sandbox.state.total_duplicates == 0
    assert await dead_export(env) == []


async def test_refused_connections_are_an_outage(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    entries = [envelope("1001", "customer", n) for n in range(50)]
    sandbox = Sandbox(tokens={"token-default": {"1001"}})
    await sandbox.start()
    port = sandbox.port
    await sandbox.stop()
    env = daemon_env(redis_server.url, f"http://127.0.0.1:{port}/v2", **{**FAST, "retry_max_attempts": 1})
    daemon = await DaemonProcess(env).start()
    await push(redis_client, entries)
    await daemon.wait_for(lambda records: sum(r.get("reason") == "connect_error" for r in records) >= 4)
    assert await redis_client.zcard("jirafe:dead:index") == 0
    async with Sandbox(tokens={"token-default": {"1001"}}, port=port) as sandbox:
        await sandbox.wait_for(lambda state: state.total_accepted >= 50, timeout=30)
        await wait_drained(redis_client)
        assert await daemon.stop() == 0
        assert [event.data["seq"] for event in sandbox.state.events("1001")] == list(range(50))
    assert await dead_export(env) == []


async def test_revoked_token_pauses_only_its_site(redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path) -> None:
    healthy = ["1001", "1002", "1003"]
    entries = [envelope(site, "cart", n) for n in range(100) for site in [*healthy, "1004"]]
    config = tmp_path / "forwarder.toml"
    config.write_text('[sites."1004"]\ntoken = "revoked-token"\n')
    metrics_port = free_port()
    async with Sandbox(tokens={"token-default": set(healthy), "new-token": {"1004"}}) as sandbox:
        env = daemon_env(redis_server.url, sandbox.base_url, metrics_listen=f"127.0.0.1:{metrics_port}", **FAST)
        daemon = await DaemonProcess(env, ["--config", str(config)]).start()
        await push(redis_client, entries)
        await sandbox.wait_for(lambda state: state.total_accepted >= 300, timeout=30)
        await daemon.wait_for_log("site paused: the API rejected its credentials; events are kept")
        for site in healthy:
            assert sandbox.state.accepted_count(site) == 100
        assert sandbox.state.accepted_count("1004") == 0
        assert await lane_length(redis_client, "1004:batch") == 100
        assert await redis_client.zcard("jirafe:dead:index") == 0
        # The pause is logged just before its state is written to Redis.
        await wait_until(lambda: redis_client.hget("jirafe:lanes:state", "1004:batch"), lambda raw: raw is not None)
        state = orjson.loads(await redis_client.hget("jirafe:lanes:state", "1004:batch"))
        assert state["state"] == "paused"
        paused_series = 'jirafe_forwarder_site_backlog_events{lane="batch",site="1004"} 100.0'
        await wait_until(lambda: _scrape(metrics_port), lambda text: paused_series in text)
        assert 'jirafe_forwarder_site_state{lane="batch",site="1004",state="paused"} 1.0' in await _scrape(
            metrics_port)

        # The operator rotates the token and reloads: the site resumes in order at once.
        config.write_text('[sites."1004"]\ntoken = "new-token"\n')
        daemon.signal(1)  # SIGHUP
        await sandbox.wait_for(lambda state: state.accepted_count("1004") >= 100, timeout=20)
        assert [event.data["seq"] for event in sandbox.state.events("1004")] == list(range(100))
        assert await daemon.stop() == 0
    assert await dead_export(env) == []


async def test_hang_and_reset_end_by_timeouts(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    entries = [envelope("1001", "order", n) for n in range(40)]
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        sandbox.faults.add("hang", count=1)
        sandbox.faults.add("reset", count=2)
        env = daemon_env(redis_server.url, sandbox.base_url, api_timeout_s=2, api_read_timeout_s=1,
                         api_connect_timeout_s=1, **FAST)
        await push(redis_client, entries)
        daemon = await DaemonProcess(env).start()
        await sandbox.wait_for(lambda state: state.total_accepted >= 40, timeout=40)
        await wait_drained(redis_client)
        assert await daemon.stop() == 0
        assert [event.data["seq"] for event in sandbox.state.events("1001")] == list(range(40))
        reasons = [record.get("reason") for record in daemon.records if record.get("reason")]
        assert "timeout" in reasons
        assert any(reason in ("upload_reset", "connection_reset") for reason in reasons)
    assert await dead_export(env) == []


async def test_413_splits_and_remembers_ceiling(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    entries = [envelope("1001", "product", n) for n in range(400)]
    async with Sandbox(tokens={"token-default": {"1001"}}, max_body_bytes=60_000) as sandbox:
        env = daemon_env(redis_server.url, sandbox.base_url, **{**FAST, "batch_linger_ms": 300})
        await push(redis_client, entries)
        daemon = await DaemonProcess(env).start()
        await sandbox.wait_for(lambda state: state.total_accepted >= 400, timeout=30)
        await wait_drained(redis_client)
        assert await daemon.stop() == 0
        statuses = [record.status for record in sandbox.state.requests]
        assert statuses[0] == 413
        # After the first 413 the smaller ceiling holds: at most one more 413 while learning.
        assert statuses.count(413) <= 3
        assert [event.data["seq"] for event in sandbox.state.events("1001")] == list(range(400))
    assert await dead_export(env) == []


async def test_dead_letter_store_bound_stops_intake(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path
) -> None:
    entries = poisoned("1001", 30, {2, 5, 8, 11, 14, 17, 20, 23}, event_type="pageview")
    config = tmp_path / "forwarder.toml"
    config.write_text("[dead_letter]\nmax_entries = 5\n")
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        sandbox.faults.add("poison", status=400)
        env = daemon_env(redis_server.url, sandbox.base_url, **FAST)
        await push(redis_client, entries)
        daemon = await DaemonProcess(env, ["--config", str(config)]).start()
        await daemon.wait_for_log("dead-letter store is full: lane waits until it is emptied", timeout=30)
        assert await redis_client.zcard("jirafe:dead:index") == 5
        delivered_before = sandbox.state.accepted_count("1001")
        assert delivered_before < 30 - 8

        # Raise the bound, remove the poison, replay: everything arrives.
        sandbox.faults.clear()
        config.write_text("[dead_letter]\nmax_entries = 100\n")
        daemon.signal(1)
        await daemon.wait_for_log("configuration reloaded")
        code, stdout, stderr = await run_cli("dead", "replay", env=env)
        assert code == 0, stderr
        assert b"replayed 5" in stdout
        await sandbox.wait_for(lambda state: state.accepted_count("1001") >= 30, timeout=30)
        await wait_drained(redis_client)
        assert await daemon.stop() == 0
        assert sorted(event.data["seq"] for event in sandbox.state.events("1001")) == list(range(30))
        assert sandbox.state.total_duplicates == 0
    assert await dead_export(env) == []


async def test_attempt_counts_survive_restart(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    poison = envelope("1001", "pageview", 1, poison=True)
    async with Sandbox(tokens={"token-default": {"1001", "1002"}}) as sandbox:
        sandbox.faults.add("poison", status=503)
        env = daemon_env(redis_server.url, sandbox.base_url, **{**FAST, "retry_max_attempts": 4})
        await push(redis_client, [poison])
        # No other traffic yet: without a success elsewhere the first process cannot
        # tell a poison from an outage, so it only counts attempts.
        daemon = await DaemonProcess(env).start()
        await wait_until(lambda: _attempts(redis_client), lambda count: (count or 0) >= 2)
        await daemon.kill()
        before_restart = await _attempts(redis_client)

        daemon = await DaemonProcess(env).start()
        await wait_until(lambda: _attempts(redis_client), lambda count: (count or 0) > before_restart)
        # Successes of another site now show that the API works.
        await push(redis_client, [envelope("1002", "cart", n) for n in range(5)])
        await daemon.wait_for_log("event dead-lettered", timeout=30)
        assert await daemon.stop() == 0
        poison_requests = [record for record in sandbox.state.requests if record.site == "1001"]
        assert len(poison_requests) >= 4
        assert sandbox.state.accepted_count("1002") == 5

    dead = await dead_export(env)
    assert [record["reason"] for record in dead] == ["retries_exhausted"]
    # The count in the dead letter covers the tries of both processes: it was kept in
    # Redis across the kill, not restarted at 0. The kill may fall between a try and
    # its record, so that one try can be missing.
    assert dead[0]["attempts"] in (len(poison_requests), len(poison_requests) - 1)
    assert dead[0]["attempts"] > before_restart + 1


async def _attempts(client: aioredis.Redis) -> int | None:
    record = await client.hget("jirafe:lanes:attempts", "1001:pageview")
    return None if record is None else int(record.split(b",")[0])


async def test_backing_off_lane_not_rushed_by_new_events(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        outage = sandbox.faults.add("error", status=503)
        env = daemon_env(redis_server.url, sandbox.base_url, batch_max_events=5,
                         **{**FAST, "retry_base_s": 0.5, "retry_cap_s": 2})
        daemon = await DaemonProcess(env).start()
        pushed = []
        # Each push fills the lane past max_events while it waits out its backoff.
        for round_number in range(40):
            batch = [envelope("1001", "cart", round_number * 5 + n) for n in range(5)]
            pushed.extend(batch)
            await push(redis_client, batch)
            await wait_redis(lambda: redis_client.llen("jirafe:events"), 0)
        failed_requests = sandbox.state.total_requests
        # About 3 s of backoff between 0.5 s and 2 s allows a handful of retries, not 40.
        assert failed_requests < 15
        sandbox.faults.remove(outage.id)
        await sandbox.wait_for(lambda state: state.total_accepted >= 200, timeout=60)
        assert await daemon.stop() == 0
        assert received_order(sandbox) == expected_order(pushed)


async def test_retry_after_zero_still_waits(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        sandbox.faults.add("error", status=503, retry_after_s=0, count=5)
        env = daemon_env(redis_server.url, sandbox.base_url, **{**FAST, "retry_base_s": 0.2})
        await push(redis_client, [envelope("1001", "cart", 1)])
        daemon = await DaemonProcess(env).start()
        await sandbox.wait_for(lambda state: state.total_accepted == 1, timeout=30)
        assert await daemon.stop() == 0
        times = [record.time for record in sandbox.state.requests]
        assert len(times) == 6
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert min(gaps) >= 0.2


async def test_429_without_retry_after_backs_off(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        sandbox.faults.add("error", status=429, count=6)
        env = daemon_env(redis_server.url, sandbox.base_url, **{**FAST, "retry_base_s": 0.05, "retry_cap_s": 10})
        await push(redis_client, [envelope("1001", "cart", 1)])
        daemon = await DaemonProcess(env).start()
        await sandbox.wait_for(lambda state: state.total_accepted == 1, timeout=60)
        assert await daemon.stop() == 0
        delays = [record["delay_s"] for record in daemon.logs("throttled, retrying later")]
        assert len(delays) == 6
        # Full jitter draws from a range that doubles: the later waits reach past the first ceiling.
        assert max(delays[3:]) > 0.1
        assert await redis_client.hget("jirafe:lanes:attempts", "1001:batch") is None


async def test_learned_ceiling_spares_single_events(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    # Each event fits the API's 2,000-byte limit alone; two together do not.
    entries = [envelope("3103", "product.cost", n, note="x" * 1100) for n in range(2)]
    others = [envelope("3104", "product.cost", n, note="y" * 1400) for n in range(3)]
    async with Sandbox(tokens={"token-default": {"3103", "3104"}}) as sandbox:
        sandbox.faults.add("max_body", max_body_bytes=2000, site="3103")
        env = daemon_env(redis_server.url, sandbox.base_url, **{**FAST, "batch_linger_ms": 300})
        await push(redis_client, entries)
        daemon = await DaemonProcess(env).start()
        await sandbox.wait_for(lambda state: state.accepted_count("3103") >= 2, timeout=30)
        await push(redis_client, others)
        await sandbox.wait_for(lambda state: state.accepted_count("3104") >= 3, timeout=30)
        await wait_drained(redis_client)
        assert await daemon.stop() == 0
        assert [event.data["seq"] for event in sandbox.state.events("3103")] == [0, 1]
    assert await dead_export(env) == []


async def _scrape(port: int) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        return await response.text()


async def wait_until(read, accept, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    """Poll `read()` until `accept(value)`: a metrics gauge has no event to await."""

    async def check() -> None:
        while not accept(await read()):  # noqa: ASYNC110
            await asyncio.sleep(0.1)

    await asyncio.wait_for(check(), timeout)


async def test_nearly_full_store_resends_no_accepted_event(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    # Four rejected events in one batch, but room for only two dead letters.
    entries = poisoned("1001", 200, {10, 60, 110, 160}, event_type="product")
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        sandbox.faults.add("poison", poison_scope="event")
        env = daemon_env(redis_server.url, sandbox.base_url, dead_letter_max_entries=2,
                         **{**FAST, "batch_linger_ms": 300})
        await push(redis_client, entries)
        daemon = await DaemonProcess(env).start()
        await daemon.wait_for_log("dead-letter store is full: lane waits until it is emptied")
        # The next try sends a smaller batch of the waiting events, whose two dead
        # letters fit; the other two wait for room.
        await wait_redis(lambda: redis_client.zcard("jirafe:dead:index"), 2, timeout=30)
        assert await daemon.stop() in (0, 2)
        assert sandbox.state.accepted_count("1001") == 196
        assert sandbox.state.total_duplicates == 0
        waiting = await lane_events(redis_client, "1001:batch")
        assert [orjson.loads(raw)["id"] for raw in waiting] == ["1001-110", "1001-160"]
        dead = await dead_export(env)
        assert sorted(record["id"] for record in dead) == ["1001-10", "1001-60"]


async def test_lost_intake_leadership_is_not_a_crash(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        env = daemon_env(redis_server.url, sandbox.base_url, **FAST)
        daemon = await DaemonProcess(env).start()
        await daemon.wait_for_log("intake leadership acquired")
        # Another instance took the leadership, as after this one froze past its lease.
        await redis_client.set("jirafe:intake:leader", "someone-else", px=1500)
        await push(redis_client, [envelope("1001", "cart", n) for n in range(20)])
        await daemon.wait_for_log("intake leadership lost")
        await sandbox.wait_for(lambda state: state.accepted_count("1001") >= 20, timeout=30)
        assert await daemon.stop() == 0
        assert [event.data["seq"] for event in sandbox.state.events("1001")] == list(range(20))


async def test_recovery_brings_forward_backed_off_lanes(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    backed_off = ["1001", "1002", "1003", "1004", "1005"]
    async with Sandbox(tokens={"token-default": {*backed_off, "1006"}}) as sandbox:
        outage = sandbox.faults.add("error", status=503)
        # Full jitter over up to 60 s: without a recovery signal, five lanes would
        # almost never all be retried within the wait below.
        env = daemon_env(redis_server.url, sandbox.base_url, retry_base_s=60, retry_cap_s=120, batch_linger_ms=50)
        daemon = await DaemonProcess(env).start()
        entries = [envelope(site, "order", n) for site in backed_off for n in range(5)]
        await push(redis_client, entries)
        await sandbox.wait_for(
            lambda state: {record.site for record in state.requests if record.status == 503} >= set(backed_off),
            timeout=30,
        )
        sandbox.faults.remove(outage.id)
        # A site that never failed shows that the API responds again.
        await push(redis_client, [envelope("1006", "order", 0)])
        await sandbox.wait_for(lambda state: state.total_accepted == len(entries) + 1, timeout=20)
        await daemon.wait_for_log("API responded after a quiet spell, retrying backed-off lanes sooner")
        assert await daemon.stop() == 0
        for site in backed_off:
            assert [event.data["seq"] for event in sandbox.state.events(site)] == list(range(5))
        assert sandbox.state.total_duplicates == 0
