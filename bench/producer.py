"""A steady producer: LPUSH envelopes at a fixed rate, stamping each with its push time.

    python -m bench.producer --redis URL --rate 100 --seconds 60 --sites 50 [--template cart]

Every 5 ms it pushes the events that are due, with `bench_ts` set to time.time() just
before the LPUSH, and adds their number to the `bench:pushed` counter in the same
pipeline. It stops after `--seconds` and prints one JSON line with what it pushed.
"""

from __future__ import annotations

import argparse
import sys
import time

import orjson
import redis

from bench.events import cart_template, envelopes, mix_templates, site_ids

TICK_S = 0.005
PUSHED_KEY = "bench:pushed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.producer", description=__doc__.splitlines()[0])
    parser.add_argument("--redis", required=True, help="Redis URL")
    parser.add_argument("--key", default="jirafe:events", help="list to push onto")
    parser.add_argument("--rate", type=float, required=True, help="events per second")
    parser.add_argument("--seconds", type=float, required=True, help="how long to produce")
    parser.add_argument("--sites", type=int, default=50, help="number of sites, round robin")
    parser.add_argument("--template", choices=("cart", "mix"), default="cart")
    args = parser.parse_args(argv)

    templates = [(1, cart_template())] if args.template == "cart" else mix_templates()
    total = int(args.rate * args.seconds)
    # Envelopes carry `"bench_ts":0.0`, which _stamp replaces with the push time.
    source = envelopes(total, site_ids(args.sites), templates)
    client = redis.Redis.from_url(args.redis)
    started = time.monotonic()
    deadline = started + args.seconds
    pushed = 0
    while pushed < total:
        now = time.monotonic()
        if now >= deadline + 1.0:
            break
        due = min(total, int((now - started) * args.rate) + 1)
        if due > pushed:
            stamp = b"%.6f" % time.time()
            batch = [_stamp(next(source), stamp) for _ in range(due - pushed)]
            pipe = client.pipeline(transaction=False)
            pipe.lpush(args.key, *batch)
            pipe.incrby(PUSHED_KEY, len(batch))
            pipe.execute()
            pushed += len(batch)
        time.sleep(TICK_S)
    print(orjson.dumps({"pushed": pushed, "seconds": round(time.monotonic() - started, 3)}).decode(),
          flush=True)
    return 0


def _stamp(envelope: bytes, stamp: bytes) -> bytes:
    return envelope.replace(b'"bench_ts":0.0', b'"bench_ts":' + stamp, 1)


if __name__ == "__main__":
    sys.exit(main())
