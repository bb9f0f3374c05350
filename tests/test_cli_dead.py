"""The dead-letter commands and CLI argument errors, through the real entry point."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import redis.asyncio as aioredis

from forwarder.config import load_config
from forwarder.daemon import Daemon
from forwarder.sandbox import Sandbox
from tests.e2e import envelope, push, run_cli, wait_drained
from tests.servers import RedisServer


def cli_env(redis_url: str) -> dict[str, str]:
    return {"JIRAFE_FORWARDER_REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"}


@pytest.fixture
async def dead_store(redis_server: RedisServer, redis_client: aioredis.Redis) -> aioredis.Redis:
    """A store with 6 dead letters: 3 envelope problems and 3 API rejections."""
    entries = [
        b"{broken",
        b'{"site_id":"1001","type":"basket","data":{}}',
        b'{"site_id":"1002","type":"cart","data":[]}',
        envelope("1001", "order", 1, poison=True),
        envelope("1002", "order", 2, poison=True),
        envelope("1002", "cart", 3, poison=True),
        envelope("1001", "cart", 4),
    ]
    async with Sandbox(tokens={"token": {"1001", "1002"}}) as sandbox:
        sandbox.faults.add("poison", poison_scope="event")
        config = load_config(None, {
            "JIRAFE_FORWARDER_REDIS_URL": redis_server.url, "JIRAFE_FORWARDER_API_BASE_URL": sandbox.base_url,
            "JIRAFE_FORWARDER_API_TOKEN": "token", "JIRAFE_FORWARDER_BATCH_LINGER_MS": "10",
            "JIRAFE_FORWARDER_METRICS_LISTEN": "",
        })
        await push(redis_client, entries)
        daemon = Daemon(config)
        task = asyncio.create_task(daemon.run())
        await sandbox.wait_for(lambda state: state.total_accepted >= 1, timeout=20)
        await wait_drained(redis_client)
        daemon.stop()
        assert await task == 0
    assert await redis_client.zcard("jirafe:dead:index") == 6
    return redis_client


async def _list(env: dict[str, str], *filters: str) -> list[dict]:
    code, stdout, stderr = await run_cli("dead", "list", "--json", *filters, env=env)
    assert code == 0, stderr
    return [orjson.loads(line) for line in stdout.splitlines()]


async def test_dead_list_filters(dead_store: aioredis.Redis, redis_server: RedisServer) -> None:
    env = cli_env(redis_server.url)
    assert len(await _list(env)) == 6
    assert {r["reason"] for r in await _list(env, "--site", "1002")} == {"invalid_data", "validation"}
    assert len(await _list(env, "--site", "1002", "--type", "order")) == 1
    assert len(await _list(env, "--reason", "validation")) == 3
    assert len(await _list(env, "--older-than", "1h")) == 0
    assert len(await _list(env, "--newer-than", "1h")) == 6
    records = await _list(env)
    assert all("raw" not in record for record in records)


async def test_dead_show_and_export(dead_store: aioredis.Redis, redis_server: RedisServer) -> None:
    env = cli_env(redis_server.url)
    first = (await _list(env, "--reason", "unknown_type"))[0]
    code, stdout, _ = await run_cli("dead", "show", str(first["dead_id"]), env=env)
    assert code == 0
    shown = orjson.loads(stdout)
    assert shown["raw"] == '{"site_id":"1001","type":"basket","data":{}}'
    assert shown["site_id"] == "1001"
    code, _, stderr = await run_cli("dead", "show", "999999", env=env)
    assert code == 1
    assert b"dead letter 999999 not found" in stderr

    code, stdout, _ = await run_cli("dead", "export", "--reason", "validation", env=env)
    exported = [orjson.loads(line) for line in stdout.splitlines()]
    assert code == 0
    assert sorted(record["id"] for record in exported) == ["1001-1", "1002-2", "1002-3"]
    for record in exported:
        assert record["status"] == 200
        assert record["attempts"] == 1
        assert orjson.loads(record["raw"])["data"]["poison"] is True


async def test_dead_replay_moves_back_in_order(dead_store: aioredis.Redis, redis_server: RedisServer) -> None:
    env = cli_env(redis_server.url)
    in_dead_order = [record["id"] for record in await _list(env, "--reason", "validation")]
    code, stdout, _ = await run_cli("dead", "replay", "--reason", "validation", env=env)
    assert code == 0
    assert b"replayed 3 dead letter(s)" in stdout
    assert await dead_store.zcard("jirafe:dead:index") == 3
    queued = [orjson.loads(raw)["id"] for raw in reversed(await dead_store.lrange("jirafe:events", 0, -1))]
    # Replayed in the order they were dead-lettered; the oldest is consumed first.
    assert queued == in_dead_order
    assert sorted(queued) == ["1001-1", "1002-2", "1002-3"]


async def test_dead_purge_needs_confirmation(dead_store: aioredis.Redis, redis_server: RedisServer) -> None:
    env = cli_env(redis_server.url)
    code, _, stderr = await run_cli("dead", "purge", "--site", "1001", env=env)
    assert code == 2
    assert b"--yes" in stderr
    assert await dead_store.zcard("jirafe:dead:index") == 6
    code, stdout, _ = await run_cli("dead", "purge", "--site", "1001", "--yes", env=env)
    assert code == 0
    assert b"purged 2 dead letter(s)" in stdout
    assert {r["site_id"] for r in await _list(env)} == {"1002", None}
    assert int(await dead_store.get("jirafe:dead:bytes")) > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["frobnicate"], b"invalid choice"),
        (["dead"], b"required"),
        (["dead", "show", "abc"], b"invalid int value"),
        (["dead", "list", "--older-than", "yesterday"], b"invalid age 'yesterday'"),
        (["dead", "replay", "x1"], b"invalid int value"),
        (["demo", "--events", "many"], b"invalid int value"),
    ],
)
async def test_malformed_arguments_rejected(args: list[str], message: bytes, redis_server: RedisServer) -> None:
    code, _, stderr = await run_cli(*args, env=cli_env(redis_server.url))
    assert code == 2
    assert message in stderr


async def test_check_config_lists_every_problem(tmp_path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[api]\nmax_batch_bytes = -5\nbase_url = "ftp://x"\n[batch]\nlinger = 5\n')
    code, _, stderr = await run_cli("check-config", "--config", str(config), env={"PATH": "/usr/bin:/bin"})
    assert code == 1
    assert b"3 problem(s)" in stderr
    assert b"api.max_batch_bytes" in stderr
    assert b"api.base_url" in stderr
    assert b"batch.linger" in stderr


async def test_run_with_invalid_config_exits_2(tmp_path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[redis\n")
    code, _, stderr = await run_cli("run", "--config", str(config), env={"PATH": "/usr/bin:/bin"})
    assert code == 2
    assert b"invalid configuration" in stderr
