from __future__ import annotations

import orjson
import pytest
import redis.asyncio as aioredis

from forwarder.batch import (
    batch_size,
    build_batch,
    build_body,
    read_batch_results,
    read_failures,
    single_event_size,
)
from forwarder.envelope import EVENT_TYPES, decode_item, encode_item, parse_envelope
from forwarder.redis_store import RedisStore


def _items(events: list[tuple[str, dict]]) -> list:
    items = []
    for event_type, data in events:
        raw = orjson.dumps({"site_id": "7", "type": event_type, "data": data})
        items.append(encode_item(raw, parse_envelope(raw)))
    return items


MIXED = [
    ("cart", {"id": "c1", "name": "plain"}),
    ("order", {"order_number": "o1", "note": "Ünïcödé ✓ 𝄞"}),
    ("cart", {"id": "c2", "quote": 'say "hi"\n\t\\', "ctl": "\u0001"}),
    ("product.inventory", {"sku_code": "A", "inventory_level": 0}),
    ("customer", {"id": "u1", "name": "日本語"}),
    ("order", {"order_number": "o2"}),
]


def test_batch_body_groups_by_type_in_lane_order() -> None:
    batch = build_batch([decode_item(item) for item in _items(MIXED)])
    parsed = orjson.loads(batch.body)
    assert [event["id"] for event in parsed["cart"]] == ["c1", "c2"]
    assert [event["order_number"] for event in parsed["order"]] == ["o1", "o2"]
    assert parsed["product.inventory"] == [{"sku_code": "A", "inventory_level": 0}]
    assert batch.positions == {"cart": [0, 2], "order": [1, 5], "customer": [4], "product.inventory": [3]}


def test_batch_size_matches_encoded_body() -> None:
    decoded = [decode_item(item) for item in _items(MIXED)]
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
    items = _items(MIXED)
    await _fill_lane(store, items)
    decoded = [decode_item(item) for item in items]
    full = len(build_batch(decoded).body)
    first_five = len(build_batch(decoded[:5]).body)

    at_limit = await store.peek("me", "7:batch", 100, full)
    assert at_limit.count == 6
    assert at_limit.body_bytes == full

    one_under = await store.peek("me", "7:batch", 100, full - 1)
    assert one_under.count == 5
    assert one_under.body_bytes == first_five


async def test_peek_groups_build_the_same_body(store: RedisStore) -> None:
    items = _items(MIXED)
    await _fill_lane(store, items)
    decoded = [decode_item(item) for item in items]
    peek = await store.peek("me", "7:batch", 100, 10_000_000)
    body = build_body(peek.groups)
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


async def test_peek_returns_oversized_first_item(store: RedisStore) -> None:
    items = _items([("cart", {"blob": "x" * 5000}), ("cart", {"id": "small"})])
    await _fill_lane(store, items)
    peek = await store.peek("me", "7:batch", 100, 1024)
    assert peek.count == 1
    assert peek.body_bytes == len(build_batch([decode_item(items[0])]).body)


def _groups(events: list[tuple[str, dict]]) -> tuple[list[tuple[int, list[bytes]]], bytes]:
    decoded = [decode_item(item) for item in _items(events)]
    groups: dict[int, list[bytes]] = {}
    for item in decoded:
        groups.setdefault(item.type_index, []).append(bytes(item.data))
    return sorted(groups.items()), bytes(item.type_index for item in decoded)


def test_failures_all_success_is_empty() -> None:
    groups, sequence = _groups(MIXED)
    body = orjson.dumps({EVENT_TYPES[t]: [{"success": True}] * len(d) for t, d in groups}, option=orjson.OPT_INDENT_2)
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
    batch = build_batch([decode_item(item) for item in _items(MIXED)])
    body = orjson.dumps({name: [{"success": True}] * len(pos) for name, pos in batch.positions.items()})
    results = read_batch_results(body, batch, 6)
    assert results is not None
    assert [result.ok for result in results] == [True] * 6


def test_results_mixed_map_to_lane_positions() -> None:
    batch = build_batch([decode_item(item) for item in _items(MIXED)])
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
    batch = build_batch([decode_item(item) for item in _items(MIXED)])
    assert read_batch_results(body, batch, 6) is None


async def test_ack_from_an_earlier_lease_pops_nothing(store: RedisStore) -> None:
    await store.client.rpush(store.keys.lane("7:batch"), *_items(MIXED))
    await store.client.zadd(store.keys.due, {"7:batch": 0})
    first = await store.schedule("inst", 10_000, 1)
    [(lane, old_token)] = first.lanes
    # The lease is given up and taken again by the same instance, as after a Redis freeze.
    assert await store.release_instance_lane(old_token, lane) == 1
    second = await store.schedule("inst", 10_000, 1)
    [(_, new_token)] = second.lanes
    assert new_token != old_token
    status, _ = await store.ack(old_token, lane, "late-ack", 6, 0, 0, 1000, 10**7, 100, 10**9, 10_000,
                                False, b"", [])
    assert status == -1
    assert await store.client.llen(store.keys.lane(lane)) == 6
    status, _ = await store.ack(new_token, lane, "current-ack", 2, 0, 0, 1000, 10**7, 100, 10**9, 10_000,
                                False, b"", [])
    assert status == 3
    assert await store.client.llen(store.keys.lane(lane)) == 4


async def test_ack_of_an_empty_lane_releases_it(store: RedisStore) -> None:
    # A lane can be due while empty (its events went with an earlier batch).
    await store.client.zadd(store.keys.due, {"8:batch": 0})
    [(lane, token)] = (await store.schedule("inst", 10_000, 1)).lanes
    peek = await store.peek(token, lane, 100, 10_000_000)
    assert peek.count == 0
    status, _ = await store.ack(token, lane, "empty", 0, 0, 0, 1000, 10**7, 100, 10**9, 10_000, False, b"", [])
    assert status == 0
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
    await store.client.rpush(store.keys.lane("9:visit"), *_items([("visit", {"site": "9"})]))
    await store.client.zadd(store.keys.due, {"9:visit": 0})
    [(lane, _)] = (await store.schedule("dead", 10_000, 1)).lanes
    await store.client.delete(store.keys.lease(lane))
    await store.release_instance("dead")
    assert await store.client.zscore(store.keys.due, lane) is not None
