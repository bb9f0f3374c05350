"""Segment's batching client library fed from the Redis list.

    python -m bench.peers.segment_feed --redis URL --host http://127.0.0.1:PORT --write-key K \
        --events N [--upload-size 100] [--upload-interval 0.5] [--threads 1] [--queue 10000]

A loop pops envelopes with RPOP and hands each to `Client.track()` of
segment-analytics-python (user id: the site, event name: the type, properties: the
data), whose consumer threads batch them and POST to `{host}/v1/batch`. The host is
set when the client is built, before it can send anything. When the library's queue
is nearly full the loop waits instead of letting `track()` drop events.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import orjson
import redis
from segment.analytics import Client

from bench.peers import READY_KEY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.segment_feed",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--redis", required=True)
    parser.add_argument("--key", default="jirafe:events")
    parser.add_argument("--host", required=True, help="base URL of the Segment-style route, loopback only")
    parser.add_argument("--write-key", required=True)
    parser.add_argument("--events", type=int, required=True, help="exit after this many events")
    parser.add_argument("--chunk", type=int, default=500, help="entries per RPOP")
    parser.add_argument("--upload-size", type=int, default=100, help="events per request")
    parser.add_argument("--upload-interval", type=float, default=0.5, help="seconds a partial batch waits")
    parser.add_argument("--threads", type=int, default=1, help="consumer threads")
    parser.add_argument("--queue", type=int, default=10_000, help="max_queue_size of the client")
    parser.add_argument("--max-seconds", type=float, default=600, help="time limit")
    parser.add_argument("--linger-seconds", type=float, default=30,
                        help="time to wait for SIGTERM after the last event")
    args = parser.parse_args(argv)
    if not args.host.startswith(("http://127.", "http://localhost")):
        parser.error(f"invalid --host {args.host!r}: the benchmark sends only to a loopback sink")

    signal.signal(signal.SIGTERM, _exit_on_signal)
    errors: list[str] = []
    client = Client(
        args.write_key,
        host=args.host,
        upload_size=args.upload_size,
        upload_interval=args.upload_interval,
        thread=args.threads,
        max_queue_size=args.queue,
        gzip=False,
        on_error=lambda error, batch: errors.append(str(error)),
    )
    store = redis.Redis.from_url(args.redis)
    store.set(READY_KEY, "segment")
    high_water = int(args.queue * 0.9)
    deadline = time.monotonic() + args.max_seconds
    popped = 0
    dropped = 0
    while popped < args.events and time.monotonic() < deadline:
        entries = store.rpop(args.key, min(args.chunk, args.events - popped))
        if not entries:
            time.sleep(0.002)
            continue
        popped += len(entries)
        for raw in entries:
            while client.queue.qsize() >= high_water and time.monotonic() < deadline:
                time.sleep(0.0005)
            envelope = orjson.loads(raw)
            accepted, _ = client.track(user_id=str(envelope["site_id"]), event=envelope["type"],
                                       properties=envelope["data"])
            if not accepted:
                dropped += 1
    client.flush()
    client.join()
    print(orjson.dumps({"popped": popped, "dropped": dropped, "errors": errors[:5]}).decode(), flush=True)
    # Stay alive until SIGTERM or the linger time, so the harness can read this
    # process's counters. SIGTERM ends the sleep through the handler's SystemExit.
    time.sleep(args.linger_seconds)
    return 0 if not dropped and not errors else 1


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
