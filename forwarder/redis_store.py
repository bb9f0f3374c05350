"""The Redis side: every key the daemon uses and the Lua scripts that change them.

Data flow, each step one atomic script so that a crash between any two leaves every
event in exactly one place:

    {p}:events            producers LPUSH; the oldest entry is at the right end
      -> claim            the intake leader moves a chunk to {p}:intake:claimed
      -> route            parsed entries go to per-lane lists {p}:lane:<site>:<kind>
                          (envelope problems go to the dead-letter store instead)
      -> peek / ack       the lane's lease owner reads a prefix, sends it, and only
                          then pops it (ack) or moves elements to dead letters

Keys (p is `redis.key_prefix`; a prefix in braces keeps every key in one cluster slot):
    {p}:events              list, the producer queue
    {p}:intake:claimed      list, entries claimed by the intake leader, not yet routed
    {p}:intake:leader       string with TTL, the instance id of the intake leader
    {p}:intake:routed       string, id of the last routed chunk (makes route idempotent)
    {p}:lane:<lane>         list of items (envelope.ITEM_HEADER + producer bytes)
    {p}:lease:<lane>        string with TTL, the lease token ("<instance id>|<n>") of the owner
    {p}:lanes:lease_seq     counter that makes each lease token unique
    {p}:lanes:due           zset lane -> Redis time (ms) when the lane should be sent
    {p}:lanes:bytes         hash lane -> approximate bytes queued (size trigger only)
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
from typing import Any

import redis.asyncio as aioredis

from forwarder.envelope import BATCH_TYPES, EVENT_TYPES, ITEM_HEADER_SIZE

# Lua: `"type":[` plus `]` for each batch type index (1-based in Lua), as in batch.py.
_OVERHEAD_LUA = "{" + ",".join(str(len(name) + 5) for name in BATCH_TYPES) + "}"
_TRACKER_FIRST_INDEX = len(BATCH_TYPES)
assert len(EVENT_TYPES) < 256

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

# ARGV: prefix, instance, max_count, dl_max_entries, dl_max_bytes, max_entry_bytes, ttl_ms
# Returns {status, items, oversized}: 1 with the chunk to route (left-over claimed entries
# first), -1 when not the leader, -2 when the dead-letter store is full and nothing is
# claimed; oversized counts entries dead-lettered here for exceeding max_entry_bytes.
_CLAIM = _COMMON + r"""
local inst = ARGV[2]
local max_count = tonumber(ARGV[3])
local leader = p .. ':intake:leader'
if redis.call('GET', leader) ~= inst then return {-1, {}, 0} end
redis.call('PEXPIRE', leader, tonumber(ARGV[7]))
local claimed = p .. ':intake:claimed'
local max_entry = tonumber(ARGV[6])
local oversized = 0
local now = nil
local function dead_oversized(v)
  -- An entry this large can never be sent; keep it out of the daemon's memory. The
  -- site and type are read with a pattern, best effort, so operators can filter.
  now = now or now_ms()
  local site = string.match(string.sub(v, 1, 4096), '"site_id"%s*:%s*"?(%d+)')
  local event_type = string.match(string.sub(v, 1, 4096), '"type"%s*:%s*"([%w%.]+)"')
  dead_letter(v, cjson.encode({reason = 'event_too_large', size = #v, site_id = site or cjson.null,
    type = event_type or cjson.null, status = cjson.null, attempts = 0,
    detail = 'queue entry of ' .. #v .. ' bytes exceeds ' .. max_entry .. ' bytes'}), now)
  oversized = oversized + 1
end
local items = {}
local leftover = redis.call('LRANGE', claimed, 0, -1)
if #leftover > 0 then
  -- Left by a crashed leader or moved here by BLMOVE: check sizes like fresh entries.
  local kept = {}
  for i = 1, #leftover do
    if #leftover[i] > max_entry then dead_oversized(leftover[i]) else kept[#kept + 1] = leftover[i] end
  end
  if oversized > 0 then
    redis.call('DEL', claimed)
    for i = 1, #kept do redis.call('RPUSH', claimed, kept[i]) end
  end
  -- All of them, even past max_count: route requires the whole claimed list.
  items = kept
end
local want = max_count - #items
if want <= 0 then return {1, items, oversized} end
-- Each entry can become at most one dead letter, so claiming no more entries than the
-- store has room for keeps it within max_entries without ever evicting.
local room = tonumber(ARGV[4]) - redis.call('ZCARD', p .. ':dead:index')
if room <= 0 or dead_full(0, tonumber(ARGV[4]), tonumber(ARGV[5])) then
  if #items == 0 then return {-2, {}, oversized} end
  return {1, items, oversized}
end
want = math.min(want, room)
local popped = redis.call('RPOP', p .. ':events', want)
if not popped then return {1, items, oversized} end
local fresh = {}
for i = 1, #popped do
  local v = popped[i]
  if #v > max_entry then
    dead_oversized(v)
  else
    fresh[#fresh + 1] = v
    items[#items + 1] = v
  end
end
-- One RPUSH per slice instead of one per entry; unpack() is bounded by Lua's stack.
for start = 1, #fresh, 1000 do
  redis.call('RPUSH', claimed, unpack(fresh, start, math.min(start + 999, #fresh)))
end
return {1, items, oversized}
"""

# ARGV: prefix, instance, chunk_id, claimed_count, linger_ms, count_trigger, size_trigger,
#       dl_max_entries, dl_max_bytes, lane_count, then per lane: name, item count, bytes,
#       packed (per event: index in the claimed list as 2 bytes, then the 9-byte item
#       header); then dead count, then per dead letter: index in the claimed list, meta JSON.
# Returns 1 when routed, 0 when this chunk was routed already, -1 when not the leader,
# -2 when the dead letters do not fit in the store (nothing done), -3 when the claimed
# list does not hold the chunk the caller parsed.
_ROUTE = _COMMON + r"""
local inst = ARGV[2]
if redis.call('GET', p .. ':intake:leader') ~= inst then return -1 end
local routed = p .. ':intake:routed'
if redis.call('GET', routed) == ARGV[3] then return 0 end
local claimed = p .. ':intake:claimed'
if redis.call('LLEN', claimed) ~= tonumber(ARGV[4]) then return -3 end
local dead_at = 11 + 4 * tonumber(ARGV[10])
local dead_count = tonumber(ARGV[dead_at])
if dead_count > 0 and dead_full(dead_count, tonumber(ARGV[8]), tonumber(ARGV[9])) then
  return -2
end
local now = now_ms()
local linger = tonumber(ARGV[5])
local count_trigger = tonumber(ARGV[6])
local size_trigger = tonumber(ARGV[7])
local due = p .. ':lanes:due'
local entries = redis.call('LRANGE', claimed, 0, -1)
local pos = 11
for _ = 1, tonumber(ARGV[10]) do
  local lane = ARGV[pos]
  local count = tonumber(ARGV[pos + 1])
  local bytes = tonumber(ARGV[pos + 2])
  local packed = ARGV[pos + 3]
  pos = pos + 4
  -- Each event is 2 bytes of index into the claimed list and its 9-byte item header;
  -- the entry's bytes are taken from the claimed list here rather than sent back.
  local items = {}
  for j = 0, count - 1 do
    local base = 1 + j * 11
    local index = struct.unpack('>H', packed, base)
    items[j + 1] = string.sub(packed, base + 2, base + 10) .. entries[index + 1]
  end
  local length = 0
  for first = 1, count, 1000 do
    length = redis.call('RPUSH', p .. ':lane:' .. lane, unpack(items, first, math.min(first + 999, count)))
  end
  local total = redis.call('HINCRBY', p .. ':lanes:bytes', lane, bytes)
  redis.call('ZADD', due, 'NX', now + linger, lane)
  -- A full lane is sent at once, unless it is backing off (it has an attempts
  -- record): new events must not cut a retry delay or a pause short.
  if (length >= count_trigger or total >= size_trigger)
      and redis.call('HEXISTS', p .. ':lanes:attempts', lane) == 0 then
    redis.call('ZADD', due, 'LT', now, lane)
  end
end
pos = pos + 1
for _ = 1, dead_count do
  dead_letter(entries[tonumber(ARGV[pos]) + 1], ARGV[pos + 1], now)
  pos = pos + 2
end
redis.call('DEL', claimed)
redis.call('SET', routed, ARGV[3])
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

# ARGV: prefix, lease token, lane, max_count, max_bytes
# Reads the longest prefix of the lane whose batch body fits max_bytes (always at least
# one event, which may be too large on its own), and returns the events' `data` bytes
# grouped by type, so that the caller assembles the body without touching each event:
#   {status, now_ms, body_bytes, attempts record or '', count, type_sequence,
#    data_bytes, groups}
# status is 1, or -1 when the lease is not ours. type_sequence has one byte (the type
# index) per event in lane order, data_bytes is the sum of the data lengths, and groups
# is a flat list of type index, list of data, in ascending type index.
_PEEK = _COMMON + r"""
local overhead = """ + _OVERHEAD_LUA + r"""
local token = ARGV[2]
local lane = ARGV[3]
local max_count = tonumber(ARGV[4])
local max_bytes = tonumber(ARGV[5])
if redis.call('GET', p .. ':lease:' .. lane) ~= token then return {-1, 0, 0, '', 0, '', 0, {}} end
local key = p .. ':lane:' .. lane
local count = 0
local data_by_type = {}
local types = {}
local size = 2
local data_bytes = 0
local start = 0
local full = false
while not full and count < max_count do
  local page = math.min(200, max_count - count)
  local chunk = redis.call('LRANGE', key, start, start + page - 1)
  if #chunk == 0 then break end
  for i = 1, #chunk do
    local v = chunk[i]
    local t, offset, length = struct.unpack('>BI4I4', v)
    local group = data_by_type[t]
    local add
    if t >= """ + str(_TRACKER_FIRST_INDEX) + r""" then
      add = length - 2
    elseif group then
      add = length + 1
    else
      add = length + overhead[t + 1]
      if next(data_by_type) then add = add + 1 end
    end
    if count > 0 and size + add > max_bytes then full = true break end
    if not group then
      group = {}
      data_by_type[t] = group
    end
    size = size + add
    data_bytes = data_bytes + length
    count = count + 1
    group[#group + 1] = string.sub(v, """ + str(ITEM_HEADER_SIZE + 1) + r""" + offset, """ + str(ITEM_HEADER_SIZE) + r""" + offset + length)
    types[count] = string.char(t)
    if count >= max_count then break end
  end
  start = start + #chunk
end
local groups = {}
for t = 0, """ + str(len(EVENT_TYPES) - 1) + r""" do
  if data_by_type[t] then
    groups[#groups + 1] = t
    groups[#groups + 1] = data_by_type[t]
  end
end
local attempts = redis.call('HGET', p .. ':lanes:attempts', lane) or ''
return {1, now_ms(), size, attempts, count, table.concat(types), data_bytes, groups}
"""

# ARGV: prefix, lease token, lane, ack_id, pop_count, popped_bytes, linger_deadline_ms,
#       count_trigger, size_trigger, dl_max_entries, dl_max_bytes, ttl_ms, keep_lease,
#       state_json, keep_failure_start (0/1), dead_count, then per dead letter: index in
#       the lane, meta JSON.
# Returns {status, now_ms}: 0 lane empty and released, 1 lease kept for the next batch,
# 3 released with the rest due at the linger deadline, -1 lease lost (nothing done),
# -2 dead-letter store full (the prefix popped but for the events to dead-letter, which
# are back at the head and wait; the lease is kept). A repeated ack_id returns the
# first status.
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
local dead_count = tonumber(ARGV[16])
local key = p .. ':lane:' .. lane
local now = now_ms()
if dead_count > 0 and dead_full(dead_count, tonumber(ARGV[10]), tonumber(ARGV[11])) then
  -- No room for these dead letters: pop the prefix anyway, because the API accepted
  -- its other events and resending them would duplicate them, and put the failed
  -- events back at the head, in order, to wait until the store has room.
  local failed = {}
  local back_bytes = 0
  for i = 0, dead_count - 1 do
    local item = redis.call('LINDEX', key, tonumber(ARGV[17 + 2 * i]))
    local _, _, length = struct.unpack('>BI4I4', item)
    failed[#failed + 1] = item
    back_bytes = back_bytes + length + 1
  end
  redis.call('LTRIM', key, tonumber(ARGV[5]), -1)
  for i = #failed, 1, -1 do redis.call('LPUSH', key, failed[i]) end
  redis.call('HINCRBY', p .. ':lanes:bytes', lane, string.format('%d', back_bytes - tonumber(ARGV[6])))
  redis.call('HSET', acked, lane, ack_id .. '|-2')
  return {-2, now}
end
local pos = 17
for _ = 1, dead_count do
  local item = redis.call('LINDEX', key, tonumber(ARGV[pos]))
  dead_letter(string.sub(item, """ + str(ITEM_HEADER_SIZE + 1) + r"""), ARGV[pos + 1], now)
  pos = pos + 2
end
local pop_count = tonumber(ARGV[5])
if pop_count > 0 then
  redis.call('LTRIM', key, pop_count, -1)
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
local bytes_key = p .. ':lanes:bytes'
-- string.format: Lua writes -0 as "-0", which Redis rejects as an integer.
local total = redis.call('HINCRBY', bytes_key, lane, string.format('%d', -tonumber(ARGV[6])))
local remaining = redis.call('LLEN', key)
local due = p .. ':lanes:due'
local owned = p .. ':instance:' .. inst .. ':lanes'
if remaining == 0 then
  redis.call('DEL', lease)
  redis.call('ZREM', due, lane)
  redis.call('SREM', owned, lane)
  redis.call('HDEL', bytes_key, lane)
  redis.call('HSET', acked, lane, ack_id .. '|0')
  return {0, now}
end
if ARGV[13] == '1' or remaining >= tonumber(ARGV[8]) or total >= tonumber(ARGV[9]) then
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
        self.due = f"{prefix}:lanes:due"
        self.lane_bytes = f"{prefix}:lanes:bytes"
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
    body_bytes: int
    attempts: int
    first_attempt_ms: int | None
    last_attempt_ms: int | None
    count: int
    # One byte per event in lane order: its index into EVENT_TYPES.
    type_sequence: bytes
    data_bytes: int
    # (type index, data of each event of that type in lane order), ascending type index.
    groups: list[tuple[int, list[bytes]]]


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
        self._claim = client.register_script(_CLAIM)
        self._route = client.register_script(_ROUTE)
        self._return_claimed = client.register_script(_RETURN_CLAIMED)
        self._schedule = client.register_script(_SCHEDULE)
        self._peek = client.register_script(_PEEK)
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

    async def claim(
        self, instance: str, max_count: int, dl_max_entries: int, dl_max_bytes: int,
        max_entry_bytes: int, ttl_ms: int,
    ) -> tuple[int, list[bytes], int]:
        status, items, oversized = await self._claim(
            args=[self._prefix, instance, max_count, dl_max_entries, dl_max_bytes, max_entry_bytes, ttl_ms]
        )
        return int(status), items, int(oversized)

    async def route(
        self, instance: str, chunk_id: str, claimed_count: int, linger_ms: int,
        count_trigger: int, size_trigger: int, dl_max_entries: int, dl_max_bytes: int,
        lanes: dict[str, Any], dead: list[tuple[int, bytes]],
    ) -> int:
        args: list[Any] = [
            self._prefix, instance, chunk_id, claimed_count, linger_ms, count_trigger, size_trigger,
            dl_max_entries, dl_max_bytes, len(lanes),
        ]
        for lane, (count, size, packed) in lanes.items():
            args.append(lane)
            args.append(count)
            args.append(size)
            args.append(bytes(packed))
        args.append(len(dead))
        for index, meta in dead:
            args.append(index)
            args.append(meta)
        return int(await self._route(args=args))

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

    async def peek(self, instance: str, lane: str, max_count: int, max_bytes: int) -> Peek:
        status, now, size, attempts, count, type_sequence, data_bytes, flat = await self._peek(
            args=[self._prefix, instance, lane, max_count, max_bytes]
        )
        tries, first, last = 0, None, None
        if attempts:
            parts = attempts.decode().split(",")
            tries, first, last = int(parts[0]), int(parts[1]), int(parts[2])
        groups = [(int(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]
        return Peek(int(status), int(now), int(size), tries, first, last, int(count), type_sequence,
                    int(data_bytes), groups)

    async def lane_items(self, lane: str, count: int) -> list[bytes]:
        """Return the first `count` items of a lane (header and envelope), for failure paths."""
        return await self.client.lrange(self.keys.lane(lane), 0, count - 1)

    async def ack(
        self, instance: str, lane: str, ack_id: str, pop_count: int, popped_bytes: int,
        linger_deadline_ms: int, count_trigger: int, size_trigger: int,
        dl_max_entries: int, dl_max_bytes: int, ttl_ms: int, keep_lease: bool,
        state_json: bytes, dead: list[tuple[int, bytes]], keep_failure_start: bool = False,
    ) -> tuple[int, int]:
        args: list[Any] = [
            self._prefix, instance, lane, ack_id, pop_count, popped_bytes, linger_deadline_ms,
            count_trigger, size_trigger, dl_max_entries, dl_max_bytes, ttl_ms,
            1 if keep_lease else 0, state_json, 1 if keep_failure_start else 0, len(dead),
        ]
        for index, meta in dead:
            args.append(index)
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
