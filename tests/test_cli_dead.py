"""The dead-letter commands and CLI argument errors, through the real entry point."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import orjson
import pytest
import redis.asyncio as aioredis

from forwarder.config import load_config
from forwarder.daemon import Daemon
from forwarder.sandbox import Sandbox
from tests.daemon_proc import ROOT
from tests.e2e import envelope, push, run_cli, wait_drained
from tests.servers import RedisServer

# Redis time (ms) of the dead letters that tests write directly.
BASE_MS = 1_750_000_000_000


def cli_env(redis_url: str) -> dict[str, str]:
    return {"JIRAFE_FORWARDER_REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"}


async def write_dead_letters(client: aioredis.Redis, letters: list[tuple[int, int, str]]) -> None:
    """Store (id, Redis time in ms, site) dead letters in the layout of redis_store's scripts.

    Tests write them directly when they need exact ids and times, such as many
    dead letters within one millisecond.
    """
    async with client.pipeline(transaction=False) as pipe:
        for dead_id, dead_at_ms, site in letters:
            raw = orjson.dumps({"site_id": site, "type": "cart", "data": "not an object", "id": f"dead-{dead_id}"})
            meta = orjson.dumps({"reason": "invalid_data", "site_id": site, "type": "cart"})
            pipe.hset(f"jirafe:dead:{dead_id}", mapping={"raw": raw, "meta": meta})
            pipe.zadd("jirafe:dead:index", {str(dead_id): dead_at_ms})
            pipe.incrby("jirafe:dead:bytes", len(raw) + len(meta))
        pipe.set("jirafe:dead:seq", max(dead_id for dead_id, _, _ in letters))
        await pipe.execute()


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
        (["dead", "list", "--older-than", ""], b"invalid age ''"),
        (["dead", "export", "--newer-than", ""], b"invalid age ''"),
        (["dead", "purge", "--older-than", "", "--yes"], b"invalid age ''"),
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
    config.write_text('[api]\ntoken = "t0k3n"\nmax_batch_bytes = -5\nbase_url = "ftp://x"\n[batch]\nlinger = 5\n')
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


@pytest.mark.parametrize(
    "args",
    [["list"], ["show", "1"], ["export"], ["replay", "1"], ["purge", "--yes"]],
    ids=["list", "show", "export", "replay", "purge"],
)
async def test_dead_redis_unreachable(args: list[str], own_redis: RedisServer) -> None:
    own_redis.stop()
    url = f"redis://forwarder:pw-4417@127.0.0.1:{own_redis.port}/0"
    code, stdout, stderr = await run_cli("dead", *args, env=cli_env(url))
    assert code == 2
    assert stdout == b""
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, stderr.decode()
    expected = f"Redis at redis://forwarder:***@127.0.0.1:{own_redis.port}/0 failed: ConnectionError:"
    assert expected in lines[0]
    assert "pw-4417" not in lines[0]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/99999", b"failed: ResponseError: DB index is out of range. Check redis.url"),
        ("/0?foo=bar", b"failed: TypeError: AbstractConnection.__init__() got an unexpected keyword argument 'foo'"),
        ("/0?db=x", b"failed: ValueError: Invalid value for 'db' in connection URL. Check redis.url"),
    ],
    ids=["db-out-of-range", "unknown-option", "invalid-option"],
)
async def test_dead_rejects_unusable_redis_url(path: str, message: bytes, redis_server: RedisServer) -> None:
    code, _, stderr = await run_cli("dead", "list", env=cli_env(f"redis://127.0.0.1:{redis_server.port}{path}"))
    assert code == 2
    assert len(stderr.splitlines()) == 1, stderr.decode()
    assert message in stderr


async def test_dead_list_reader_closed(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    await write_dead_letters(redis_client, [(1, BASE_MS, "1001")])
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**cli_env(redis_server.url), "PYTHONPATH": ROOT}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "forwarder.cli", "dead", "list", "--json", env=env, cwd=ROOT,
        stdout=write_end, stderr=subprocess.PIPE,
    )
    os.close(write_end)
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 141
    assert stderr == b""


@pytest.mark.parametrize("command", ["list --json", "export"])
async def test_dead_output_piped_to_head(
    command: str, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    # About 300 KB of output, far more than a pipe buffers, so the CLI is still
    # writing when head exits.
    await write_dead_letters(redis_client, [(n, BASE_MS + n, "1001") for n in range(1, 2001)])
    env = {**cli_env(redis_server.url), "PYTHONPATH": ROOT}
    script = f"set -o pipefail; {sys.executable} -m forwarder.cli dead {command} | head -n 1"
    process = await asyncio.create_subprocess_exec(
        "/bin/bash", "-c", script, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert stderr == b""
    assert process.returncode == 141
    assert orjson.loads(stdout)["dead_id"] == 1


async def test_dead_replay_missing_id(dead_store: aioredis.Redis, redis_server: RedisServer) -> None:
    env = cli_env(redis_server.url)
    present = (await _list(env, "--reason", "unknown_type"))[0]["dead_id"]
    code, stdout, stderr = await run_cli("dead", "replay", "999998", str(present), "999999", env=env)
    assert code == 1
    assert stdout == b"replayed 1 dead letter(s)\n"
    assert stderr.decode().splitlines() == ["dead letter 999998 not found", "dead letter 999999 not found"]
    assert await dead_store.lrange("jirafe:events", 0, -1) == [b'{"site_id":"1001","type":"basket","data":{}}']
    assert await dead_store.zcard("jirafe:dead:index") == 5


async def test_dead_replay_only_missing_ids(dead_store: aioredis.Redis, redis_server: RedisServer) -> None:
    code, stdout, stderr = await run_cli("dead", "replay", "9999", env=cli_env(redis_server.url))
    assert code == 1
    assert stdout == b""
    assert b"dead letter 9999 not found" in stderr
    assert await dead_store.zcard("jirafe:dead:index") == 6


async def test_dead_ids_combine_with_filters(dead_store: aioredis.Redis, redis_server: RedisServer) -> None:
    env = cli_env(redis_server.url)
    site_1001 = [record["dead_id"] for record in await _list(env, "--site", "1001")]
    site_1002 = [record["dead_id"] for record in await _list(env, "--site", "1002")]
    assert len(site_1001) == 2
    assert len(site_1002) == 3

    code, stdout, stderr = await run_cli("dead", "purge", str(site_1001[0]), "--reason", "nosuch", "--yes", env=env)
    assert code == 1
    assert stdout == b""
    assert f"dead letter {site_1001[0]} does not match the filters, skipped".encode() in stderr
    assert await dead_store.zcard("jirafe:dead:index") == 6

    ids = [str(site_1001[0]), *map(str, site_1002)]
    code, stdout, stderr = await run_cli("dead", "purge", *ids, "--site", "1002", "--yes", env=env)
    assert code == 1
    assert stdout == b"purged 3 dead letter(s)\n"
    assert stderr.decode().splitlines() == [f"dead letter {site_1001[0]} does not match the filters, skipped"]
    remaining = {record["dead_id"] for record in await _list(env)}
    assert set(site_1002).isdisjoint(remaining)
    assert site_1001[0] in remaining
    assert len(remaining) == 3


async def test_dead_replay_named_ids_oldest_first(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    await write_dead_letters(redis_client, [(7, BASE_MS, "1001"), (10, BASE_MS, "1001"), (3, BASE_MS + 5, "1001")])
    code, stdout, _ = await run_cli("dead", "replay", "3", "10", "7", "7", env=cli_env(redis_server.url))
    assert code == 0
    assert stdout == b"replayed 3 dead letter(s)\n"
    # Oldest dead letter first, and LPUSH puts the first one at the consuming end.
    queued = [orjson.loads(raw)["id"] for raw in reversed(await redis_client.lrange("jirafe:events", 0, -1))]
    assert queued == ["dead-7", "dead-10", "dead-3"]
    assert await redis_client.zcard("jirafe:dead:index") == 0
    assert int(await redis_client.get("jirafe:dead:bytes")) == 0


async def test_dead_list_same_millisecond_order(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    # Ids 7 to 12 share one millisecond, where Redis orders members as strings
    # ("10" < "7"). The 601 dead letters at BASE_MS + 1 cross the 500-entry page
    # of dead.iter_dead, and id 1100, the highest, belongs to that group.
    letters = [(n, BASE_MS - 10 + n, "1001") for n in range(1, 7)]
    letters += [(n, BASE_MS, "1001") for n in range(7, 13)]
    letters += [(n, BASE_MS + 1, "1002") for n in range(13, 613)]
    letters += [(n, BASE_MS + 2, "1001") for n in range(613, 1100)]
    letters += [(1100, BASE_MS + 1, "1002")]
    await write_dead_letters(redis_client, letters)
    expected = [dead_id for _, dead_id in sorted((ms, dead_id) for dead_id, ms, _ in letters)]
    assert expected[:14] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    env = cli_env(redis_server.url)

    listed = await _list(env)
    assert [record["dead_id"] for record in listed] == expected
    assert [record["dead_at_ms"] for record in listed] == sorted(ms for _, ms, _ in letters)

    exported = [orjson.loads(line) for line in (await run_cli("dead", "export", env=env))[1].splitlines()]
    assert [record["dead_id"] for record in exported] == expected

    filtered = await _list(env, "--site", "1002")
    assert [record["dead_id"] for record in filtered] == [*range(13, 613), 1100]
