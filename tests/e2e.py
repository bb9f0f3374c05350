"""Shared pieces of the end-to-end tests: realistic events, pushing, and checks."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson
import redis.asyncio as aioredis

from forwarder.blocks import lane_envelopes
from forwarder.envelope import EVENT_TYPES, TRACKER_TYPES
from forwarder.sandbox import Sandbox, sample_event
from tests.daemon_proc import ROOT


def envelope(site: str, event_type: str, seq: int, **extra: Any) -> bytes:
    """A valid envelope whose data carries `seq`, so order can be checked on receipt."""
    data = sample_event(event_type, seq)
    if event_type in TRACKER_TYPES:
        data["site"] = site
    data["seq"] = seq
    data.update(extra)
    return orjson.dumps({"site_id": site, "type": event_type, "data": data, "id": f"{site}-{seq}"})


def mixed_events(sites: list[str], count: int, types: Iterable[str] = EVENT_TYPES) -> list[bytes]:
    """`count` envelopes cycling through sites and types, seq increasing per site."""
    types = list(types)
    return [
        envelope(sites[n % len(sites)], types[(n // len(sites)) % len(types)], n)
        for n in range(count)
    ]


def expected_order(entries: list[bytes]) -> dict[tuple[str, str], list[int]]:
    """The seq values per (site, type) in push order, for the valid entries."""
    order: dict[tuple[str, str], list[int]] = {}
    for raw in entries:
        try:
            parsed = orjson.loads(raw)
            key = (parsed["site_id"], parsed["type"])
            seq = parsed["data"]["seq"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
        order.setdefault(key, []).append(seq)
    return order


def received_order(sandbox: Sandbox) -> dict[tuple[str, str], list[int]]:
    order: dict[tuple[str, str], list[int]] = {}
    for site, events in sandbox.state.received.items():
        for event in events:
            order.setdefault((site, event.type), []).append(event.data.get("seq"))
    return order


async def push(client: aioredis.Redis, entries: list[bytes], key: str = "jirafe:events") -> None:
    """LPUSH in order, so the first entry is consumed first."""
    for offset in range(0, len(entries), 1000):
        await client.lpush(key, *entries[offset : offset + 1000])


def _resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


async def push_with_redis_cli(port: int, entries: list[bytes], key: bytes = b"jirafe:events") -> None:
    """Push entries with `redis-cli --pipe`, an outside client as a shop would use."""
    binary = shutil.which("redis-cli")
    assert binary is not None, "redis-cli is missing: install Debian's redis-tools"
    payload = b"".join(_resp(b"LPUSH", key, raw) for raw in entries)
    process = await asyncio.create_subprocess_exec(
        binary, "-p", str(port), "--pipe", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await process.communicate(payload)
    assert process.returncode == 0, stderr.decode()
    assert b"errors: 0" in stdout, stdout.decode()


async def run_cli(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None,
                  timeout: float = 60) -> tuple[int, bytes, bytes]:
    full_env = dict(env or os.environ)
    full_env["PYTHONPATH"] = ROOT
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "forwarder.cli", *args, env=full_env, cwd=ROOT,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin), timeout)
    return process.returncode or 0, stdout, stderr


async def dead_export(env: dict[str, str]) -> list[dict[str, Any]]:
    code, stdout, stderr = await run_cli("dead", "export", env=env)
    assert code == 0, stderr.decode()
    return [orjson.loads(line) for line in stdout.splitlines() if line]


async def wait_drained(client: aioredis.Redis, timeout: float = 60, prefix: str = "jirafe") -> None:
    """Wait until the queue, the claimed list and every lane are empty."""
    from forwarder.demo import drained

    async def check() -> None:
        # Redis offers no event for "these keys are empty", so poll it.
        while not await drained(client, prefix):  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    await asyncio.wait_for(check(), timeout)


async def lane_events(client: aioredis.Redis, lane: str, prefix: str = "jirafe") -> list[bytes]:
    """Return the envelopes queued in a lane, in lane order, read from its blocks."""
    elements = await client.lrange(f"{prefix}:lane:{lane}", 0, -1)
    return [envelope for _, envelope in lane_envelopes(elements)]


async def lane_length(client: aioredis.Redis, lane: str, prefix: str = "jirafe") -> int:
    return len(await lane_events(client, lane, prefix))


async def wait_redis(read: Callable[[], Awaitable[Any]], expected: Any, timeout: float = 30) -> None:
    """Poll a Redis read until it returns `expected` (Redis offers no event to await here)."""

    async def check() -> None:
        while await read() != expected:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    await asyncio.wait_for(check(), timeout)
