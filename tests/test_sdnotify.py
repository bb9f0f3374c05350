"""sd_notify from the real daemon, received on a real Unix datagram socket."""

from __future__ import annotations

import asyncio
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from forwarder.sandbox import Sandbox
from tests.daemon_proc import StartDaemon, daemon_env
from tests.e2e import envelope, push
from tests.servers import RedisServer

MALFORMED = [b"{not json", b"[1]", b'{"site_id":"1001","type":"basket","data":{}}']



class NotifySocket:
    """A bound AF_UNIX datagram socket, as systemd's $NOTIFY_SOCKET, collecting each datagram."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.messages: list[dict[str, str]] = []
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(path)
        self._socket.setblocking(False)
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            datagram = await loop.sock_recv(self._socket, 4096)
            fields = dict(line.split("=", 1) for line in datagram.decode().split("\n") if line)
            async with self._changed:
                self.messages.append(fields)
                self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[dict[str, str]], bool], timeout: float = 20) -> dict[str, str]:
        """Wait for a message matching `predicate(fields)` and return the first one."""

        def found() -> dict[str, str] | None:
            return next((fields for fields in self.messages if predicate(fields)), None)

        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: found() is not None)
        result = found()
        assert result is not None
        return result

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._socket.close()


@pytest.fixture
async def notify_socket() -> AsyncIterator[NotifySocket]:
    # A short directory keeps the path under the 108-byte limit of sun_path.
    with tempfile.TemporaryDirectory(prefix="notify-") as directory:
        listener = NotifySocket(f"{directory}/notify.sock")
        listener.start()
        yield listener
        await listener.close()


async def test_sd_notify_sequence(
    redis_server: RedisServer, redis_client: aioredis.Redis, notify_socket: NotifySocket, start_daemon: StartDaemon
) -> None:
    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        env = daemon_env(redis_server.url, sandbox.base_url, batch_linger_ms=20, dead_letter_max_entries=3)
        env["NOTIFY_SOCKET"] = notify_socket.path
        # A 2 s watchdog: the daemon pings and reports every second.
        env["WATCHDOG_USEC"] = "2000000"
        env.pop("WATCHDOG_PID", None)
        daemon = await start_daemon(env)

        first = await notify_socket.wait_for(lambda _: True)
        assert first["READY"] == "1"
        assert first["MAINPID"] == str(daemon.pid)

        await push(redis_client, [envelope("1001", "cart", n) for n in range(10)])
        await sandbox.wait_for(lambda state: state.total_accepted >= 10, timeout=20)
        # Three malformed entries fill the store of three dead letters, so the intake
        # stops and the next five events stay in the producer list.
        await push(redis_client, MALFORMED)
        await daemon.wait_for_log("dead-letter store is full: intake stopped until dead letters are replayed or purged")
        await push(redis_client, [envelope("1001", "cart", n) for n in range(10, 15)])

        status = await notify_socket.wait_for(
            lambda fields: "backlog 5," in fields.get("STATUS", "") and "dead letters 3" in fields["STATUS"]
        )
        assert await redis_client.llen("jirafe:events") == 5
        assert await redis_client.zcard("jirafe:dead:index") == 3
        assert status["STATUS"].endswith("dead letters 3 (FULL)")
        assert "sites paused 0" in status["STATUS"]
        assert sandbox.state.total_accepted == 10

        daemon.signal(signal.SIGTERM)
        await notify_socket.wait_for(lambda fields: fields.get("STOPPING") == "1")
        assert await daemon.wait() == 0

    messages = notify_socket.messages
    assert [index for index, fields in enumerate(messages) if "READY" in fields] == [0]
    watchdog = [index for index, fields in enumerate(messages) if fields.get("WATCHDOG") == "1"]
    status_indexes = [index for index, fields in enumerate(messages) if "STATUS" in fields]
    stopping = [index for index, fields in enumerate(messages) if fields.get("STOPPING") == "1"]
    assert len(watchdog) >= 2
    assert len(stopping) == 1
    assert messages.index(status) in status_indexes
    # The last status loop runs before the stop, so no ping or report follows STOPPING=1.
    assert max(watchdog) < stopping[0]
    assert stopping[0] == len(messages) - 1
    assert messages[stopping[0]]["STATUS"].startswith("stopping")

