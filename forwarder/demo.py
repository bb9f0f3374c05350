"""`jirafe-forwarder demo`: the whole pipeline on throwaway local servers.

Starts a redis-server on a free loopback port and the sandbox API in this process,
pushes realistic events of every type for several sites (and a few broken entries),
runs the daemon until the queue is drained, and prints what each site received and
what was dead-lettered and why.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from forwarder.config import load_config
from forwarder.daemon import Daemon
from forwarder.envelope import EVENT_TYPES
from forwarder.localredis import RedisServer
from forwarder.sandbox import Sandbox
from forwarder.sandbox.samples import sample_event, sample_order

# A throwaway token, known only to the demo's own sandbox.
DEMO_TOKEN = "demo-token"

# Entries a buggy producer might push, each with the reason it is dead-lettered for.
BROKEN_ENTRIES: list[tuple[bytes, str]] = [
    (b"{not json", "invalid_json"),
    (b'["an", "array"]', "not_an_object"),
    (b'{"site_id": "1001", "type": "basket", "data": {}}', "unknown_type"),
    (b'{"type": "cart", "data": {}}', "missing_field"),
    (b'{"site_id": "1001", "type": "cart", "data": {"name": "\xff\xfe"}}', "invalid_utf8"),
]


def demo_events(count: int, sites: list[str], seed: int = 7) -> list[bytes]:
    """Return `count` envelopes of every type spread over `sites`, plus two the API rejects."""
    rng = random.Random(seed)
    weights = {"cart": 30, "product": 15, "order": 15, "customer": 10, "pageview": 10, "category": 5,
               "employee": 2, "product.cost": 5, "product.inventory": 5, "visit": 3}
    types = list(weights)
    entries = []
    for number in range(count):
        site = sites[number % len(sites)]
        event_type = rng.choices(types, [weights[t] for t in types])[0]
        data = sample_event(event_type, number)
        if event_type in ("pageview", "visit"):
            data["site"] = site
        entries.append(orjson.dumps({"site_id": site, "type": event_type, "data": data, "id": f"demo-{number}"}))
    # Valid envelopes whose data the API rejects: a misspelt order status and a cart
    # without its totals. They are dead-lettered with the API's validation error.
    bad_order = sample_order("cancelled", 1)
    bad_order["status"] = "canceled"
    entries.append(orjson.dumps({"site_id": sites[0], "type": "order", "data": bad_order, "id": "demo-bad-1"}))
    bad_cart = sample_event("cart", 2)
    del bad_cart["total"]
    entries.append(orjson.dumps({"site_id": sites[-1], "type": "cart", "data": bad_cart, "id": "demo-bad-2"}))
    return entries


async def drained(client: aioredis.Redis, prefix: str) -> bool:
    async with client.pipeline(transaction=False) as pipe:
        pipe.llen(f"{prefix}:events")
        pipe.llen(f"{prefix}:intake:claimed")
        pipe.zcard(f"{prefix}:lanes:due")
        pipe.exists(f"{prefix}:lanes:bytes")
        events, claimed, due, lane_bytes = await pipe.execute()
    return events == 0 and claimed == 0 and due == 0 and lane_bytes == 0


async def run_demo(event_count: int, site_count: int, out: Any = None) -> int:
    out = out or sys.stdout
    if event_count < 0 or site_count < 1:
        print("demo: --events must be >= 0 and --sites >= 1", file=sys.stderr)
        return 2
    sites = [str(1001 + index) for index in range(site_count)]
    with tempfile.TemporaryDirectory(prefix="jirafe-demo-") as workdir:
        redis_server = RedisServer(Path(workdir) / "redis", durable=False)
        try:
            redis_server.start()
        except RuntimeError as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 2
        try:
            async with Sandbox(tokens={DEMO_TOKEN: set(sites)}) as sandbox:
                return await _run(redis_server, sandbox, sites, event_count, out)
        finally:
            redis_server.stop()


async def _run(redis_server: RedisServer, sandbox: Sandbox, sites: list[str], count: int, out: Any) -> int:
    config = load_config(None, {
        "JIRAFE_FORWARDER_REDIS_URL": redis_server.url,
        "JIRAFE_FORWARDER_API_BASE_URL": sandbox.base_url,
        "JIRAFE_FORWARDER_API_TOKEN": DEMO_TOKEN,
        "JIRAFE_FORWARDER_BATCH_LINGER_MS": "100",
        "JIRAFE_FORWARDER_METRICS_LISTEN": "",
        "JIRAFE_FORWARDER_LOG_LEVEL": "error",
    })
    prefix = config.redis.key_prefix
    client = aioredis.Redis.from_url(redis_server.url)
    entries = demo_events(count, sites)
    # A broken entry every few hundred events, so they arrive among good ones.
    for position, (raw, _) in enumerate(BROKEN_ENTRIES):
        entries.insert(min(len(entries), (position + 1) * max(1, len(entries) // (len(BROKEN_ENTRIES) + 1))), raw)
    print(f"redis-server on {redis_server.url}, sandbox API on {sandbox.base_url}", file=out)
    print(f"pushing {len(entries)} entries for sites {', '.join(sites)} onto {prefix}:events ...", file=out)
    for offset in range(0, len(entries), 1000):
        await client.lpush(f"{prefix}:events", *entries[offset : offset + 1000])

    daemon = Daemon(config)
    started = time.monotonic()
    task = asyncio.create_task(daemon.run())
    try:
        deadline = started + 120
        while not await drained(client, prefix):
            if task.done() or time.monotonic() > deadline:
                print("demo: the daemon did not drain the queue; see the log above", file=sys.stderr)
                return 1
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
    finally:
        daemon.stop()
        exit_code = await task
    dead = await _dead_by_reason(client, prefix)
    await client.aclose()
    _print_report(out, sandbox, sites, dead, elapsed, exit_code)
    return 0 if exit_code == 0 else 1


async def _dead_by_reason(client: aioredis.Redis, prefix: str) -> list[dict[str, Any]]:
    records = []
    for member in await client.zrange(f"{prefix}:dead:index", 0, -1):
        meta = await client.hget(f"{prefix}:dead:{member.decode()}", "meta")
        records.append(orjson.loads(meta))
    return records


def _print_report(out: Any, sandbox: Sandbox, sites: list[str], dead: list[dict[str, Any]],
                  elapsed: float, exit_code: int) -> None:
    state = sandbox.state
    print(f"\ndrained in {elapsed:.2f} s; daemon exited with {exit_code}\n", file=out)
    header = "site    " + "".join(f"{name:>18}" for name in EVENT_TYPES) + f"{'total':>8}"
    print("delivered (accepted by the sandbox API):", file=out)
    print(header, file=out)
    for site in sites:
        counts = [state.accepted_count(site, name) for name in EVENT_TYPES]
        print(f"{site:<8}" + "".join(f"{n:>18}" for n in counts) + f"{sum(counts):>8}", file=out)
    print(f"total delivered: {state.accepted_count()}, duplicates: {state.duplicate_count()}\n", file=out)
    print(f"dead-lettered: {len(dead)}", file=out)
    for record in dead:
        detail = record.get("detail") or (record.get("response") or "")
        detail = " ".join(str(detail).split())[:90]
        print(f"  {record['reason']:<16} site={record.get('site_id')} type={record.get('type')} "
              f"status={record.get('status')}  {detail}", file=out)
    command = cli_command()
    print(
        "\nThe demo's redis-server and sandbox stop when it exits, and their data is deleted,\n"
        "so these dead letters cannot be inspected afterwards. To run the forwarder on your\n"
        "own Redis, copy config/forwarder.toml, set redis.url, api.base_url and the token\n"
        "(README.md, Install), then:\n"
        f"  {command} check-config --config forwarder.toml\n"
        f"  {command} run --config forwarder.toml\n"
        f"  {command} dead list --config forwarder.toml",
        file=out,
    )


def cli_command() -> str:
    """Return a command line that runs this CLI again from any directory.

    `scripts/demo` runs .venv/bin/jirafe-forwarder, so the hint shows that script's
    absolute path, because a bare `jirafe-forwarder` is not on PATH there.
    """
    script = os.path.abspath(sys.argv[0])
    if os.path.basename(script) == "jirafe-forwarder" and os.access(script, os.X_OK):
        return script
    return f"{sys.executable} -m forwarder.cli"
