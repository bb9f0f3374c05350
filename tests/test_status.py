"""`jirafe-forwarder status` as a subprocess, against state that the real daemon built."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from forwarder.sandbox import Sandbox
from tests.daemon_proc import StartDaemon, daemon_env
from tests.e2e import envelope, lane_length, push, run_cli
from tests.servers import RedisServer, free_port

MALFORMED = [b"{not json", b"[1]", b'{"site_id":"1001","type":"basket","data":{}}']



def clean_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("JIRAFE_FORWARDER_")}


def write_config(tmp_path: Path, redis_url: str, extra: str = "") -> Path:
    path = tmp_path / "status.toml"
    path.write_text(f'[redis]\nurl = "{redis_url}"\n{extra}')
    return path


async def status_json(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    code, stdout, stderr = await run_cli("status", "--config", str(config), "--json", *args, env=clean_env())
    assert stdout, stderr.decode()
    return code, orjson.loads(stdout)


def lane(document: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [entry for entry in document["lanes"] if entry["lane"] == name]
    assert len(matches) == 1, document["lanes"]
    return matches[0]


async def test_status_paused_site_and_dead_letters(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis, start_daemon: StartDaemon
) -> None:
    good = [envelope("1001", "order", n) for n in range(30)]
    # The token may write to 1001 only, so the API returns 403 for 1002 and the daemon pauses it.
    paused = [envelope("1002", "cart", n) for n in range(20)]
    invalid_cart = orjson.loads(envelope("1001", "cart", 99))
    del invalid_cart["data"]["total"]
    config = write_config(tmp_path, redis_server.url)

    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        env = daemon_env(redis_server.url, sandbox.base_url, batch_linger_ms=20)
        daemon = await start_daemon(env)
        await push(redis_client, [*good, *paused, *MALFORMED, orjson.dumps(invalid_cart)])
        await sandbox.wait_for(lambda state: state.total_accepted >= 30, timeout=30)
        await daemon.wait_for_log("site paused: the API rejected its credentials; events are kept")
        await daemon.wait_for(lambda records: len([r for r in records if "dead-lettered" in r["event"]]) >= 4)

        code, document = await status_json(config, "--no-rate")

        assert code == 1
        assert document["healthy"] is False
        assert document["redis_reachable"] is True
        assert len(document["problems"]) == 1
        assert "site 1002 (batch lane) is paused" in document["problems"][0]
        paused_lane = lane(document, "1002:batch")
        assert paused_lane["state"] == "paused"
        assert paused_lane["backlog"] == 20
        assert paused_lane["backlog"] == await lane_length(redis_client, "1002:batch")
        assert paused_lane["last_error"] == "authorization (HTTP 403)"
        assert paused_lane["last_success_ms"] is None
        assert paused_lane["next_due_ms"] is not None
        ok_lane = lane(document, "1001:batch")
        assert ok_lane["state"] == "ok"
        assert ok_lane["backlog"] == 0
        assert isinstance(ok_lane["last_success_ms"], int)
        assert document["lanes"][0]["lane"] == "1002:batch"  # problems first
        assert document["lane_totals"]["paused"] == 1
        assert document["queue"] == {"backlog": 0, "claimed": 0, "in_lanes": 20}

        dead = document["dead_letters"]
        assert dead["entries"] == 4
        assert dead["by_reason"] == {"invalid_json": 1, "not_an_object": 1, "unknown_type": 1, "validation": 1}
        assert dead["full"] is False
        assert dead["bytes"] == int(await redis_client.get("jirafe:dead:bytes"))

        assert document["live_instances"] == 1
        (instance,) = document["instances"]
        assert instance["pid"] == daemon.pid
        assert instance["live"] is True
        assert document["intake"]["leader"] == instance["id"]
        assert document["rate"] is None

        code, stdout, _ = await run_cli("status", "--config", str(config), "--no-rate", env=clean_env())
        text = stdout.decode()
        assert code == 1
        assert "health:       NEEDS ATTENTION" in text
        assert "site 1002 (batch lane) is paused: authorization (HTTP 403); 20 events wait in Redis" in text
        assert "dead letters: 4 of 100000 entries" in text

        assert await daemon.stop() == 0

    # The daemon is gone while 20 events wait in the paused lane.
    code, document = await status_json(config, "--no-rate")
    assert code == 1
    assert document["live_instances"] == 0
    assert any("no live forwarder instance, and 20 events wait in Redis" in p for p in document["problems"])


async def test_status_healthy_empty(tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    config = write_config(tmp_path, redis_server.url)

    code, document = await status_json(config, "--no-rate")

    assert code == 0
    assert document["healthy"] is True
    assert document["problems"] == []
    assert document["lanes"] == []
    assert document["dead_letters"]["entries"] == 0


async def test_status_dead_letter_store_full(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis, start_daemon: StartDaemon
) -> None:
    config = write_config(tmp_path, redis_server.url, "[dead_letter]\nmax_entries = 3\n")
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        env = daemon_env(redis_server.url, sandbox.base_url, dead_letter_max_entries=3)
        daemon = await start_daemon(env)
        await push(redis_client, MALFORMED)
        await daemon.wait_for(lambda records: len([r for r in records if "dead-lettered" in r["event"]]) >= 3)
        # The store is full, so the intake leaves these in the producer list.
        await push(redis_client, [envelope("1001", "cart", n) for n in range(5)])
        await daemon.wait_for_log("dead-letter store is full: intake stopped until dead letters are replayed or purged")

        code, document = await status_json(config, "--no-rate")

        assert code == 1
        assert document["dead_letters"]["full"] is True
        assert document["dead_letters"]["fill_ratio"] == 1.0
        assert document["queue"]["backlog"] == 5
        assert any(problem.startswith("dead-letter store is full (3 of 3 entries") for problem in document["problems"])
        assert await daemon.stop() == 0


async def test_status_redis_unreachable(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"redis://127.0.0.1:{free_port()}/0")

    code, stdout, stderr = await run_cli("status", "--config", str(config), "--json", env=clean_env())

    assert code == 2
    document = orjson.loads(stdout)
    assert document["redis_reachable"] is False
    assert document["healthy"] is False
    assert "ConnectionError" in document["error"]
    assert "failed" in stderr.decode()


async def test_status_measures_rate_between_renewals(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    # A stand-in instance that renews every 0.2 s and delivers 50 events per renewal,
    # the way the daemon's renewer writes its heartbeat and totals.
    config = write_config(tmp_path, redis_server.url, "[lease]\nttl_s = 3.0\nrenew_interval_s = 1.0\n")
    instance = "host-a:4242:abcdef"
    delivered = 0

    async def renew() -> None:
        nonlocal delivered
        while True:
            info = orjson.dumps({"host": "host-a", "pid": 4242, "delivered": delivered})
            async with redis_client.pipeline(transaction=True) as pipe:
                pipe.set(f"jirafe:instance:{instance}", "1", px=3000)
                pipe.hset("jirafe:instances", instance, info)
                await pipe.execute()
            delivered += 50
            await asyncio.sleep(0.2)

    renewer = asyncio.create_task(renew())
    try:
        code, document = await status_json(config)
    finally:
        renewer.cancel()
        await asyncio.gather(renewer, return_exceptions=True)

    assert code == 0
    rate = document["rate"]
    assert rate["instances"] == 1
    assert rate["delivered_per_s"] > 0
    assert rate["window_s"] > 0
    (entry,) = document["instances"]
    assert entry["delivered_per_s"] == rate["delivered_per_s"]
    assert entry["delivered"] > 0
    assert entry["host"] == "host-a"


async def test_status_sends_no_write_command(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    config = write_config(tmp_path, redis_server.url, "[lease]\nttl_s = 3.0\nrenew_interval_s = 0.5\n")
    # A bit of every kind of key that status reads.
    await push(redis_client, [envelope("1001", "cart", 1)])
    await redis_client.rpush("jirafe:lane:1002:batch", b"item")
    await redis_client.zadd("jirafe:lanes:due", {"1002:batch": 1})
    await redis_client.hset("jirafe:lanes:state", "1002:batch", orjson.dumps({"state": "retrying"}))
    await redis_client.hset("jirafe:lanes:attempts", "1002:batch", "2,1000,2000")
    await redis_client.hset("jirafe:instances", "i1", orjson.dumps({"host": "h", "pid": 1, "delivered": 5}))
    await redis_client.set("jirafe:instance:i1", "1", px=3000)
    await redis_client.hset("jirafe:dead:1", mapping={"raw": b"x", "meta": orjson.dumps({"reason": "invalid_json"})})
    await redis_client.zadd("jirafe:dead:index", {"1": 1})
    await redis_client.config_resetstat()

    code, document = await status_json(config)

    assert code == 0
    assert lane(document, "1002:batch")["attempts"] == 2
    assert document["notices"] == ["1 lane(s) retrying with backoff"]
    stats = await redis_client.info("commandstats")
    commands = {name.removeprefix("cmdstat_").split("|")[0] for name in stats}
    assert {"llen", "zrange", "hgetall", "pttl"} <= commands
    for command in commands - {"info", "config", "client", "hello"}:
        (info,) = (await redis_client.execute_command("COMMAND", "INFO", command)).values()
        assert "write" not in info["flags"], command
