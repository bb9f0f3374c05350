"""The lower bound: the least work that drains the list into batch requests, with no safety.

    python -m bench.peers.floor --redis URL --api URL --token T --events N [--chunk 10000]

It pops many entries at once with RPOP (so a crash loses them), parses each envelope
with orjson, groups the `data` objects per site and type, and POSTs one batch body per
site with aiohttp, `--concurrency` requests at a time. No retries, no ordering across
requests, no dead letters: it shows how fast this machine can move the events at all.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

import aiohttp
import orjson
import redis.asyncio as aioredis

from bench.peers import READY_KEY


async def drain(args: argparse.Namespace) -> int:
    client = aioredis.Redis.from_url(args.redis)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    headers = {"Authorization": f"Bearer {args.token}", "Content-Type": "application/json"}
    slots = asyncio.Semaphore(args.concurrency)
    delivered = 0
    failed = 0
    tasks: set[asyncio.Task[None]] = set()
    deadline = time.monotonic() + args.max_seconds

    async def post(session: aiohttp.ClientSession, site: str, body: bytes, count: int) -> None:
        nonlocal delivered, failed
        try:
            async with session.post(f"{args.api}/{site}/batch", data=body, headers=headers) as response:
                await response.read()
                if response.status == 200:
                    delivered += count
                else:
                    failed += count
        finally:
            slots.release()

    async with aiohttp.ClientSession(connector=connector) as session:
        await client.set(READY_KEY, "floor")
        popped = 0
        while popped < args.events and time.monotonic() < deadline:
            entries = await client.rpop(args.key, min(args.chunk, args.events - popped))
            if not entries:
                await asyncio.sleep(0.002)
                continue
            popped += len(entries)
            groups: dict[str, dict[str, list[object]]] = {}
            for raw in entries:
                envelope = orjson.loads(raw)
                site = groups.setdefault(str(envelope["site_id"]), {})
                site.setdefault(envelope["type"], []).append(envelope["data"])
            for site_id, body in groups.items():
                await slots.acquire()
                task = asyncio.create_task(
                    post(session, site_id, orjson.dumps(body), sum(len(v) for v in body.values()))
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))
    await client.aclose()
    print(orjson.dumps({"popped": popped, "delivered": delivered, "failed": failed}).decode(), flush=True)
    await _linger(args.linger_seconds)
    return 0 if delivered == popped else 1


async def _linger(seconds: float) -> None:
    """Stay alive until SIGTERM or `seconds`, so the harness can read this process's counters."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--redis", required=True)
    parser.add_argument("--key", default="jirafe:events")
    parser.add_argument("--api", required=True, help="Event API base URL, such as http://127.0.0.1:PORT/v2")
    parser.add_argument("--token", required=True)
    parser.add_argument("--events", type=int, required=True, help="exit after this many events")
    parser.add_argument("--chunk", type=int, default=10_000, help="entries per RPOP")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--max-seconds", type=float, default=600, help="time limit")
    parser.add_argument("--linger-seconds", type=float, default=30,
                        help="time to wait for SIGTERM after the last event")
    args = parser.parse_args(argv)
    if not args.api.startswith(("http://127.", "http://localhost")):
        parser.error(f"invalid --api {args.api!r}: the benchmark sends only to a loopback sink")
    try:
        import uvloop
    except ImportError:
        return asyncio.run(drain(args))
    return uvloop.run(drain(args))


if __name__ == "__main__":
    sys.exit(main())
