from __future__ import annotations

import struct

import orjson
import pytest
import redis.asyncio as aioredis

from forwarder.batch import (
    batch_size,
    build_batch,
    read_batch_results,
    read_failures,
    single_event_size,
)
from forwarder.blocks import BlockBuilder, decode_block, encode_block, lane_envelopes, take_prefix
from forwarder.envelope import EVENT_TYPES, Item, parse_envelope
from forwarder.redis_store import RedisStore


def _events(events: list[tuple[str, dict]]) -> list[tuple[int, bytes, int, int]]:
    refs = []
    for event_type, data in events:
        raw = orjson.dumps({"site_id": "7", "type": event_type, "data": data, "id": f"e{len(refs)}"})
        envelope = parse_envelope(raw)
        refs.append((envelope.type_index, raw, envelope.data_offset, envelope.data_length))
    return refs


def _decoded(events: list[tuple[str, dict]]) -> list[Item]:
    items = []
    for type_index, raw, offset, length in _events(events):
        view = memoryview(raw)
        items.append(Item(type_index, view, view[offset : offset + length]))
    return items


def _items(events: list[tuple[str, dict]], split: int = 2) -> list[bytes]:
    """Encode events as two blocks, cut after `split` events, so prefixes cross a block boundary."""
    refs = _events(events)
    return [encode_block(part) for part in (refs[:split], refs[split:]) if part]


MIXED = [
    ("cart", {"id": "c1", "name": "plain"}),
    ("order", {"order_number": "o1", "note": "Ünïcödé ✓ 𝄞"}),
    ("cart", {"id": "c2", "quote": 'say "hi"\n\t\\', "ctl": "\u0001"}),
    ("product.inventory", {"sku_code": "A", "inventory_level": 0}),
    ("customer", {"id": "u1", "name": "日本語"}),
    ("order", {"order_number": "o2"}),
]


def test_batch_body_groups_by_type_in_lane_order() -> None:
    batch = build_batch(_decoded(MIXED))
    parsed = orjson.loads(batch.body)
    assert [event["id"] for event in parsed["cart"]] == ["c1", "c2"]
    assert [event["order_number"] for event in parsed["order"]] == ["o1", "o2"]
    assert parsed["product.inventory"] == [{"sku_code": "A", "inventory_level": 0}]
    assert batch.positions == {"cart": [0, 2], "order": [1, 5], "customer": [4], "product.inventory": [3]}


def test_batch_size_matches_encoded_body() -> None:
    decoded = _decoded(MIXED)
    lengths: dict[str, list[int]] = {}
    for item in decoded:
        lengths.setdefault(item.type, []).append(len(item.data))
    assert batch_size(lengths) == len(build_batch(decoded).body)
    assert single_event_size("cart", 10) == len(b'{"cart":[' + b"x" * 10 + b"]}")


@pytest.fixture
async def store(redis_client: aioredis.Redis) -> RedisStore:
    return RedisStore(redis_client, "t")


async def _fill_lane(store: RedisStore, items: list[bytes]) -> None:
    await store.client.rpush(store.keys.lane("7:batch"), *items)
    await store.client.set(store.keys.lease("7:batch"), "me")


async def test_peek_stops_at_exact_byte_limit(store: RedisStore) -> None:
    await _fill_lane(store, _items(MIXED))
    decoded = _decoded(MIXED)
    full = len(build_batch(decoded).body)
    first_five = len(build_batch(decoded[:5]).body)

    at_limit = await store.peek("me", "7:batch", 100, full)
    assert at_limit.count == 6
    assert at_limit.body_bytes == full

    one_under = await store.peek("me", "7:batch", 100, full - 1)
    assert one_under.count == 5
    assert one_under.body_bytes == first_five


async def test_peek_groups_build_the_same_body(store: RedisStore) -> None:
    await _fill_lane(store, _items(MIXED))
    decoded = _decoded(MIXED)
    peek = await store.peek("me", "7:batch", 100, 10_000_000)
    body = peek.prefix.body(tracker=False)
    assert body == build_batch(decoded).body
    assert len(body) == peek.body_bytes
    assert peek.type_sequence == bytes(item.type_index for item in decoded)
    assert peek.data_bytes == sum(len(item.data) for item in decoded)


async def test_peek_count_limit_and_foreign_lease(store: RedisStore) -> None:
    await _fill_lane(store, _items(MIXED))
    peek = await store.peek("me", "7:batch", 2, 10_000_000)
    assert peek.count == 2
    assert peek.type_sequence == bytes([0, 4])
    other = await store.peek("someone-else", "7:batch", 2, 10_000_000)
    assert other.status == -1
    assert other.count == 0


@pytest.mark.parametrize("split", [1, 2])
async def test_peek_returns_oversized_first_item(store: RedisStore, split: int) -> None:
    events = [("cart", {"blob": "x" * 5000}), ("cart", {"id": "small"})]
    await _fill_lane(store, _items(events, split))
    peek = await store.peek("me", "7:batch", 100, 1024)
    assert peek.count == 1
    assert peek.body_bytes == len(build_batch(_decoded(events)[:1]).body)
    assert orjson.loads(peek.prefix.body(tracker=False)) == {"cart": [{"blob": "x" * 5000}]}


def _groups(events: list[tuple[str, dict]]) -> tuple[list[tuple[int, int]], bytes]:
    decoded = _decoded(events)
    counts: dict[int, int] = {}
    for item in decoded:
        counts[item.type_index] = counts.get(item.type_index, 0) + 1
    return sorted(counts.items()), bytes(item.type_index for item in decoded)


def test_failures_all_success_is_empty() -> None:
    groups, sequence = _groups(MIXED)
    body = orjson.dumps({EVENT_TYPES[t]: [{"success": True}] * n for t, n in groups}, option=orjson.OPT_INDENT_2)
    assert read_failures(body, groups, sequence) == []


def test_failures_map_to_lane_positions() -> None:
    groups, sequence = _groups(MIXED)
    failure = {"error_type": "validation", "errors": {"id": "required"}, "success": False}
    body = orjson.dumps({
        "cart": [{"success": True}, failure],
        "customer": [{"success": True}],
        "order": [failure, {"success": True}],
        "product.inventory": [{"success": True}],
    })
    failures = read_failures(body, groups, sequence)
    assert failures is not None
    assert [position for position, _ in failures] == [1, 2]
    assert failures[0][1].error_type == "validation"
    assert orjson.loads(failures[0][1].error_body) == failure


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'{"success": true}',
        b'{"cart": [{"success": true}], "order": [{"success": true}, {"success": true}]}',
        b'{"cart": "x", "order": [], "customer": [], "product.inventory": []}',
    ],
)
def test_unreadable_failures_return_none(body: bytes) -> None:
    groups, sequence = _groups(MIXED)
    assert read_failures(body, groups, sequence) is None


def test_results_all_success() -> None:
    batch = build_batch(_decoded(MIXED))
    body = orjson.dumps({name: [{"success": True}] * len(pos) for name, pos in batch.positions.items()})
    results = read_batch_results(body, batch, 6)
    assert results is not None
    assert [result.ok for result in results] == [True] * 6


def test_results_mixed_map_to_lane_positions() -> None:
    batch = build_batch(_decoded(MIXED))
    failure = {"error_type": "validation", "errors": {"id": "required"}, "success": False}
    body = orjson.dumps({
        "cart": [{"success": True}, failure],
        "customer": [{"success": True}],
        "order": [failure, {"success": True}],
        "product.inventory": [{"success": True}],
    })
    results = read_batch_results(body, batch, 6)
    assert results is not None
    assert [result.ok for result in results] == [True, False, False, True, True, True]
    assert results[1].error_type == "validation"
    assert orjson.loads(results[1].error_body) == failure


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'{"success": true}',
        b'{"cart": [{"success": true}], "order": [{"success": true}, {"success": true}]}',
        b'{"cart": "x", "order": [], "customer": [], "product.inventory": []}',
    ],
)
def test_unreadable_results_return_none(body: bytes) -> None:
    batch = build_batch(_decoded(MIXED))
    assert read_batch_results(body, batch, 6) is None


async def _ack(store: RedisStore, token: str, lane: str, ack_id: str, peek, pop: bool = True,
               dead: list[tuple[bytes, bytes]] | None = None, back: tuple[bytes, int, int] = (b"", 0, 0),
               dl_max_entries: int = 100) -> int:
    status, _ = await store.ack(token, lane, ack_id, peek.prefix, pop, 0, 1000, 10**7, dl_max_entries, 10**9,
                                10_000, False, b"", dead or [], back)
    return status


async def _lease(store: RedisStore, lane: str, instance: str = "inst") -> str:
    await store.client.zadd(store.keys.due, {lane: 0})
    [(leased, token)] = (await store.schedule(instance, 10_000, 1)).lanes
    assert leased == lane
    return token


async def test_ack_from_an_earlier_lease_pops_nothing(store: RedisStore) -> None:
    lane = "7:batch"
    await store.client.rpush(store.keys.lane(lane), *_items(MIXED, 3))
    await store.client.hset(store.keys.lane_count, lane, 6)
    old_token = await _lease(store, lane)
    old_peek = await store.peek(old_token, lane, 2, 10_000_000)
    # The lease is given up and taken again by the same instance, as after a Redis freeze.
    assert await store.release_instance_lane(old_token, lane) == 1
    [(_, new_token)] = (await store.schedule("inst", 10_000, 1)).lanes
    assert new_token != old_token
    assert await _ack(store, old_token, lane, "late-ack", old_peek) == -1
    assert len(lane_envelopes(await store.client.lrange(store.keys.lane(lane), 0, -1))) == 6
    peek = await store.peek(new_token, lane, 2, 10_000_000)
    assert await _ack(store, new_token, lane, "current-ack", peek) == 3
    left = lane_envelopes(await store.client.lrange(store.keys.lane(lane), 0, -1))
    assert [envelope for _, envelope in left] == [raw for _, raw, _, _ in _events(MIXED)[2:]]
    assert int(await store.client.hget(store.keys.lane_count, lane)) == 4


@pytest.mark.parametrize("max_count", [1, 2, 3, 4, 5, 6])
async def test_ack_pops_prefix_across_blocks(store: RedisStore, max_count: int) -> None:
    lane = "7:batch"
    refs = _events(MIXED)
    await store.client.rpush(store.keys.lane(lane), *_items(MIXED, 3))
    token = await _lease(store, lane)
    peek = await store.peek(token, lane, max_count, 10_000_000)
    assert peek.count == max_count
    sent = orjson.loads(peek.prefix.body(tracker=False))
    assert sum(len(values) for values in sent.values()) == max_count
    await _ack(store, token, lane, f"ack-{max_count}", peek)
    left = lane_envelopes(await store.client.lrange(store.keys.lane(lane), 0, -1))
    assert [envelope for _, envelope in left] == [raw for _, raw, _, _ in refs[max_count:]]


async def test_ack_writes_dead_letters_with_envelope(store: RedisStore) -> None:
    lane = "7:batch"
    refs = _events(MIXED)
    await store.client.rpush(store.keys.lane(lane), *_items(MIXED, 3))
    token = await _lease(store, lane)
    peek = await store.peek(token, lane, 100, 10_000_000)
    failed = refs[4]
    back = (encode_block([failed]), 1, failed[3] + 1)
    assert await _ack(store, token, lane, "with-dead", peek, dead=[(failed[1], b'{"reason":"x"}')], back=back) == 0
    [dead_id] = await store.client.zrange(store.keys.dead_index, 0, -1)
    assert await store.client.hget(store.keys.dead(dead_id.decode()), "raw") == failed[1]
    assert await store.client.llen(store.keys.lane(lane)) == 0


async def test_ack_with_full_dead_store_keeps_failed_events(store: RedisStore) -> None:
    lane = "7:batch"
    refs = _events(MIXED)
    await store.client.rpush(store.keys.lane(lane), *_items(MIXED, 3))
    await store.client.hset(store.keys.lane_count, lane, 6)
    token = await _lease(store, lane)
    peek = await store.peek(token, lane, 5, 10_000_000)
    failed = [refs[1], refs[3]]
    back = (encode_block(failed), 2, sum(length + 1 for *_, length in failed))
    dead = [(failed[0][1], b"{}"), (failed[1][1], b"{}")]
    assert await _ack(store, token, lane, "full", peek, dead=dead, back=back, dl_max_entries=1) == -2
    left = lane_envelopes(await store.client.lrange(store.keys.lane(lane), 0, -1))
    # The failed events wait at the head, in order, before the event that was not sent.
    assert [envelope for _, envelope in left] == [refs[1][1], refs[3][1], refs[5][1]]
    assert int(await store.client.hget(store.keys.lane_count, lane)) == 3
    assert await store.client.zcard(store.keys.dead_index) == 0


def test_take_prefix_matches_reference_body() -> None:
    refs = _events([(MIXED[i % 6][0], {"i": i, "pad": "é" * (i % 7)}) for i in range(40)])
    blocks = [decode_block(encode_block(refs[a:b])) for a, b in [(0, 13), (13, 14), (14, 30), (30, 40)]]
    decoded = _decoded([(MIXED[i % 6][0], {"i": i, "pad": "é" * (i % 7)}) for i in range(40)])
    full = len(build_batch(decoded).body)
    for max_count in range(1, 42):
        for max_bytes in [10, 60, 200, 500, full - 1, full]:
            prefix = take_prefix(blocks, max_count, max_bytes)
            body = prefix.body(tracker=False)
            assert body == build_batch(decoded[: prefix.count]).body
            assert prefix.body_bytes == len(body)
            assert prefix.count == 1 or len(body) <= max_bytes
            if prefix.count < min(max_count, 40):
                # The longest prefix that fits: one more event would not.
                assert len(build_batch(decoded[: prefix.count + 1]).body) > max_bytes
            assert [envelope for _, envelope, _, _ in prefix.events()] == [raw for _, raw, _, _ in refs[: prefix.count]]


async def test_ack_of_an_empty_lane_releases_it(store: RedisStore) -> None:
    # A lane can be due while empty (its events went with an earlier batch).
    await store.client.zadd(store.keys.due, {"8:batch": 0})
    [(lane, token)] = (await store.schedule("inst", 10_000, 1)).lanes
    peek = await store.peek(token, lane, 100, 10_000_000)
    assert peek.count == 0
    assert await _ack(store, token, lane, "empty", peek, pop=False) == 0
    assert await store.client.exists(store.keys.lease(lane)) == 0
    assert await store.client.zscore(store.keys.due, lane) is None


async def test_sweep_makes_stranded_lane_due(store: RedisStore) -> None:
    # Leased, then the owner froze: the lease expired and nothing made the lane due.
    await store.client.rpush(store.keys.lane("9:batch"), *_items(MIXED))
    await store.client.hset(store.keys.lane_bytes, "9:batch", 100)
    await store.client.zadd(store.keys.due, {"9:batch": 0})
    [(lane, _)] = (await store.schedule("frozen", 10_000, 1)).lanes
    await store.client.delete(store.keys.lease(lane))
    assert await store.client.zscore(store.keys.due, lane) is None
    assert await store.sweep_stranded_lanes() == 1
    assert await store.client.zscore(store.keys.due, lane) is not None
    assert await store.sweep_stranded_lanes() == 0


async def test_release_of_dead_instance_with_expired_lease(store: RedisStore) -> None:
    await store.client.rpush(store.keys.lane("9:visit"), *_items([("visit", {"site": "9"})], 1))
    await store.client.zadd(store.keys.due, {"9:visit": 0})
    [(lane, _)] = (await store.schedule("dead", 10_000, 1)).lanes
    await store.client.delete(store.keys.lease(lane))
    await store.release_instance("dead")
    assert await store.client.zscore(store.keys.due, lane) is not None


def test_block_builder_bounds_and_counts() -> None:
    refs = _events([(MIXED[i % 6][0], {"i": i}) for i in range(600)])
    builder = BlockBuilder()
    for type_index, raw, offset, length in refs:
        builder.add(type_index, raw, memoryview(raw)[offset : offset + length], offset)
    blocks = [decode_block(element) for element in builder.finish()]
    assert [block.count for block in blocks] == [256, 256, 88]
    assert builder.events == 600
    assert builder.data_bytes == sum(length for *_, length in refs)
    assert sum(builder.type_counts) == 600
    assert builder.type_counts[EVENT_TYPES.index("cart")] == 200
    assert [envelope for block in blocks for _, envelope, _, _ in block.events()] == [raw for _, raw, _, _ in refs]


async def test_lane_from_earlier_version_drains(store: RedisStore) -> None:
    # Before blocks, a lane element was one event: type, data offset and length, envelope.
    lane = "7:batch"
    refs = _events(MIXED[:3])
    legacy = [struct.pack(">BII", type_index, offset, length) + raw for type_index, raw, offset, length in refs]
    await store.client.rpush(store.keys.lane(lane), *legacy)
    await store.client.hset(store.keys.lane_bytes, lane, 100)
    assert await store.count_legacy_lanes() == 1
    assert int(await store.client.hget(store.keys.lane_count, lane)) == 3
    token = await _lease(store, lane)
    peek = await store.peek(token, lane, 2, 10_000_000)
    assert [envelope for _, envelope, _, _ in peek.prefix.events()] == [raw for _, raw, _, _ in refs[:2]]
    await _ack(store, token, lane, "legacy", peek)
    assert await store.client.lrange(store.keys.lane(lane), 0, -1) == legacy[2:]
    assert int(await store.client.hget(store.keys.lane_count, lane)) == 1
