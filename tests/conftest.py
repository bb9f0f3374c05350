from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.daemon_proc import DaemonProcess, StartDaemon
from tests.servers import RedisServer


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call":
        item.stash[_failed_key] = report.failed
    return report


_failed_key = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
async def daemon_cleanup(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Kill daemons a test left running; print their last log lines when it failed."""
    DaemonProcess.started.clear()
    yield
    failed = request.node.stash.get(_failed_key, False)
    for daemon in DaemonProcess.started:
        if failed:
            print(f"--- last log lines of daemon pid {daemon.pid} ---\n{daemon.tail(40)}")
        await daemon.kill()
    DaemonProcess.started.clear()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for one test, which the test may restart or stop."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def start_daemon() -> StartDaemon:
    """Start daemons as subprocesses; daemon_cleanup kills any a test leaves running."""

    async def start(env: dict[str, str], args: list[str] | None = None) -> DaemonProcess:
        return await DaemonProcess(env, args).start()

    return start
