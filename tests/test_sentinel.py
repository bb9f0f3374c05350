"""Redis through Sentinel: URL parsing, and a drain with the primary found by a real sentinel."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from forwarder.config import check_config
from forwarder.redis_connect import SentinelTarget, parse_sentinel_url
from forwarder.sandbox import Sandbox
from tests.daemon_proc import DaemonProcess, daemon_env
from tests.e2e import envelope, push, run_cli, wait_drained
from tests.servers import RedisServer, free_port


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("redis+sentinel://10.1.1.1:26379/mymaster",
         SentinelTarget([("10.1.1.1", 26379)], "mymaster", 0, None, None, False)),
        ("redis+sentinel://a:1,b:2,c/shop/3",
         SentinelTarget([("a", 1), ("b", 2), ("c", 26379)], "shop", 3, None, None, False)),
        ("rediss+sentinel://forwarder:p%40ss@h:5000/svc",
         SentinelTarget([("h", 5000)], "svc", 0, "forwarder", "p@ss", True)),
    ],
)
def test_sentinel_url_parsed(url: str, target: SentinelTarget) -> None:
    assert parse_sentinel_url(url) == target


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel:///mymaster", "no sentinel address"),
        ("redis+sentinel://h:26379", "no service name"),
        ("redis+sentinel://h:26379/", "no service name"),
        ("redis+sentinel://h:port/svc", "invalid sentinel address 'h:port'"),
        ("redis+sentinel://h:99999/svc", "invalid sentinel address 'h:99999'"),
        ("redis+sentinel://h:1/svc/zero", "invalid database 'zero'"),
    ],
)
def test_malformed_sentinel_url_rejected(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sentinel_url(url)
    problems = check_config(None, {"JIRAFE_FORWARDER_REDIS_URL": url})
    assert len(problems) == 1
    assert problems[0].startswith("JIRAFE_FORWARDER_REDIS_URL: invalid value")
    assert message in problems[0]


@pytest.fixture
def sentinel(redis_server: RedisServer, tmp_path: Path) -> Iterator[int]:
    """A real sentinel monitoring the session's redis-server as service `shop`."""
    binary = shutil.which("redis-server")
    assert binary is not None
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor shop 127.0.0.1 {redis_server.port} 1\n"
    )
    process = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    import redis

    probe = redis.Redis(port=port, socket_timeout=0.5)
    while time.monotonic() < deadline:
        try:
            if probe.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "shop"):
                break
        except redis.RedisError:
            time.sleep(0.05)
    probe.close()
    yield port
    process.terminate()
    process.wait(timeout=10)


async def test_drain_through_sentinel(sentinel: int, redis_client: aioredis.Redis) -> None:
    url = f"redis+sentinel://127.0.0.1:{sentinel}/shop/0"
    entries = [envelope("1001", "product", n) for n in range(300)]
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        env = daemon_env(url, sandbox.base_url, batch_linger_ms=20)
        daemon = await DaemonProcess(env).start()
        await push(redis_client, entries)
        await sandbox.wait_for(lambda state: state.total_accepted >= 300, timeout=30)
        await wait_drained(redis_client)
        assert await daemon.stop() == 0
        assert [event.data["seq"] for event in sandbox.state.events("1001")] == list(range(300))
    code, stdout, stderr = await run_cli("status", "--json", "--no-rate", env=env)
    assert code == 0, stderr
    report = orjson.loads(stdout)
    assert report["queue"] == {"backlog": 0, "claimed": 0, "in_lanes": 0}
