"""Tokens never leave the daemon or the CLI: logs, errors, metrics and command output."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from forwarder.sandbox import Sandbox
from tests.daemon_proc import StartDaemon, daemon_env
from tests.e2e import envelope, push, run_cli
from tests.servers import RedisServer, free_port

# Every token starts with MARKER, so a partial leak (a prefix, a truncated
# message) is found too.
MARKER = b"tok-Secret"
DEFAULT_TOKEN = "tok-Secret-Default-9f2c41d7"
REVOKED_TOKEN = "tok-Secret-Revoked-5be1a0c3"
ENV_TOKEN = "tok-Secret-Environment-0d77e9aa"
INVALID_TOKEN = "tok-Secret-Invalid 77"
REDIS_PASSWORD = "tok-Secret-RedisPassword-31c9"
TOKENS = [DEFAULT_TOKEN, REVOKED_TOKEN, ENV_TOKEN, INVALID_TOKEN, REDIS_PASSWORD]
REDIS_USER = "forwarder-secrets-test"



def valid_config(path: Path) -> None:
    (path.parent / "default.token").write_text(DEFAULT_TOKEN + "\n")
    path.write_text(f'[api]\ntoken_file = "default.token"\n\n[sites."1002"]\ntoken = "{REVOKED_TOKEN}"\n')


def invalid_config(path: Path) -> None:
    # Problems whose messages could quote a token: an unknown key holding one, a
    # token with a space, and a site with both token and token_file.
    path.write_text(
        f'[api]\ntokn = "{DEFAULT_TOKEN}"\n\n'
        f'[sites."1002"]\ntoken = "{REVOKED_TOKEN}"\ntoken_file = "default.token"\n\n'
        f'[sites."1004"]\ntoken = "{INVALID_TOKEN}"\n'
    )


def assert_no_token(name: str, output: bytes) -> None:
    assert MARKER not in output, f"{name} contains a token: {output[:2000]!r}"
    for token in TOKENS:
        assert token.encode() not in output, name


@pytest.fixture
async def redis_url(redis_server: RedisServer, redis_client: aioredis.Redis) -> AsyncIterator[str]:
    """URL of an ACL user with a password on the test server, so that the URL contains a secret too."""
    await redis_client.acl_setuser(
        REDIS_USER, enabled=True, passwords=[f"+{REDIS_PASSWORD}"], keys=["jirafe:*"], commands=["+@all"]
    )
    yield f"redis://{REDIS_USER}:{REDIS_PASSWORD}@127.0.0.1:{redis_server.port}/0"
    await redis_client.acl_deluser(REDIS_USER)


async def test_tokens_never_leak(tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, start_daemon: StartDaemon) -> None:
    config = tmp_path / "forwarder.toml"
    valid_config(config)
    port = free_port()
    invalid_cart = orjson.loads(envelope("1001", "cart", 50))
    del invalid_cart["data"]["total"]
    entries = [
        *(envelope("1001", "order", n) for n in range(20)),
        *(envelope("1002", "order", n) for n in range(5)),
        *(envelope("1003", "product", n) for n in range(5)),
        orjson.dumps(invalid_cart),
        b"{not json",
    ]
    outputs: dict[str, bytes] = {}

    # REVOKED_TOKEN is unknown to the sandbox: 403 invalid_token pauses site 1002.
    async with Sandbox(tokens={DEFAULT_TOKEN: {"1001"}, ENV_TOKEN: {"1003"}}) as sandbox:
        # Site 1003 fails twice with 503, site 1001 once with a reset connection.
        sandbox.faults.add("error", site="1003", status=503, count=2)
        sandbox.faults.add("reset", site="1001", count=1)
        env = daemon_env(redis_url, sandbox.base_url, token=None, batch_linger_ms=20,
                         retry_base_s=0.05, retry_cap_s=0.2, metrics_listen=f"127.0.0.1:{port}",
                         sites_1003_token=ENV_TOKEN)
        daemon = await start_daemon(env, ["--config", str(config)])
        await push(redis_client, entries)
        await sandbox.wait_for(lambda state: state.total_accepted >= 25, timeout=30)
        await daemon.wait_for_log("site paused: the API rejected its credentials; events are kept")
        await daemon.wait_for_log("event dead-lettered")
        await daemon.wait_for_log("queue entry dead-lettered")
        # The drain went through the error paths whose messages could carry a token.
        assert sandbox.state.requests_by_status[503] == 2
        assert sandbox.state.requests_by_status["reset"] == 1
        assert sandbox.state.requests_by_status[403] >= 1

        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            async with session.get("/metrics") as response:
                outputs["/metrics"] = await response.read()

        cli_env = dict(env)
        for name, args in {
            "status --json": ["status", "--json", "--no-rate", "--config", str(config)],
            "status": ["status", "--no-rate", "--config", str(config)],
            "check-config --print": ["check-config", "--print", "--config", str(config)],
            "dead export": ["dead", "export", "--config", str(config)],
            "dead list": ["dead", "list", "--config", str(config)],
        }.items():
            code, stdout, stderr = await run_cli(*args, env=cli_env)
            outputs[name] = stdout + stderr
        assert b'"token": "***"' in outputs["check-config --print"]
        assert f"redis://{REDIS_USER}:***@".encode() in outputs["check-config --print"]
        assert b"site 1002 (batch lane) is paused: invalid_token (HTTP 403)" in outputs["status"]

        invalid = tmp_path / "invalid.toml"
        invalid_config(invalid)
        code, stdout, stderr = await run_cli("check-config", "--config", str(invalid), env=cli_env)
        assert code == 1
        outputs["check-config (invalid)"] = stdout + stderr
        assert b"sites.1004.token: invalid value (not shown)" in stderr

        # A reload that fails on the same problems logs them.
        invalid_config(config)
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for_log("reload failed, keeping the running configuration")
        assert await daemon.stop() == 0

    outputs["daemon log"] = b"".join(daemon.raw_lines)
    for name, output in outputs.items():
        assert output, name
        assert_no_token(name, output)
