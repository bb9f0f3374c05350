"""Dead-letter store: reading, filtering, replaying and purging from the CLI.

Writing happens inside the Lua scripts of `redis_store`, atomically with taking the
event out of the pipeline. This module only reads and moves what is stored.
"""

from __future__ import annotations

import base64
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TextIO

import orjson
import redis
import redis.asyncio as aioredis

from forwarder.redis_store import RedisStore

PAGE = 500

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> float:
    """Parse an age such as `30m`, `12h` or `7d` into seconds."""
    match = _AGE.match(text.strip())
    if match is None:
        raise ValueError(f"invalid age {text!r}: expected a number and a unit s, m, h, d or w, such as 12h")
    return float(match.group(1)) * _AGE_UNITS[match.group(2)]


@dataclass(slots=True)
class DeadFilter:
    site: str | None = None
    type: str | None = None
    reason: str | None = None
    older_than_s: float | None = None
    newer_than_s: float | None = None

    def matches(self, record: dict[str, Any], now_ms: int) -> bool:
        if self.site is not None and record.get("site_id") != self.site:
            return False
        if self.type is not None and record.get("type") != self.type:
            return False
        if self.reason is not None and record.get("reason") != self.reason:
            return False
        age_s = (now_ms - record["dead_at_ms"]) / 1000
        if self.older_than_s is not None and age_s < self.older_than_s:
            return False
        return not (self.newer_than_s is not None and age_s > self.newer_than_s)


def to_record(dead_id: int, dead_at_ms: int, raw: bytes, meta: bytes) -> dict[str, Any]:
    """Build the exported form of one dead letter: metadata plus the producer's bytes."""
    try:
        record = orjson.loads(meta)
    except orjson.JSONDecodeError:
        record = {"reason": "unknown", "meta_unreadable": meta.decode("utf-8", "replace")}
    record = {"dead_id": dead_id, "dead_at_ms": dead_at_ms, **record}
    record.setdefault("site_id", None)
    record.setdefault("type", None)
    record.setdefault("status", None)
    record.setdefault("attempts", 0)
    try:
        record["raw"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        record["raw"] = None
        record["raw_base64"] = base64.b64encode(raw).decode("ascii")
    return record


async def redis_time_ms(client: aioredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def iter_dead(
    store: RedisStore, dead_filter: DeadFilter, with_raw: bool = True
) -> AsyncIterator[dict[str, Any]]:
    """Yield the dead letters matching the filter, oldest first, reading in pages.

    The index orders members of equal score (one millisecond) as strings, so "10"
    would come before "7". Each page is therefore sorted by (time, numeric id), and a
    full page is extended with every member that has its last score, so a group of
    equal scores is never split across two pages. The next page starts after that
    score, which also keeps paging correct while others replay or purge.
    """
    client = store.client
    now_ms = await redis_time_ms(client)
    index = store.keys.dead_index
    low: int | str = "-inf"
    while True:
        page = await client.zrange(index, low, "+inf", byscore=True, offset=0, num=PAGE, withscores=True)
        if not page:
            return
        last_score = page[-1][1]
        if len(page) == PAGE:
            last = int(last_score)
            same_ms = await client.zrange(index, last, last, byscore=True, withscores=True)
            page = [entry for entry in page if entry[1] < last_score] + same_ms
        entries = sorted((int(score), int(member)) for member, score in page)
        low = f"({int(last_score)}"
        async with client.pipeline(transaction=False) as pipe:
            for _, dead_id in entries:
                pipe.hmget(store.keys.dead(dead_id), "raw" if with_raw else "meta", "meta")
            rows = await pipe.execute()
        for (dead_at_ms, dead_id), (raw, meta) in zip(entries, rows, strict=True):
            if meta is None:
                continue  # replayed or purged by someone else meanwhile
            record = to_record(dead_id, dead_at_ms, raw if with_raw else b"", meta)
            if dead_filter.matches(record, now_ms):
                yield record


@dataclass(slots=True)
class Selection:
    """Explicit dead-letter ids sorted into those to act on and those to report."""

    # Ids that exist and match the filter, oldest dead letter first.
    matching: list[int]
    # Ids with no dead letter, in the order given.
    missing: list[int]
    # Ids whose dead letter exists but does not match the filter, in the order given.
    unmatched: list[int]


async def select_ids(store: RedisStore, ids: list[int], dead_filter: DeadFilter) -> Selection:
    """Look up explicit ids and keep those that exist and match the filter.

    Repeated ids count once. The matching ids come oldest first, the order in which
    a replay without ids would push them.
    """
    client = store.client
    now_ms = await redis_time_ms(client)
    unique = list(dict.fromkeys(ids))
    found: list[tuple[int, int]] = []
    missing: list[int] = []
    unmatched: list[int] = []
    for offset in range(0, len(unique), PAGE):
        chunk = unique[offset : offset + PAGE]
        async with client.pipeline(transaction=False) as pipe:
            for dead_id in chunk:
                pipe.hget(store.keys.dead(dead_id), "meta")
                pipe.zscore(store.keys.dead_index, dead_id)
            replies = await pipe.execute()
        for position, dead_id in enumerate(chunk):
            meta, score = replies[2 * position], replies[2 * position + 1]
            if meta is None:
                missing.append(dead_id)
                continue
            record = to_record(dead_id, int(score or 0), b"", meta)
            if dead_filter.matches(record, now_ms):
                found.append((record["dead_at_ms"], dead_id))
            else:
                unmatched.append(dead_id)
    return Selection([dead_id for _, dead_id in sorted(found)], missing, unmatched)


async def show_dead(store: RedisStore, dead_id: int) -> dict[str, Any] | None:
    raw, meta = await store.client.hmget(store.keys.dead(dead_id), "raw", "meta")
    if meta is None:
        return None
    score = await store.client.zscore(store.keys.dead_index, dead_id)
    return to_record(dead_id, int(score or 0), raw, meta)


class MoveInterrupted(Exception):
    """A replay or purge that Redis failed part way; `done` dead letters were moved before."""

    def __init__(self, done: int) -> None:
        super().__init__(f"{done} dead letter(s) moved before the failure")
        self.done = done


async def move_dead(
    store: RedisStore, ids: list[int], operation: Callable[[list[int]], Any],
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Replay or purge dead letters in chunks, and return how many were moved.

    Each chunk is one atomic script call. When a call fails, raise MoveInterrupted
    with the count of the chunks applied before it, chained to the error. The failed
    chunk may have been applied too when only its reply was lost.
    """
    done = 0
    for offset in range(0, len(ids), PAGE):
        try:
            done += await operation(ids[offset : offset + PAGE])
        except (redis.RedisError, OSError) as exc:
            raise MoveInterrupted(done) from exc
        if progress is not None:
            progress(min(offset + PAGE, len(ids)), len(ids))
    return done


class ProgressBar:
    """A one-line progress bar on a terminal; silent when the stream is not one."""

    def __init__(self, label: str, stream: TextIO = sys.stderr) -> None:
        self.label = label
        self.stream = stream
        self.enabled = stream.isatty()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        filled = int(width * done / total) if total else width
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
