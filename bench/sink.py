"""The benchmark sink: the product's sandbox in counting mode plus a Segment-style route.

Run as its own process, so that its CPU time is not mixed with the process under test:

    python -m bench.sink --port 0 --token TOKEN --write-key KEY [--latency]

It prints `sink listening on URL` once the port is bound and serves until SIGTERM:
- the sandbox's Event API (`/v2/...`) with `validate=False` and `record="count"`, and
  its control routes (`/_sandbox/stats`, `/_sandbox/faults`, `/_sandbox/reset`);
- `POST /v1/batch`, the route of Segment's HTTP tracking API: a JSON body
  `{"batch": [...]}` with the write key as the basic-auth user name;
- `GET /_bench/stats`: accepted events, requests and body bytes per route, the time
  of the first and last accepted event and events accepted per second;
- `GET /_bench/latency`: with `--latency`, for each site the receipt time minus the
  `bench_ts` push time of every accepted event, in milliseconds.

NOTE: sandbox faults (such as the outage of scenario 5) apply to the `/v2/...` routes
only; `/v1/batch` always accepts.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import msgspec
import orjson
from aiohttp import web

from forwarder.logs import configure_logging
from forwarder.sandbox import Sandbox, SandboxState

_TS_KEY = b'"bench_ts":'
class _SegmentBatch(msgspec.Struct):
    batch: list[msgspec.Raw]


# Each message stays undecoded JSON: the sink counts messages and reads `bench_ts` only.
_SEGMENT_BATCH_DECODER = msgspec.json.Decoder(_SegmentBatch)


def _push_time(event: Any) -> float | None:
    """Return the `bench_ts` of an accepted event (undecoded JSON or a decoded object)."""
    if isinstance(event, dict):
        value = event.get("bench_ts")
        return float(value) if isinstance(value, int | float) and value else None
    raw = bytes(event)
    start = raw.find(_TS_KEY)
    if start < 0:
        return None
    start += len(_TS_KEY)
    end = start
    while end < len(raw) and raw[end] in b"0123456789.eE+-":
        end += 1
    try:
        value = float(raw[start:end])
    except ValueError:
        return None
    return value or None


class BenchState(SandboxState):
    """SandboxState that also keeps per-second counts, byte totals and push-to-receipt latency."""

    def __init__(self, latency: bool, **kwargs: Any) -> None:
        self.latency = latency
        super().__init__(**kwargs)

    def clear(self) -> None:
        super().clear()
        self.first_accept: float | None = None
        self.last_accept: float | None = None
        self.per_second: Counter[int] = Counter()
        self.body_bytes = 0
        self.segment_requests = 0
        self.segment_events = 0
        self.segment_bytes = 0
        self.latencies_ms: dict[str, list[float]] = {}
        self.site_first_accept: dict[str, float] = {}

    def record_accepted(self, site: str, event_type: str, events: Sequence[Any]) -> None:
        super().record_accepted(site, event_type, events)
        if not events:
            return
        now = time.time()
        if self.first_accept is None:
            self.first_accept = now
        self.last_accept = now
        self.per_second[int(now)] += len(events)
        if site not in self.site_first_accept:
            self.site_first_accept[site] = now
        if self.latency:
            bucket = self.latencies_ms.setdefault(site, [])
            for event in events:
                pushed = _push_time(event)
                if pushed is not None:
                    bucket.append(round((now - pushed) * 1000, 3))

    def record_request(self, record: Any) -> None:
        super().record_request(record)
        self.body_bytes += record.body_bytes

    def bench_stats(self) -> dict[str, Any]:
        return {
            "accepted": self.total_accepted,
            "requests": self.total_requests,
            "body_bytes": self.body_bytes,
            "requests_by_status": {str(key): value for key, value in self.requests_by_status.items()},
            "segment": {
                "requests": self.segment_requests,
                "events": self.segment_events,
                "body_bytes": self.segment_bytes,
            },
            "first_accept": self.first_accept,
            "last_accept": self.last_accept,
            "per_second": sorted(self.per_second.items()),
            "sites": len(self.site_first_accept),
            "site_first_accept": self.site_first_accept,
        }


class SegmentRoute:
    """`POST /v1/batch` of Segment's tracking API, counting what arrives."""

    def __init__(self, state: BenchState, write_key: str) -> None:
        self.state = state
        expected = base64.b64encode(f"{write_key}:".encode()).decode()
        self._authorization = f"Basic {expected}"

    async def batch(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != self._authorization:
            return web.json_response({"success": False, "message": "invalid write key"}, status=401)
        body = await request.read()
        self.state.segment_bytes += len(body)
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        try:
            messages = _SEGMENT_BATCH_DECODER.decode(body).batch
        except msgspec.DecodeError as exc:
            return web.json_response({"success": False, "message": f"invalid JSON: {exc}"}, status=400)
        self.state.segment_requests += 1
        self.state.segment_events += len(messages)
        # Segment's userId carries the site id; the sandbox counters get one "segment" site.
        self.state.record_accepted("segment", "track", messages)
        return web.json_response({"success": True})


async def _serve(args: argparse.Namespace) -> int:
    sandbox = Sandbox(
        tokens={args.token: {"*"}},
        port=args.port,
        validate=False,
        record="count",
        request_log_limit=1000,
    )
    state = BenchState(args.latency, record="count", request_log_limit=1000)
    # The sandbox hands its state to the handlers when it starts, so replacing it
    # before start() makes every route record into BenchState.
    sandbox.state = state
    segment = SegmentRoute(state, args.write_key)
    make_app = sandbox.make_app

    async def stats(request: web.Request) -> web.Response:
        return _json(state.bench_stats())

    async def latency(request: web.Request) -> web.Response:
        return _json(state.latencies_ms)

    def make_bench_app() -> web.Application:
        app = make_app()
        app.router.add_post("/v1/batch", segment.batch)
        app.router.add_get("/_bench/stats", stats)
        app.router.add_get("/_bench/latency", latency)
        return app

    sandbox.make_app = make_bench_app  # type: ignore[method-assign]
    await sandbox.start()
    print(f"sink listening on {sandbox.url}", flush=True)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    try:
        await stop
    finally:
        await sandbox.stop()
    return 0


def _json(value: Any) -> web.Response:
    return web.Response(body=orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS),
                        content_type="application/json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sink", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1, 0 for a free one")
    parser.add_argument("--token", required=True, help="bearer token accepted for every site")
    parser.add_argument("--write-key", required=True, help="Segment write key accepted on /v1/batch")
    parser.add_argument("--latency", action="store_true",
                        help="record receipt time minus the bench_ts push time of each event")
    args = parser.parse_args(argv)
    configure_logging("warning", "json")
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_serve(args))
    return uvloop.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
