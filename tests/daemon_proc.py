"""The real daemon as a subprocess, with its JSON log lines collected for assertions."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def daemon_env(redis_url: str, base_url: str, token: str | None = "token-default", **settings: Any) -> dict[str, str]:
    """Environment for `jirafe-forwarder run`: settings are `section_key=value` pairs."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("JIRAFE_FORWARDER_")}
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = ROOT
    env["JIRAFE_FORWARDER_REDIS_URL"] = redis_url
    env["JIRAFE_FORWARDER_API_BASE_URL"] = base_url
    if token is not None:
        env["JIRAFE_FORWARDER_API_TOKEN"] = token
    env["JIRAFE_FORWARDER_LOG_FORMAT"] = "json"
    env["JIRAFE_FORWARDER_METRICS_LISTEN"] = ""
    for key, value in settings.items():
        env[f"JIRAFE_FORWARDER_{key.upper()}"] = str(value)
    return env


class DaemonProcess:
    """`jirafe-forwarder run` in a subprocess; log records are parsed as they arrive."""

    # Every daemon started by the current test, so that teardown can kill leftovers
    # and show their logs when the test failed.
    started: list[DaemonProcess] = []

    def __init__(self, env: Mapping[str, str], args: list[str] | None = None) -> None:
        self.env = dict(env)
        self.args = args or []
        self.process: asyncio.subprocess.Process | None = None
        self.records: list[dict[str, Any]] = []
        self.raw_lines: list[bytes] = []
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None

    async def start(self, wait_ready: bool = True, timeout: float = 20) -> DaemonProcess:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "forwarder.cli", "run", *self.args,
            env=self.env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )
        DaemonProcess.started.append(self)
        self._reader = asyncio.create_task(self._read())
        if wait_ready:
            await self.wait_for_log("ready", timeout=timeout)
        return self

    async def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        while True:
            line = await self.process.stderr.readline()
            if not line:
                break
            self.raw_lines.append(line)
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = {"event": "<unparsed>", "line": line.decode("utf-8", "replace")}
            async with self._changed:
                self.records.append(record)
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def logs(self, event: str) -> list[dict[str, Any]]:
        return [record for record in self.records if record.get("event") == event]

    async def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 20) -> None:
        async def check() -> None:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: predicate(self.records) or (self._reader is not None and self._reader.done())
                )
        await asyncio.wait_for(check(), timeout)
        if not predicate(self.records):
            raise AssertionError(f"daemon exited before the expected log; last lines: {self.tail()}")

    async def wait_for_log(self, event: str, timeout: float = 20) -> dict[str, Any]:
        await self.wait_for(lambda records: any(r.get("event") == event for r in records), timeout)
        return self.logs(event)[0]

    def tail(self, count: int = 15) -> str:
        return "".join(line.decode("utf-8", "replace") for line in self.raw_lines[-count:])

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self, timeout: float = 30) -> int:
        assert self.process is not None
        code = await asyncio.wait_for(self.process.wait(), timeout)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, timeout)
        return code

    async def stop(self, timeout: float = 30) -> int:
        if self.process is None or self.process.returncode is not None:
            return self.process.returncode if self.process else 0
        self.signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.wait()


# The `start_daemon` fixture's type: start(env, args=None) returns a started daemon.
StartDaemon = Callable[..., Awaitable[DaemonProcess]]
