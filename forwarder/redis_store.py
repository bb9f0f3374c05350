"""The Redis side: every key the daemon uses and the Lua scripts that change them.

Data flow, each step one atomic script so that a crash between any two leaves every
event in exactly one place:

    {p}:events            producers LPUSH; the oldest entry is at the right end
      -> route            the intake leader reads the oldest entries with LRANGE,
                          parses them, and one MULTI/EXEC moves them as blocks to
                          per-lane lists {p}:lane:<site>:<kind> (envelope problems go
                          to the dead-letter store instead)
      -> peek / ack       the lane's lease owner reads a prefix, sends it, and only
                          then pops it (ack) or moves events to dead letters

Keys (p is `redis.key_prefix`; a prefix in braces keeps every key in one cluster slot):
    {p}:events              list, the producer queue
    {p}:intake:claimed      list, entries claimed by versions before blocks; a new
                            leader hands them back to the queue
    {p}:intake:leader       string with TTL, the instance id of the intake leader
    {p}:intake:routed       string, id of the last routed chunk (makes route idempotent)
    {p}:lane:<lane>         list of blocks of events (format in blocks.py)
    {p}:lease:<lane>        string with TTL, the lease token ("<instance id>|<n>") of the owner
    {p}:lanes:lease_seq     counter that makes each lease token unique
    {p}:lanes:due           zset lane -> Redis time (ms) when the lane should be sent
    {p}:lanes:bytes         hash lane -> data bytes queued plus one per event (size trigger)
    {p}:lanes:count         hash lane -> events queued
    {p}:lanes:attempts      hash lane -> "attempts,first_ms,last_ms" of the lane's head
    {p}:lanes:state         hash lane -> JSON state for `status` (ok, retrying, paused)
    {p}:lanes:acked         hash lane -> id of the last applied ack (idempotent acks)
    {p}:instances           hash instance id -> JSON (host, pid, start time)
    {p}:instance:<id>       string with TTL, the instance's heartbeat
    {p}:instance:<id>:lanes set of lanes whose lease the instance holds
    {p}:dead:seq            counter for dead-letter ids
    {p}:dead:index          zset dead-letter id -> Redis time (ms) it was written
    {p}:dead:<id>           hash raw (producer bytes), meta (JSON)
    {p}:dead:bytes          counter of bytes held by dead letters

Times stored in Redis are Redis's own (TIME), so clocks of several hosts never mix.
NOTE: scripts build lane and dead-letter key names from the prefix instead of taking
them in KEYS; that works on one server and on a cluster only with a braced prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from forwarder.blocks import MAX_BLOCK_BYTES, Block, Prefix, decode_block, take_prefix

_COMMON = r"""
local p = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function dead_full(needed, max_entries, max_bytes)
  local n = redis.call('ZCARD', p .. ':dead:index')
  if n + needed > max_entries then return true end
  local b = tonumber(redis.call('GET', p .. ':dead:bytes') or '0')
  return b >= max_bytes
end
local function dead_letter(raw, meta, now)
  local id = redis.call('INCR', p .. ':dead:seq')
  redis.call('HSET', p .. ':dead:' .. id, 'raw', raw, 'meta', meta)
  redis.call('ZADD', p .. ':dead:index', now, id)
  redis.call('INCRBY', p .. ':dead:bytes', #raw + #meta)
  return id
end
"""

# ARGV: prefix, linger_ms, count_trigger, size_trigger, lane_count, then per lane: name,
#       events, bytes; then dead count, then per dead letter: index in the chunk (0 is
#       the oldest entry), meta JSON.
# The bookkeeping part of a route. It runs inside the route's MULTI before the LTRIM that
# takes the chunk off the queue, so dead letters copy their entries from the queue.
_ROUTE_BOOKKEEPING = _COMMON + r"""
local linger = tonumber(ARGV[2])
local count_trigger = tonumber(ARGV[3])
local size_trigger = tonumber(ARGV[4])
local lane_count = tonumber(ARGV[5])
local now = now_ms()
local due = p .. ':lanes:due'
local pos = 6
for _ = 1, lane_count do
  local lane = ARGV[pos]
  local queued = redis.call('HINCRBY', p .. ':lanes:count', lane, ARGV[pos + 1])
  local total = redis.call('HINCRBY', p .. ':lanes:bytes', lane, ARGV[pos + 2])
  redis.call('ZADD', due, 'NX', now + linger, lane)
  -- A full lane is sent at once, unless it is backing off (it has an attempts
  -- record): new events must not cut a retry delay or a pause short.
  if (queued >= count_trigger or total >= size_trigger)
      and redis.call('HEXISTS', p .. ':lanes:attempts', lane) == 0 then
    redis.call('ZADD', due, 'LT', now, lane)
  end
  pos = pos + 3
end
local events = p .. ':events'
local dead_count = tonumber(ARGV[pos])
pos = pos + 1
for _ = 1, dead_count do
  dead_letter(redis.call('LINDEX', events, -1 - tonumber(ARGV[pos])), ARGV[pos + 1], now)
  pos = pos + 2
end
return 1
"""

# ARGV: prefix, instance. Puts claimed entries back at the consuming end of the queue,
# oldest last so that it is consumed first. Returns how many, or -1 when not the leader.
_RETURN_CLAIMED = r"""
local p = ARGV[1]
if redis.call('GET', p .. ':intake:leader') ~= ARGV[2] then return -1 end
local claimed = p .. ':intake:claimed'
local items = redis.call('LRANGE', claimed, 0, -1)
for i = #items, 1, -1 do redis.call('RPUSH', p .. ':events', items[i]) end
redis.call('DEL', claimed)
return #items
"""

# ARGV: prefix, instance, ttl_ms, max_lanes, horizon_ms, skip_retrying (0/1)
# Leases up to max_lanes lanes due by now + horizon. A lane leased by another
# instance is pushed back until that lease expires, so it is not polled in a loop.
# Returns {now_ms, next_due_ms or -1, flat list of leased lane and its lease token}.
_SCHEDULE = _COMMON + r"""
local inst = ARGV[2]
local ttl = tonumber(ARGV[3])
local max_lanes = tonumber(ARGV[4])
local skip_retrying = ARGV[6] == '1'
local now = now_ms()
local due = p .. ':lanes:due'
local lanes = redis.call('ZRANGEBYSCORE', due, '-inf', now + tonumber(ARGV[5]), 'LIMIT', 0, max_lanes * 4)
local leased = {}
for i = 1, #lanes do
  if #leased >= max_lanes then break end
  local lane = lanes[i]
  if not (skip_retrying and redis.call('HEXISTS', p .. ':lanes:attempts', lane) == 1) then
    local lease = p .. ':lease:' .. lane
    -- Each lease gets its own token, so an acknowledgement delayed from an earlier lease
    -- of the same instance (a reply lost in a Redis freeze) cannot pop events of this one.
    local token = inst .. '|' .. redis.call('INCR', p .. ':lanes:lease_seq')
    if redis.call('SET', lease, token, 'NX', 'PX', ttl) then
      redis.call('ZREM', due, lane)
      redis.call('SADD', p .. ':instance:' .. inst .. ':lanes', lane)
      leased[#leased + 1] = lane
      leased[#leased + 1] = token
    else
      local left = redis.call('PTTL', lease)
      if left < 0 then left = 100 end
      redis.call('ZADD', due, 'XX', now + left, lane)
    end
  end
end
local first = redis.call('ZRANGE', due, 0, 0, 'WITHSCORES')
local next_due = -1
if first[2] then next_due = tonumber(first[2]) end
return {now, next_due, leased}
"""

# ARGV: prefix, lease token, lane, ack_id, pop_events, popped_bytes, linger_deadline_ms,
#       count_trigger, size_trigger, dl_max_entries, dl_max_bytes, ttl_ms, keep_lease,
#       state_json, keep_failure_start (0/1), whole_blocks, remainder, back_block,
#       back_events, back_bytes, dead_count, then per dead letter: envelope, meta JSON.
# Popping the prefix removes whole_blocks elements from the head and, when the prefix
# ends inside a block, replaces the new head with `remainder` (the rest of that block).
# Returns {status, now_ms}: 0 lane empty and released, 1 lease kept for the next batch,
# 3 released with the rest due at the linger deadline, -1 lease lost (nothing done),
# -2 dead-letter store full (the prefix popped, and `back_block`, the events to
# dead-letter, pushed back at the head to wait; the lease is kept). A repeated ack_id
# returns the first status.
_ACK = _COMMON + r"""
local inst = ARGV[2]
local lane = ARGV[3]
local ack_id = ARGV[4]
local acked = p .. ':lanes:acked'
-- A retry after a lost reply finds its own id and gets the first result back, so it
-- neither pops twice nor forgets that the lease was kept.
local previous = redis.call('HGET', acked, lane)
if previous and string.sub(previous, 1, #ack_id + 1) == ack_id .. '|' then
  return {tonumber(string.sub(previous, #ack_id + 2)), 0}
end
local lease = p .. ':lease:' .. lane
-- ARGV[2] is the lease token; the owning instance is the part before the bar.
local token = inst
inst = string.match(token, '^(.*)|')
if redis.call('GET', lease) ~= token then return {-1, 0} end
local key = p .. ':lane:' .. lane
local pop_events = tonumber(ARGV[5])
local popped_bytes = tonumber(ARGV[6])
local whole_blocks = tonumber(ARGV[16])
local remainder = ARGV[17]
local dead_count = tonumber(ARGV[21])
local now = now_ms()
local bytes_key = p .. ':lanes:bytes'
local count_key = p .. ':lanes:count'
local function pop_prefix()
  if whole_blocks > 0 then redis.call('LTRIM', key, whole_blocks, -1) end
  if remainder ~= '' then redis.call('LSET', key, 0, remainder) end
end
-- string.format: Lua writes -0 as "-0", which Redis rejects as an integer.
local function add(hash, amount)
  return redis.call('HINCRBY', hash, lane, string.format('%d', amount))
end
if dead_count > 0 and dead_full(dead_count, tonumber(ARGV[10]), tonumber(ARGV[11])) then
  -- No room for these dead letters: pop the prefix anyway, because the API accepted
  -- its other events and resending them would duplicate them, and put the failed
  -- events back at the head, in order, to wait until the store has room.
  pop_prefix()
  redis.call('LPUSH', key, ARGV[18])
  add(bytes_key, tonumber(ARGV[20]) - popped_bytes)
  add(count_key, tonumber(ARGV[19]) - pop_events)
  redis.call('HSET', acked, lane, ack_id .. '|-2')
  return {-2, now}
end
local pos = 22
for _ = 1, dead_count do
  dead_letter(ARGV[pos], ARGV[pos + 1], now)
  pos = pos + 2
end
if pop_events > 0 then
  pop_prefix()
  local attempts_key = p .. ':lanes:attempts'
  local record = ARGV[15] == '1' and redis.call('HGET', attempts_key, lane)
  if record then
    -- The outage goes on: the next head inherits its start, so it does not wait
    -- another full max_outage before it too is dead-lettered.
    local first = string.match(record, '^%d+,(%d+),')
    redis.call('HSET', attempts_key, lane, '0,' .. first .. ',' .. now)
  else
    redis.call('HDEL', attempts_key, lane)
  end
end
if ARGV[14] ~= '' then redis.call('HSET', p .. ':lanes:state', lane, ARGV[14]) end
local total = add(bytes_key, -popped_bytes)
local queued = add(count_key, -pop_events)
local due = p .. ':lanes:due'
local owned = p .. ':instance:' .. inst .. ':lanes'
if redis.call('LLEN', key) == 0 then
  redis.call('DEL', lease)
  redis.call('ZREM', due, lane)
  redis.call('SREM', owned, lane)
  redis.call('HDEL', bytes_key, lane)
  redis.call('HDEL', count_key, lane)
  redis.call('HSET', acked, lane, ack_id .. '|0')
  return {0, now}
end
if ARGV[13] == '1' or queued >= tonumber(ARGV[8]) or total >= tonumber(ARGV[9]) then
  redis.call('PEXPIRE', lease, tonumber(ARGV[12]))
  redis.call('HSET', acked, lane, ack_id .. '|1')
  return {1, now}
end
redis.call('DEL', lease)
redis.call('SREM', owned, lane)
redis.call('ZADD', due, 'LT', tonumber(ARGV[7]), lane)
redis.call('HSET', acked, lane, ack_id .. '|3')
return {3, now}
"""

# ARGV: prefix. Gives every lane with events but no event count (lanes written before
# blocks, one event per element) the count that the ack scripts decrement.
_COUNT_LEGACY_LANES = r"""
local p = ARGV[1]
local counted = 0
for _, lane in ipairs(redis.call('HKEYS', p .. ':lanes:bytes')) do
  if redis.call('HEXISTS', p .. ':lanes:count', lane) == 0 then
    redis.call('HSET', p .. ':lanes:count', lane, redis.call('LLEN', p .. ':lane:' .. lane))
    counted = counted + 1
  end
end
return counted
"""

# ARGV: prefix, lease token, lane, delay_ms, count_attempt (0/1), state_json
# Records a failed try of the lane's head and releases the lane until now + delay.
# Returns {attempts, first_ms, now_ms}, or {-1, 0, 0} when the lease is not ours.
_RETRY = _COMMON + r"""
local inst = ARGV[2]
local lane = ARGV[3]
local lease = p .. ':lease:' .. lane
local token = inst
inst = string.match(token, '^(.*)|')
if redis.call('GET', lease) ~= token then return {-1, 0, 0} end
local now = now_ms()
local attempts_key = p .. ':lanes:attempts'
local record = redis.call('HGET', attempts_key, lane)
local attempts, first = 0, now
if record then
  local a, f = string.match(record, '^(%d+),(%d+),')
  attempts, first = tonumber(a), tonumber(f)
end
if ARGV[5] == '1' then attempts = attempts + 1 end
redis.call('HSET', attempts_key, lane, attempts .. ',' .. first .. ',' .. now)
if ARGV[6] ~= '' then redis.call('HSET', p .. ':lanes:state', lane, ARGV[6]) end
redis.call('DEL', lease)
redis.call('SREM', p .. ':instance:' .. inst .. ':lanes', lane)
redis.call('ZADD', p .. ':lanes:due', now + tonumber(ARGV[4]), lane)
return {attempts, first, now}
"""

# ARGV: prefix, instance, ttl_ms, info_json, active lanes... Renews the heartbeat, the
# intake leadership and the lease of every lane the instance is working on. A lease
# the instance holds without working on it (its task ended without releasing it) is
# released and made due, so no lane is stranded. Returns the lanes lost to others.
_RENEW = r"""
local p = ARGV[1]
local inst = ARGV[2]
local ttl = tonumber(ARGV[3])
local active = {}
for i = 5, #ARGV do active[ARGV[i]] = true end
redis.call('SET', p .. ':instance:' .. inst, '1', 'PX', ttl)
redis.call('HSET', p .. ':instances', inst, ARGV[4])
local leader = p .. ':intake:leader'
if redis.call('GET', leader) == inst then redis.call('PEXPIRE', leader, ttl) end
local owned = p .. ':instance:' .. inst .. ':lanes'
local lost = {}
for _, lane in ipairs(redis.call('SMEMBERS', owned)) do
  local lease = p .. ':lease:' .. lane
  local holder = redis.call('GET', lease)
  if not holder or string.sub(holder, 1, #inst + 1) ~= inst .. '|' then
    redis.call('SREM', owned, lane)
    lost[#lost + 1] = lane
  elseif active[lane] then
    redis.call('PEXPIRE', lease, ttl)
  else
    redis.call('DEL', lease)
    redis.call('SREM', owned, lane)
    if redis.call('LLEN', p .. ':lane:' .. lane) > 0 then
      local t = redis.call('TIME')
      redis.call('ZADD', p .. ':lanes:due', 'LT', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), lane)
    end
  end
end
return lost
"""

# ARGV: prefix, instance. Gives up everything an instance holds (its own clean exit,
# or a dead process found by another): the leadership, lane leases (due at once).
_RELEASE_INSTANCE = _COMMON + r"""
local inst = ARGV[2]
local now = now_ms()
local leader = p .. ':intake:leader'
if redis.call('GET', leader) == inst then redis.call('DEL', leader) end
local owned = p .. ':instance:' .. inst .. ':lanes'
local released = 0
for _, lane in ipairs(redis.call('SMEMBERS', owned)) do
  local lease = p .. ':lease:' .. lane
  local holder = redis.call('GET', lease)
  if holder and string.sub(holder, 1, #inst + 1) == inst .. '|' then
    redis.call('DEL', lease)
    released = released + 1
  end
  -- Also when the lease already expired: a leased lane is not in the due set, so
  -- without this a lane whose owner died would wait for its next new event.
  if redis.call('LLEN', p .. ':lane:' .. lane) > 0 then
    redis.call('ZADD', p .. ':lanes:due', 'LT', now, lane)
  end
end
redis.call('DEL', owned)
redis.call('DEL', p .. ':instance:' .. inst)
redis.call('HDEL', p .. ':instances', inst)
return released
"""

# ARGV: prefix, lease token, lane. Gives up one lane lease; a non-empty lane is due at once.
_RELEASE_LANE = _COMMON + r"""
local inst = ARGV[2]
local lane = ARGV[3]
local lease = p .. ':lease:' .. lane
if redis.call('GET', lease) ~= inst then return 0 end
redis.call('DEL', lease)
redis.call('SREM', p .. ':instance:' .. string.match(inst, '^(.*)|') .. ':lanes', lane)
if redis.call('LLEN', p .. ':lane:' .. lane) > 0 then
  redis.call('ZADD', p .. ':lanes:due', 'LT', now_ms(), lane)
end
return 1
"""

# ARGV: prefix. Makes due every lane that holds events but is neither due nor leased,
# which happens when a lease expires without its owner releasing it (a frozen or dead
# process). Lanes with events are the fields of {p}:lanes:bytes. Returns how many.
_SWEEP = _COMMON + r"""
local due = p .. ':lanes:due'
local now = nil
local made = 0
for _, lane in ipairs(redis.call('HKEYS', p .. ':lanes:bytes')) do
  if not redis.call('ZSCORE', due, lane) and redis.call('EXISTS', p .. ':lease:' .. lane) == 0
      and redis.call('LLEN', p .. ':lane:' .. lane) > 0 then
    now = now or now_ms()
    redis.call('ZADD', due, now, lane)
    made = made + 1
  end
end
return made
"""

# ARGV: prefix, lanes... Makes each non-empty lane due now (for example, paused lanes
# after a reload brought new tokens). Returns how many lanes were made due.
_DUE_NOW = _COMMON + r"""
local now = now_ms()
local made = 0
for i = 2, #ARGV do
  if redis.call('LLEN', p .. ':lane:' .. ARGV[i]) > 0 then
    redis.call('ZADD', p .. ':lanes:due', 'LT', now, ARGV[i])
    made = made + 1
  end
end
return made
"""

# ARGV: prefix, "replay" or "purge", dead-letter ids... Deletes each dead letter, after
# pushing it back at the producer end of the queue for "replay"; one atomic step for
# the whole call. Returns how many were found.
_REMOVE_DEAD = r"""
local p = ARGV[1]
local replay = ARGV[2] == 'replay'
local removed = 0
for i = 3, #ARGV do
  local key = p .. ':dead:' .. ARGV[i]
  local raw, meta = unpack(redis.call('HMGET', key, 'raw', 'meta'))
  if raw then
    if replay then redis.call('LPUSH', p .. ':events', raw) end
    redis.call('DEL', key)
    redis.call('ZREM', p .. ':dead:index', ARGV[i])
    redis.call('DECRBY', p .. ':dead:bytes', #raw + #meta)
    removed = removed + 1
  end
end
return removed
"""


class Keys:
    """Names of the fixed keys for one prefix (per-lane keys are built in the scripts)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.events = f"{prefix}:events"
        self.claimed = f"{prefix}:intake:claimed"
        self.leader = f"{prefix}:intake:leader"
        self.routed = f"{prefix}:intake:routed"
        self.due = f"{prefix}:lanes:due"
        self.lane_bytes = f"{prefix}:lanes:bytes"
        self.lane_count = f"{prefix}:lanes:count"
        self.attempts = f"{prefix}:lanes:attempts"
        self.lane_state = f"{prefix}:lanes:state"
        self.instances = f"{prefix}:instances"
        self.dead_index = f"{prefix}:dead:index"
        self.dead_bytes = f"{prefix}:dead:bytes"

    def lane(self, lane: str) -> str:
        return f"{self.prefix}:lane:{lane}"

    def lease(self, lane: str) -> str:
        return f"{self.prefix}:lease:{lane}"

    def heartbeat(self, instance: str) -> str:
        return f"{self.prefix}:instance:{instance}"

    def dead(self, dead_id: int | str) -> str:
        return f"{self.prefix}:dead:{dead_id}"


@dataclass(slots=True)
class Peek:
    status: int
    now_ms: int
    attempts: int
    first_attempt_ms: int | None
    last_attempt_ms: int | None
    prefix: Prefix
    # Lane elements and their bytes read to find the prefix, for sizing the next read.
    blocks_read: int
    bytes_read: int

    @property
    def count(self) -> int:
        return self.prefix.count

    @property
    def body_bytes(self) -> int:
        return self.prefix.body_bytes

    @property
    def data_bytes(self) -> int:
        return self.prefix.data_bytes

    @property
    def type_sequence(self) -> bytes:
        return self.prefix.type_sequence


_EMPTY_PREFIX = Prefix(0, 2, 0, b"", [], 0, b"", [])
# Lane elements read per round trip at most, whatever the estimate.
MAX_READ_BLOCKS = 512


@dataclass(slots=True)
class Schedule:
    now_ms: int
    next_due_ms: int | None
    # (lane, lease token) for each lane leased by this call.
    lanes: list[tuple[str, str]]


class RedisStore:
    """Typed calls of the Lua scripts above on one redis-py asyncio client."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self._prefix = prefix
        self._return_claimed = client.register_script(_RETURN_CLAIMED)
        self._count_legacy_lanes = client.register_script(_COUNT_LEGACY_LANES)
        self._schedule = client.register_script(_SCHEDULE)
        self._ack = client.register_script(_ACK)
        self._retry = client.register_script(_RETRY)
        self._renew = client.register_script(_RENEW)
        self._release_instance = client.register_script(_RELEASE_INSTANCE)
        self._release_lane = client.register_script(_RELEASE_LANE)
        self._due_now = client.register_script(_DUE_NOW)
        self._sweep = client.register_script(_SWEEP)
        self._remove_dead = client.register_script(_REMOVE_DEAD)

    async def acquire_leadership(self, instance: str, ttl_ms: int) -> bool:
        leader = self.keys.leader
        if await self.client.set(leader, instance, nx=True, px=ttl_ms):
            return True
        current = await self.client.get(leader)
        return current is not None and current.decode() == instance

    async def read_chunk(self, max_count: int, dl_max_entries: int, dl_max_bytes: int) -> tuple[bool, list[bytes]]:
        """Read the oldest queue entries, oldest first, without removing them.

        Returns (False, []) when the dead-letter store is full. At most as many entries
        are returned as the store has room for, because each can become one dead letter
        and the store must never evict.
        """
        keys = self.keys
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zcard(keys.dead_index)
            pipe.get(keys.dead_bytes)
            pipe.lrange(keys.events, -max_count, -1)
            dead_entries, dead_bytes, entries = await pipe.execute()
        room = dl_max_entries - int(dead_entries)
        if room <= 0 or int(dead_bytes or 0) >= dl_max_bytes:
            return False, []
        entries.reverse()
        return True, entries[:room]

    async def route(
        self, instance: str, chunk_id: str, entry_count: int, oldest_entry: bytes, linger_ms: int,
        count_trigger: int, size_trigger: int, dl_max_entries: int, dl_max_bytes: int,
        lanes: dict[str, tuple[int, int, list[bytes]]], dead: list[tuple[int, bytes]],
    ) -> int:
        """Move a chunk, the oldest `entry_count` queue entries, to its lanes as blocks.

        One MULTI/EXEC, guarded by WATCH on the leader key, so that no other instance took
        the queue's tail meanwhile. The blocks go in plain RPUSH commands: a script would
        copy each of their bytes twice more (measured in docs/benchmarks.md).
        Returns 1 when routed, 0 when this chunk was routed already (a reply lost),
        -1 when not the leader, -2 when the dead letters do not fit in the store, -3
        when the oldest entry is not `oldest_entry`, and -4 when a watched key changed
        before EXEC. Nothing is done in the last four cases.
        """
        try:
            return await self._route_watched(
                instance, chunk_id, entry_count, oldest_entry, linger_ms, count_trigger, size_trigger,
                dl_max_entries, dl_max_bytes, lanes, dead,
            )
        except WatchError as exc:
            # redis-py also reports a lost connection as a WatchError while keys are
            # watched; that one is retried like any connection failure. Either way
            # the route may be tried again: its chunk id makes a repeat a no-op.
            if isinstance(exc.__context__, RedisConnectionError | RedisTimeoutError):
                raise RedisConnectionError(f"connection lost during route: {exc}") from exc
            return -4

    async def _route_watched(
        self, instance: str, chunk_id: str, entry_count: int, oldest_entry: bytes, linger_ms: int,
        count_trigger: int, size_trigger: int, dl_max_entries: int, dl_max_bytes: int,
        lanes: dict[str, tuple[int, int, list[bytes]]], dead: list[tuple[int, bytes]],
    ) -> int:
        keys = self.keys
        async with self.client.pipeline(transaction=True) as pipe:
            # NOTE: the dead-letter store is checked but not watched: lanes write dead
            # letters all the time during a poison storm, and watching it would starve
            # the intake. Concurrent acks can take the store a little past max_entries.
            await pipe.watch(keys.leader, keys.routed)
            leader, routed = await pipe.mget(keys.leader, keys.routed)
            if leader is None or leader.decode() != instance:
                return -1
            if routed is not None and routed.decode() == chunk_id:
                return 0
            if await pipe.lindex(keys.events, -1) != oldest_entry:
                return -3
            if dead:
                dead_entries = await pipe.zcard(keys.dead_index)
                dead_bytes = int(await pipe.get(keys.dead_bytes) or 0)
                if dead_entries + len(dead) > dl_max_entries or dead_bytes >= dl_max_bytes:
                    return -2
            args: list[Any] = [self._prefix, linger_ms, count_trigger, size_trigger, len(lanes)]
            for lane, (count, size, _) in lanes.items():
                args.append(lane)
                args.append(count)
                args.append(size)
            args.append(len(dead))
            for index, meta in dead:
                args.append(index)
                args.append(meta)
            pipe.multi()
            # EVAL, not EVALSHA: a NOSCRIPT error inside EXEC would not undo the rest.
            pipe.eval(_ROUTE_BOOKKEEPING, 0, *args)
            pipe.ltrim(keys.events, 0, -entry_count - 1)
            for lane, (_, _, blocks) in lanes.items():
                pipe.rpush(keys.lane(lane), *blocks)
            pipe.set(keys.routed, chunk_id)
            await pipe.execute()
        return 1

    async def count_legacy_lanes(self) -> int:
        return int(await self._count_legacy_lanes(args=[self._prefix]))

    async def return_claimed(self, instance: str) -> int:
        return int(await self._return_claimed(args=[self._prefix, instance]))

    async def schedule(
        self, instance: str, ttl_ms: int, max_lanes: int, horizon_ms: int = 0, skip_retrying: bool = False
    ) -> Schedule:
        now, next_due, lanes = await self._schedule(
            args=[self._prefix, instance, ttl_ms, max_lanes, horizon_ms, 1 if skip_retrying else 0]
        )
        leased = [(lanes[i].decode(), lanes[i + 1].decode()) for i in range(0, len(lanes), 2)]
        return Schedule(int(now), None if int(next_due) < 0 else int(next_due), leased)

    async def peek(
        self, token: str, lane: str, max_count: int, max_bytes: int, events_per_block: float = 8.0,
        bytes_per_block: float = MAX_BLOCK_BYTES,
    ) -> Peek:
        """Read the prefix of a lane that fits one request, under the lease `token`.

        Reading takes no script: only the lease owner pops a lane, and the ack checks the
        lease again, so a read that races a lost lease changes nothing in Redis.
        `events_per_block` and `bytes_per_block` (means of earlier reads) size the first
        read to one round trip without reading far more bytes than one request holds.
        """
        keys = self.keys
        page = max(2, min(
            MAX_READ_BLOCKS,
            ceil(max_count / max(events_per_block, 1.0)) + 1,
            ceil(max_bytes / max(bytes_per_block, 1.0)) + 1,
        ))
        key = keys.lane(lane)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.get(keys.lease(lane))
            pipe.hget(keys.attempts, lane)
            pipe.time()
            pipe.lrange(key, 0, page - 1)
            owner, attempts, (seconds, microseconds), elements = await pipe.execute()
        now_ms = seconds * 1000 + microseconds // 1000
        if owner is None or owner.decode() != token:
            return Peek(-1, now_ms, 0, None, None, _EMPTY_PREFIX, 0, 0)
        blocks: list[Block] = [decode_block(element) for element in elements]
        events = sum(block.count for block in blocks)
        size = sum(len(element) for element in elements)
        while len(elements) == page and events < max_count and size < max_bytes:
            start = len(blocks)
            page = min(MAX_READ_BLOCKS, page * 2)
            elements = await self.client.lrange(key, start, start + page - 1)
            for element in elements:
                block = decode_block(element)
                blocks.append(block)
                events += block.count
                size += len(element)
        tries, first, last = 0, None, None
        if attempts:
            parts = attempts.decode().split(",")
            tries, first, last = int(parts[0]), int(parts[1]), int(parts[2])
        prefix = take_prefix(blocks, max_count, max_bytes)
        return Peek(1, now_ms, tries, first, last, prefix, len(blocks), size)

    async def ack(
        self, instance: str, lane: str, ack_id: str, prefix: Prefix, pop: bool, linger_deadline_ms: int,
        count_trigger: int, size_trigger: int, dl_max_entries: int, dl_max_bytes: int, ttl_ms: int,
        keep_lease: bool, state_json: bytes, dead: list[tuple[bytes, bytes]], back: tuple[bytes, int, int],
        keep_failure_start: bool = False,
    ) -> tuple[int, int]:
        """Pop `prefix` when `pop`, and write the dead letters (envelope, meta).

        `back` is (block, events, bytes) of the events to dead-letter, pushed back at the
        head when the dead-letter store has no room for them.
        """
        pop_events = prefix.count if pop else 0
        args: list[Any] = [
            self._prefix, instance, lane, ack_id, pop_events,
            # The same measure the route script added per event: data bytes plus a comma.
            prefix.data_bytes + prefix.count if pop else 0,
            linger_deadline_ms, count_trigger, size_trigger, dl_max_entries, dl_max_bytes, ttl_ms,
            1 if keep_lease else 0, state_json, 1 if keep_failure_start else 0,
            prefix.whole_blocks if pop else 0, prefix.remainder if pop else b"", *back, len(dead),
        ]
        for envelope, meta in dead:
            args.append(envelope)
            args.append(meta)
        status, now = await self._ack(args=args)
        return int(status), int(now)

    async def retry_later(
        self, instance: str, lane: str, delay_ms: int, count_attempt: bool, state_json: bytes
    ) -> tuple[int, int, int]:
        attempts, first, now = await self._retry(
            args=[self._prefix, instance, lane, delay_ms, 1 if count_attempt else 0, state_json]
        )
        return int(attempts), int(first), int(now)

    async def renew(self, instance: str, ttl_ms: int, info_json: bytes, active_lanes: list[str]) -> list[str]:
        lost = await self._renew(args=[self._prefix, instance, ttl_ms, info_json, *active_lanes])
        return [lane.decode() for lane in lost]

    async def release_instance(self, instance: str) -> int:
        return int(await self._release_instance(args=[self._prefix, instance]))

    async def release_instance_lane(self, instance: str, lane: str) -> int:
        return int(await self._release_lane(args=[self._prefix, instance, lane]))

    async def make_due_now(self, lanes: list[str]) -> int:
        if not lanes:
            return 0
        return int(await self._due_now(args=[self._prefix, *lanes]))

    async def make_due_by(self, due_ms: dict[str, float]) -> int:
        """Move each lane's due time to the given Redis time, only if it is sooner and the lane is due-listed."""
        return int(await self.client.zadd(self.keys.due, due_ms, xx=True, lt=True))

    async def sweep_stranded_lanes(self) -> int:
        return int(await self._sweep(args=[self._prefix]))

    async def replay_dead(self, ids: list[int]) -> int:
        if not ids:
            return 0
        return int(await self._remove_dead(args=[self._prefix, "replay", *ids]))

    async def purge_dead(self, ids: list[int]) -> int:
        if not ids:
            return 0
        return int(await self._remove_dead(args=[self._prefix, "purge", *ids]))
