"""Micro-benchmarks behind the hot-path choices in docs/benchmarks.md.

Each line prints a cost per event of 1.2 KB carts, from wall time of a tight loop on
this machine (a single process, so it is close to its CPU time when the machine is
otherwise idle). The Redis lines start a throwaway redis-server and read its CPU time.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import orjson
import psutil
import redis

from bench.events import cart_template
from forwarder.blocks import BlockBuilder, decode_block, take_prefix
from forwarder.envelope import decode_envelope, find_data
from forwarder.localredis import RedisServer

CHUNK = 5000
SITES = 50


def _envelopes() -> list[bytes]:
    template = cart_template()
    return [template.render(str(1001 + index % SITES).encode(), index) for index in range(CHUNK)]


def _per_event(label: str, work: Callable[[], Any], events: int, rounds: int = 20) -> None:
    started = time.perf_counter()
    for _ in range(rounds):
        work()
    elapsed = time.perf_counter() - started
    print(f"{label:<52} {elapsed / rounds / events * 1e6:7.3f} us/event")


def python_side() -> None:
    items = _envelopes()
    print(f"{CHUNK} carts of {len(items[0])} bytes over {SITES} sites")
    envelopes = [decode_envelope(raw) for raw in items]
    datas = [envelope.data for envelope in envelopes]
    offsets = [find_data(raw, data) for raw, data in zip(items, datas, strict=True)]
    array_decoder = msgspec.json.Decoder(list[type(envelopes[0])])  # type: ignore[misc]

    _per_event("bytes.isascii", lambda: [raw.isascii() for raw in items], CHUNK)
    _per_event("msgspec decode, data kept raw, one call per entry", lambda: [decode_envelope(raw) for raw in items],
               CHUNK)
    _per_event("msgspec decode of the chunk as one JSON array",
               lambda: array_decoder.decode(b"[" + b",".join(items) + b"]"), CHUNK)
    _per_event("orjson.loads of each envelope", lambda: [orjson.loads(raw) for raw in items], CHUNK)
    _per_event("find_data", lambda: [find_data(raw, data) for raw, data in zip(items, datas, strict=True)], CHUNK)

    def build() -> list[bytes]:
        builder = BlockBuilder()
        for raw, data, offset in zip(items, datas, offsets, strict=True):
            builder.add(0, raw, data, offset)
        return builder.finish()

    _per_event("BlockBuilder, one lane, blocks of 256 events", build, CHUNK)
    blocks = [decode_block(element) for element in build()]
    _per_event("take_prefix and body, 1,000 events of whole blocks",
               lambda: take_prefix(blocks, 1000, 10_000_000).body(tracker=False), 1000)


def redis_side() -> None:
    server = RedisServer(Path(tempfile.mkdtemp(prefix="bench-micro-")), durable=False)
    server.start()
    try:
        client = redis.Redis(port=server.port)
        process = psutil.Process(int(client.info()["process_id"]))
        event = b"x" * 1200
        events = 200_000
        push = client.register_script("for i = 1, #ARGV do redis.call('RPUSH', 'lane' .. (i % 50), ARGV[i]) end")
        for per_block in (1, 8, 32, 128):
            block = event * per_block
            per_call = max(1, 500 // per_block)
            calls = events // (per_call * per_block)
            before = sum(process.cpu_times()[:2])
            for _ in range(calls):
                push(args=[block] * per_call)
            scripted = sum(process.cpu_times()[:2]) - before
            client.flushall()
            before = sum(process.cpu_times()[:2])
            for _ in range(calls):
                pipe = client.pipeline(transaction=False)
                for index in range(per_call):
                    pipe.rpush(f"lane{index % 50}", block)
                pipe.execute()
            plain = sum(process.cpu_times()[:2]) - before
            client.flushall()
            print(f"Redis CPU, {per_block:>3} events of 1.2 KB per element: script {scripted / events * 1e6:5.2f}"
                  f" us/event, plain RPUSH {plain / events * 1e6:5.2f} us/event")
        client.close()
    finally:
        server.stop()


def command_micro(_args: Any) -> int:
    python_side()
    redis_side()
    return 0
