"""A per-event worker on arq, a general Redis job queue, with one POST per event.

Runs in its own virtualenv (arq 0.28 needs redis-py < 6, the product needs 8):

    VENV/bin/python -m bench.peers.arq_peer enqueue --redis URL --queue Q --events N
    VENV/bin/python -m bench.peers.arq_peer worker --redis URL --api URL --token T \
        --events N [--max-jobs 10] [--poll-delay 0.5]

`enqueue` turns the benchmark's envelopes into jobs with arq's own `enqueue_job()`,
one job per event with the site, the type and the `data` bytes as arguments. `worker`
runs an arq Worker whose job POSTs that data to `/v2/{site}/{type}` with aiohttp.
Results are not kept (keep_result=0), which is the cheapest setting arq offers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import orjson

from bench.events import cart_template, envelopes, mix_templates, site_ids
from bench.peers import READY_KEY


def _redis_settings(url: str) -> Any:
    from arq.connections import RedisSettings

    parts = urlsplit(url)
    return RedisSettings(host=parts.hostname or "127.0.0.1", port=parts.port or 6379)


async def enqueue(args: argparse.Namespace) -> int:
    from arq import create_pool

    pool = await create_pool(_redis_settings(args.redis))
    templates = [(1, cart_template())] if args.template == "cart" else mix_templates()
    source = envelopes(args.events, site_ids(args.sites), templates)
    started = time.monotonic()
    pending: list[Any] = []
    enqueued = 0
    for raw in source:
        envelope = orjson.loads(raw)
        pending.append(pool.enqueue_job(
            "forward", str(envelope["site_id"]), envelope["type"], orjson.dumps(envelope["data"]),
            _queue_name=args.queue,
        ))
        if len(pending) >= 200:
            enqueued += sum(1 for job in await asyncio.gather(*pending) if job is not None)
            pending = []
    if pending:
        enqueued += sum(1 for job in await asyncio.gather(*pending) if job is not None)
    await pool.aclose()
    print(orjson.dumps({"enqueued": enqueued, "seconds": round(time.monotonic() - started, 3)}).decode(),
          flush=True)
    return 0 if enqueued == args.events else 1


def run_worker(args: argparse.Namespace) -> int:
    import aiohttp
    from arq.worker import Worker, func

    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    done = {"ok": 0, "failed": 0}
    finished = asyncio.Event()
    headers = {"Authorization": f"Bearer {args.token}", "Content-Type": "application/json"}

    async def forward(ctx: dict[str, Any], site: str, event_type: str, data: bytes) -> None:
        async with ctx["session"].post(f"{args.api}/{site}/{event_type}", data=data, headers=headers) as response:
            await response.read()
            if response.status != 200:
                done["failed"] += 1
                raise RuntimeError(f"HTTP {response.status}")
        done["ok"] += 1
        if done["ok"] >= args.events:
            finished.set()

    async def watch() -> None:
        # Bounded: after the event count or the time limit, wait up to the linger time
        # for the harness's SIGTERM (it reads this process's counters first), then stop.
        try:
            await asyncio.wait_for(finished.wait(), args.max_seconds)
        except TimeoutError:
            pass
        await asyncio.sleep(args.linger_seconds)
        os.kill(os.getpid(), signal.SIGTERM)

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.max_jobs))
        ctx["watch"] = asyncio.create_task(watch())
        await ctx["redis"].set(READY_KEY, "arq")

    async def shutdown(ctx: dict[str, Any]) -> None:
        await ctx["session"].close()

    worker = Worker(
        functions=[func(forward, name="forward")],
        redis_settings=_redis_settings(args.redis),
        queue_name=args.queue,
        max_jobs=args.max_jobs,
        poll_delay=args.poll_delay,
        keep_result=0,
        max_tries=3,
        job_timeout=30,
        on_startup=startup,
        on_shutdown=shutdown,
        handle_signals=True,
        log_results=False,
    )
    worker.run()
    print(orjson.dumps(done).decode(), flush=True)
    return 0 if done["ok"] >= args.events else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.arq_peer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    producer = commands.add_parser("enqueue", help="enqueue one job per event")
    producer.add_argument("--redis", required=True)
    producer.add_argument("--queue", default="arq:queue")
    producer.add_argument("--events", type=int, required=True)
    producer.add_argument("--sites", type=int, default=50)
    producer.add_argument("--template", choices=("cart", "mix"), default="cart")
    worker = commands.add_parser("worker", help="run the worker until it has delivered --events")
    worker.add_argument("--redis", required=True)
    worker.add_argument("--queue", default="arq:queue")
    worker.add_argument("--api", required=True, help="Event API base URL, loopback only")
    worker.add_argument("--token", required=True)
    worker.add_argument("--events", type=int, required=True)
    worker.add_argument("--max-jobs", type=int, default=10, help="jobs run at once")
    worker.add_argument("--poll-delay", type=float, default=0.5, help="seconds between queue polls")
    worker.add_argument("--uvloop", action="store_true", help="run the worker on uvloop")
    worker.add_argument("--max-seconds", type=float, default=600, help="time limit")
    worker.add_argument("--linger-seconds", type=float, default=30,
                        help="time to wait for SIGTERM after the last event")
    args = parser.parse_args(argv)
    if args.command == "worker" and not args.api.startswith(("http://127.", "http://localhost")):
        parser.error(f"invalid --api {args.api!r}: the benchmark sends only to a loopback sink")
    if args.command == "enqueue":
        return asyncio.run(enqueue(args))
    return run_worker(args)


if __name__ == "__main__":
    sys.exit(main())
