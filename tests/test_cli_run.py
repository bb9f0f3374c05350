"""`run` and `check-config` through the real entry point: the default token and Redis URLs."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from tests.daemon_proc import DaemonProcess, daemon_env
from tests.e2e import envelope, run_cli
from tests.servers import RedisServer

MISSING_TOKEN = (
    b"api.token: no default token is set: set api.token or api.token_file, or the environment "
    b"variable JIRAFE_FORWARDER_API_TOKEN."
)


def base_env(**settings: str) -> dict[str, str]:
    """A clean environment with only PATH and the given JIRAFE_FORWARDER_* settings."""
    env = {"PATH": "/usr/bin:/bin"}
    for key, value in settings.items():
        env[f"JIRAFE_FORWARDER_{key.upper()}"] = value
    return env


async def test_run_without_default_token(tmp_path: Path, redis_server: RedisServer) -> None:
    # A site token alone leaves every other site without one.
    config = tmp_path / "forwarder.toml"
    config.write_text('[sites."1001"]\ntoken = "site-token"\n')
    env = base_env(redis_url=redis_server.url, metrics_listen="")
    code, stdout, stderr = await run_cli("run", "--config", str(config), env=env, timeout=30)
    assert code == 2
    assert stdout == b""
    assert stderr.startswith(b"jirafe-forwarder: invalid configuration:\n")
    assert MISSING_TOKEN in stderr


async def test_check_config_without_default_token(tmp_path: Path) -> None:
    config = tmp_path / "forwarder.toml"
    config.write_text('[sites."1001"]\ntoken = "site-token"\n')
    code, stdout, stderr = await run_cli("check-config", "--config", str(config), env=base_env())
    assert code == 1
    assert stdout == b""
    assert b"1 problem(s)" in stderr
    assert MISSING_TOKEN in stderr

    code, _, stderr = await run_cli("check-config", env=base_env())
    assert code == 1
    assert b"built-in defaults: 1 problem(s)" in stderr
    assert MISSING_TOKEN in stderr


async def test_check_config_token_with_other_problems(tmp_path: Path) -> None:
    config = tmp_path / "forwarder.toml"
    config.write_text("[batch]\nlinger_ms = -1\n")
    code, _, stderr = await run_cli("check-config", "--config", str(config), env=base_env())
    assert code == 1
    assert b"2 problem(s)" in stderr
    assert b"batch.linger_ms" in stderr
    assert MISSING_TOKEN in stderr

    # A token from the environment counts, in both paths of check-config.
    env = base_env(api_token="env-token")
    code, _, stderr = await run_cli("check-config", "--config", str(config), env=env)
    assert code == 1
    assert b"1 problem(s)" in stderr
    assert MISSING_TOKEN not in stderr
    config.write_text('[api]\ntoken_file = "token"\n')
    (tmp_path / "token").write_text("file-token\n")
    code, stdout, _ = await run_cli("check-config", "--config", str(config), env=base_env())
    assert code == 0
    assert stdout.endswith(b": configuration is valid\n")


async def test_commands_work_without_token(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    env = base_env(redis_url=redis_server.url)
    lines = tmp_path / "events.jsonl"
    lines.write_bytes(envelope("1001", "cart", 1) + b"\n")
    code, stdout, stderr = await run_cli("enqueue", str(lines), env=env)
    assert code == 0, stderr.decode()
    assert await redis_client.llen("jirafe:events") == 1

    code, stdout, stderr = await run_cli("status", "--json", "--no-rate", env=env)
    assert code == 1, stderr.decode()  # one event waits and no daemon is alive
    assert orjson.loads(stdout)["queue"]["backlog"] == 1

    code, stdout, stderr = await run_cli("dead", "list", env=env)
    assert code == 0
    assert stdout == b""
    assert stderr == b"0 dead letter(s)\n"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/99999", b"failed: ResponseError: DB index is out of range. Check redis.url"),
        ("/0?foo=bar", b"failed: TypeError: AbstractConnection.__init__() got an unexpected keyword argument 'foo'"),
        ("/0?db=x", b"failed: ValueError: Invalid value for 'db' in connection URL. Check redis.url"),
    ],
    ids=["db-out-of-range", "unknown-option", "invalid-option"],
)
async def test_run_rejects_unusable_redis_url(path: str, message: bytes, redis_server: RedisServer) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}{path}"
    env = base_env(redis_url=url, api_token="token", metrics_listen="", log_format="json")
    code, stdout, stderr = await run_cli("run", env=env, timeout=30)
    assert code == 2
    assert stdout == b""
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, stderr.decode()
    assert lines[0].startswith(f"jirafe-forwarder run: Redis at {url} failed: ")
    assert message in stderr


async def test_run_rejects_wrong_redis_password(redis_server: RedisServer) -> None:
    url = f"redis://nosuchuser:pw-9931@127.0.0.1:{redis_server.port}/0"
    env = base_env(redis_url=url, api_token="token", metrics_listen="", log_format="json")
    code, _, stderr = await run_cli("run", env=env, timeout=30)
    assert code == 2
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, stderr.decode()
    masked = f"redis://nosuchuser:***@127.0.0.1:{redis_server.port}/0"
    assert lines[0].startswith(f"jirafe-forwarder run: Redis at {masked} failed: AuthenticationError: ")
    assert lines[0].endswith("Check the user and password in redis.url")
    assert "pw-9931" not in lines[0]


async def test_check_config_rejects_url_options(redis_server: RedisServer) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/0?foo=bar"
    code, _, stderr = await run_cli("check-config", env=base_env(redis_url=url, api_token="token"))
    assert code == 1
    assert b"1 problem(s)" in stderr
    assert b"redis.url: invalid value " + url.encode() + b": redis-py rejects it" in stderr


async def test_run_waits_for_unreachable_redis(own_redis: RedisServer) -> None:
    # A server that is down is not a configuration error: the daemon waits for it.
    own_redis.stop()
    env = daemon_env(own_redis.url, "http://127.0.0.1:9/v2")
    daemon = await DaemonProcess(env).start(wait_ready=False)
    retry = await daemon.wait_for_log("redis not reachable, retrying")
    assert f"connecting to 127.0.0.1:{own_redis.port}" in retry["error"]
    assert await daemon.stop() == 0
    assert not daemon.logs("ready")
