"""`jirafe-forwarder status`: one read-only snapshot of the pipeline in Redis.

Every figure comes from the keys documented in `forwarder.redis_store`. The command
sends only read commands (LLEN, GET, PTTL, HGETALL, ZRANGE, TIME and the like), so
it is safe to run against a production Redis at any time.

The delivery rate comes from the `delivered` total that each daemon writes into
`{p}:instances` at every lease renewal (every `lease.renew_interval_s`). One sample
cannot give a rate, and two samples a second apart usually straddle no renewal,
so status waits for each live instance's next renewal. It sees the renewal as a
jump of the heartbeat key's PTTL, and divides the growth of `delivered` by the
time between the two renewals. That takes up to one renewal interval plus a
second; `--no-rate` skips it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from forwarder.config import Config
from forwarder.envelope import split_lane
from forwarder.redis_store import Keys

EXIT_HEALTHY = 0
EXIT_ATTENTION = 1
EXIT_UNREACHABLE = 2

# Dead-letter metadata is read in pages of this many entries per round trip.
DEAD_PAGE = 1000
# Lanes are read in pages of this many lanes per round trip.
LANE_PAGE = 500
# Time between two looks at the heartbeat keys while waiting for renewals.
RATE_POLL_S = 0.1


@dataclass(slots=True)
class _InstanceSample:
    delivered: int
    # Redis time (ms) at which the instance last renewed, or None when unknown.
    renewed_ms: int | None


def collect(client: redis.Redis, config: Config, measure_rate: bool = True) -> dict[str, Any]:
    """Read the whole status from Redis and return it as JSON-ready data.

    Raises redis.exceptions.RedisError (or OSError) when Redis cannot be reached.
    """
    keys = Keys(config.redis.key_prefix)
    now_ms = _redis_time_ms(client)

    pipe = client.pipeline(transaction=False)
    pipe.llen(keys.events)
    pipe.llen(keys.claimed)
    pipe.get(keys.leader)
    pipe.pttl(keys.leader)
    pipe.hgetall(keys.instances)
    pipe.zrange(keys.due, 0, -1, withscores=True)
    pipe.hkeys(keys.lane_state)
    pipe.zcard(keys.dead_index)
    pipe.get(keys.dead_bytes)
    backlog, claimed, leader, leader_ttl, instance_rows, due_rows, state_lanes, dead_count, dead_bytes = (
        pipe.execute()
    )

    instances = _read_instances(client, keys, instance_rows, config)
    due = {member.decode(): int(score) for member, score in due_rows}
    lane_names = set(due) | {lane.decode() for lane in state_lanes}
    for instance in instances:
        lane_names.update(instance.pop("_owned"))
    lanes = _read_lanes(client, keys, sorted(lane_names), due, now_ms)

    dead = _read_dead(client, keys, int(dead_count), int(dead_bytes or 0), config)
    rate = _measure_rate(client, keys, instances, config) if measure_rate else None

    lane_backlog = sum(lane["backlog"] for lane in lanes)
    live = [instance for instance in instances if instance["live"]]
    status: dict[str, Any] = {
        "time_ms": now_ms,
        "redis": {"url": config.to_public_dict()["redis"]["url"], "key_prefix": config.redis.key_prefix},
        "queue": {"backlog": int(backlog), "claimed": int(claimed), "in_lanes": lane_backlog},
        "intake": {
            "leader": leader.decode() if leader is not None else None,
            "leader_ttl_ms": int(leader_ttl) if leader is not None and int(leader_ttl) >= 0 else None,
        },
        "instances": instances,
        "live_instances": len(live),
        "rate": rate,
        "lanes": lanes,
        "lane_totals": {
            "lanes": len(lanes),
            "backlog": lane_backlog,
            "paused": sum(1 for lane in lanes if lane["state"] == "paused"),
            "retrying": sum(1 for lane in lanes if lane["state"] == "retrying"),
        },
        "dead_letters": dead,
    }
    problems, notices = _assess(status)
    status["healthy"] = not problems
    status["problems"] = problems
    status["notices"] = notices
    return status


def exit_code(status: dict[str, Any]) -> int:
    return EXIT_HEALTHY if status["healthy"] else EXIT_ATTENTION


def _redis_time_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _read_instances(
    client: redis.Redis, keys: Keys, rows: dict[bytes, bytes], config: Config
) -> list[dict[str, Any]]:
    ids = sorted(raw_id.decode() for raw_id in rows)
    pipe = client.pipeline(transaction=False)
    for instance_id in ids:
        pipe.pttl(keys.heartbeat(instance_id))
        pipe.smembers(f"{keys.heartbeat(instance_id)}:lanes")
    replies = pipe.execute()
    instances = []
    for position, instance_id in enumerate(ids):
        heartbeat_ttl = int(replies[2 * position])
        owned = sorted(lane.decode() for lane in replies[2 * position + 1])
        try:
            info = orjson.loads(rows[instance_id.encode()])
        except orjson.JSONDecodeError:
            info = {}
        if not isinstance(info, dict):
            info = {}
        # PTTL is -2 for a missing key: the instance stopped renewing (it died or
        # hangs), and a live instance's reaper releases its claims.
        live = heartbeat_ttl != -2
        instances.append(
            {
                "id": instance_id,
                "host": info.get("host"),
                "pid": info.get("pid"),
                "delivered": info.get("delivered"),
                "live": live,
                "heartbeat_ttl_ms": heartbeat_ttl if heartbeat_ttl >= 0 else None,
                "lanes_leased": len(owned),
                "_owned": owned,
            }
        )
    return instances


def _read_lanes(
    client: redis.Redis, keys: Keys, names: list[str], due: dict[str, int], now_ms: int
) -> list[dict[str, Any]]:
    lanes = []
    for offset in range(0, len(names), LANE_PAGE):
        page = names[offset : offset + LANE_PAGE]
        pipe = client.pipeline(transaction=False)
        for lane in page:
            pipe.hget(keys.lane_count, lane)
            pipe.hget(keys.attempts, lane)
            pipe.hget(keys.lane_state, lane)
            pipe.get(keys.lease(lane))
        replies = pipe.execute()
        for position, lane in enumerate(page):
            length, attempts_record, state_record, owner = replies[4 * position : 4 * position + 4]
            lanes.append(_lane_entry(lane, int(length or 0), attempts_record, state_record, owner, due, now_ms))
    # Lanes that need a look first, then the largest backlogs.
    order = {"paused": 0, "retrying": 1}
    lanes.sort(key=lambda lane: (order.get(lane["state"] or "", 2), -lane["backlog"], lane["lane"]))
    return lanes


def _lane_entry(
    lane: str, length: int, attempts_record: bytes | None, state_record: bytes | None,
    owner: bytes | None, due: dict[str, int], now_ms: int,
) -> dict[str, Any]:
    site_id, kind = split_lane(lane)
    attempts, first_ms, last_ms = 0, None, None
    if attempts_record:
        # "attempts,first_ms,last_ms" of the lane's head, written by the retry script.
        parts = attempts_record.decode().split(",")
        if len(parts) == 3 and all(part.isdigit() for part in parts):
            attempts, first_ms, last_ms = int(parts[0]), int(parts[1]), int(parts[2])
    state: dict[str, Any] = {}
    if state_record:
        try:
            parsed = orjson.loads(state_record)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            state = parsed
    due_ms = due.get(lane)
    return {
        "lane": lane,
        "site_id": site_id,
        "kind": kind,
        # None until the lane's first request finished; the daemon writes the state then.
        "state": state.get("state"),
        "backlog": length,
        "next_due_ms": due_ms,
        "due_in_ms": None if due_ms is None else max(0, due_ms - now_ms),
        # The lease value is "<instance id>|<lease number>"; show the instance.
        "owner": owner.decode().rpartition("|")[0] or owner.decode() if owner is not None else None,
        "attempts": attempts,
        "first_attempt_ms": first_ms,
        "last_attempt_ms": last_ms,
        "last_success_ms": state.get("last_success_ms"),
        "last_error": state.get("last_error"),
    }


def _read_dead(
    client: redis.Redis, keys: Keys, count: int, size: int, config: Config
) -> dict[str, Any]:
    by_reason: dict[str, int] = {}
    by_site: dict[str, int] = {}
    start = 0
    while True:
        members = client.zrange(keys.dead_index, start, start + DEAD_PAGE - 1)
        if not members:
            break
        start += len(members)
        pipe = client.pipeline(transaction=False)
        for member in members:
            pipe.hget(keys.dead(member.decode()), "meta")
        for meta in pipe.execute():
            if meta is None:
                continue  # replayed or purged meanwhile
            try:
                record = orjson.loads(meta)
            except orjson.JSONDecodeError:
                record = {}
            reason = str(record.get("reason") or "unknown")
            site = str(record.get("site_id") or "unknown")
            by_reason[reason] = by_reason.get(reason, 0) + 1
            by_site[site] = by_site.get(site, 0) + 1
    limits = config.dead_letter
    # Once either limit is reached, the lanes cannot write a dead letter and the
    # intake stops reading the queue (read_chunk, route and ack in redis_store).
    full = count >= limits.max_entries or size >= limits.max_bytes
    return {
        "entries": count,
        "bytes": size,
        "max_entries": limits.max_entries,
        "max_bytes": limits.max_bytes,
        "fill_ratio": max(count / limits.max_entries, size / limits.max_bytes),
        "full": full,
        "by_reason": dict(sorted(by_reason.items(), key=lambda item: (-item[1], item[0]))),
        "by_site": dict(sorted(by_site.items(), key=lambda item: (-item[1], item[0]))),
    }


def _sample_instances(client: redis.Redis, keys: Keys, ids: list[str], ttl_ms: int) -> dict[str, _InstanceSample]:
    pipe = client.pipeline(transaction=False)
    pipe.time()
    for instance_id in ids:
        pipe.hget(keys.instances, instance_id)
        pipe.pttl(keys.heartbeat(instance_id))
    replies = pipe.execute()
    seconds, micros = replies[0]
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    samples = {}
    for position, instance_id in enumerate(ids):
        raw, pttl = replies[1 + 2 * position : 3 + 2 * position]
        try:
            delivered = int(orjson.loads(raw).get("delivered", 0)) if raw else 0
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            delivered = 0
        # The renewal set the heartbeat with a TTL of ttl_ms, so it happened
        # ttl_ms - PTTL ago. A wrong ttl_ms shifts every sample of the instance by
        # the same amount, so the time between two renewals is still right.
        renewed = now_ms - (ttl_ms - int(pttl)) if int(pttl) >= 0 else None
        samples[instance_id] = _InstanceSample(delivered, renewed)
    return samples


def _measure_rate(
    client: redis.Redis, keys: Keys, instances: list[dict[str, Any]], config: Config
) -> dict[str, Any]:
    """Measure delivered events per second between two renewals of each live instance."""
    ids = [instance["id"] for instance in instances if instance["live"]]
    ttl_ms = int(config.lease.ttl_s * 1000)
    method = "delivered between two lease renewals of each live instance"
    if not ids:
        return {"delivered_per_s": None, "window_s": None, "instances": 0, "method": method}

    first = _sample_instances(client, keys, ids, ttl_ms)
    deadline = time.monotonic() + config.lease.renew_interval_s + 1.0
    latest = first
    while time.monotonic() < deadline:
        renewed_everywhere = all(
            latest[instance_id].renewed_ms is not None
            and first[instance_id].renewed_ms is not None
            # A later renewal shows as a later renewal time; 50 ms absorbs the
            # rounding of PTTL and TIME.
            and latest[instance_id].renewed_ms > first[instance_id].renewed_ms + 50  # type: ignore[operator]
            for instance_id in ids
        )
        if renewed_everywhere:
            break
        time.sleep(RATE_POLL_S)
        latest = _sample_instances(client, keys, ids, ttl_ms)

    total_rate = 0.0
    measured = 0
    windows = []
    per_instance = {}
    for instance_id in ids:
        before, after = first[instance_id], latest[instance_id]
        if before.renewed_ms is None or after.renewed_ms is None or after.renewed_ms <= before.renewed_ms + 50:
            per_instance[instance_id] = None
            continue
        window_s = (after.renewed_ms - before.renewed_ms) / 1000
        rate = max(0, after.delivered - before.delivered) / window_s
        per_instance[instance_id] = round(rate, 1)
        total_rate += rate
        measured += 1
        windows.append(window_s)

    for instance in instances:
        if instance["id"] in per_instance:
            instance["delivered_per_s"] = per_instance[instance["id"]]
            # The total as of the latest renewal, which the rate ends with.
            instance["delivered"] = latest[instance["id"]].delivered
    return {
        "delivered_per_s": round(total_rate, 1) if measured else None,
        "window_s": round(max(windows), 3) if windows else None,
        "instances": measured,
        "method": method,
    }


def _assess(status: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Return the problems (exit code 1) and the notices (for information) of a status."""
    problems: list[str] = []
    notices: list[str] = []
    for lane in status["lanes"]:
        if lane["state"] == "paused":
            error = lane["last_error"] or "no reason recorded"
            if "(HTTP 404)" in error or "(HTTP 405)" in error:
                fix = ("Check api.base_url (it must end in /v2), then run 'systemctl restart"
                       " jirafe-forwarder': a reload does not change the base URL")
            else:
                fix = ("Fix the site's token, then run 'systemctl restart jirafe-forwarder' (or reload,"
                       " for a token that is not a systemd credential)")
            problems.append(
                f"site {lane['site_id']} ({lane['kind']} lane) is paused: {error};"
                f" {lane['backlog']} events wait in Redis. {fix}"
            )

    dead = status["dead_letters"]
    if dead["full"]:
        problems.append(
            f"dead-letter store is full ({dead['entries']} of {dead['max_entries']} entries,"
            f" {dead['bytes']} of {dead['max_bytes']} bytes): intake is stopped. Inspect with"
            " 'jirafe-forwarder dead list', then 'dead replay' or 'dead purge'"
        )

    queue = status["queue"]
    waiting = queue["backlog"] + queue["claimed"] + queue["in_lanes"]
    if status["live_instances"] == 0 and waiting > 0:
        problems.append(
            f"no live forwarder instance, and {waiting} events wait in Redis:"
            " start the service ('systemctl start jirafe-forwarder')"
        )

    retrying = status["lane_totals"]["retrying"]
    if retrying:
        notices.append(f"{retrying} lane(s) retrying with backoff")
    for instance in status["instances"]:
        if not instance["live"]:
            notices.append(
                f"instance {instance['id']} stopped renewing its heartbeat; a live instance"
                " releases its claims"
            )
    return problems, notices


# ------------------------------------------------------------------ text output

_LANE_COLUMNS = ("SITE", "LANE", "STATE", "BACKLOG", "NEXT DUE", "ATTEMPTS", "LAST SUCCESS", "LAST ERROR")


def render(status: dict[str, Any], max_lanes: int = 20) -> str:
    """Format a status for a terminal; `max_lanes` 0 lists every lane."""
    now_ms = status["time_ms"]
    lines = [
        f"jirafe-forwarder status: {status['redis']['url']}, key prefix {status['redis']['key_prefix']},"
        f" at {_utc(now_ms)} (Redis time)",
        "",
    ]
    if status["healthy"]:
        lines.append("health:       OK")
    else:
        lines.append("health:       NEEDS ATTENTION")
        lines.extend(f"  - {problem}" for problem in status["problems"])
    lines.extend(f"  note: {notice}" for notice in status["notices"])

    queue = status["queue"]
    lines.append(
        f"queue:        {queue['backlog']} events waiting, {queue['claimed']} claimed by the intake,"
        f" {queue['in_lanes']} in site lanes"
    )
    intake = status["intake"]
    if intake["leader"] is None:
        lines.append("intake:       no leader")
    else:
        lines.append(f"intake:       leader {intake['leader']} (lease {_seconds(intake['leader_ttl_ms'])} left)")

    lines.append(f"instances:    {status['live_instances']} live")
    for instance in status["instances"]:
        heartbeat = (
            f"heartbeat {_seconds(instance['heartbeat_ttl_ms'])} left" if instance["live"] else "NOT RENEWING"
        )
        rate = instance.get("delivered_per_s")
        rate_text = f", {rate:g} events/s" if rate is not None else ""
        lines.append(
            f"  {instance['id']}  host {instance['host']} pid {instance['pid']}, {heartbeat},"
            f" {instance['lanes_leased']} lanes leased, {instance['delivered']} delivered at its last renewal{rate_text}"
        )

    rate = status["rate"]
    if rate is None:
        lines.append("delivery:     not measured (--no-rate)")
    elif rate["instances"] == 0 and status["live_instances"] == 0:
        lines.append("delivery:     no live instance")
    elif rate["delivered_per_s"] is None:
        lines.append("delivery:     not measured: no live instance renewed its lease during the wait")
    else:
        lines.append(
            f"delivery:     {rate['delivered_per_s']:g} events/s accepted by the API"
            f" (between lease renewals, over {rate['window_s']:g} s)"
        )

    totals = status["lane_totals"]
    lines.append(
        f"lanes:        {totals['lanes']} known, {totals['paused']} paused, {totals['retrying']} retrying,"
        f" {totals['backlog']} events queued"
    )
    listed = status["lanes"] if max_lanes <= 0 else status["lanes"][:max_lanes]
    if listed:
        rows = [_LANE_COLUMNS, *(_lane_row(lane, now_ms) for lane in listed)]
        widths = [max(len(row[column]) for row in rows) for column in range(len(_LANE_COLUMNS) - 1)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
            lines.append("  " + "  ".join([*cells, row[-1]]).rstrip())
    hidden = len(status["lanes"]) - len(listed)
    if hidden > 0:
        lines.append(f"  ... {hidden} more lanes with smaller backlogs (--lanes 0 lists all)")

    dead = status["dead_letters"]
    full = "  FULL: intake stopped" if dead["full"] else ""
    lines.append(
        f"dead letters: {dead['entries']} of {dead['max_entries']} entries,"
        f" {_size(dead['bytes'])} of {_size(dead['max_bytes'])} ({dead['fill_ratio']:.1%} full){full}"
    )
    if dead["by_reason"]:
        lines.append("  by reason:  " + ", ".join(f"{reason} {count}" for reason, count in dead["by_reason"].items()))
        lines.append("  by site:    " + ", ".join(f"{site} {count}" for site, count in dead["by_site"].items()))
    return "\n".join(lines) + "\n"


def _lane_row(lane: dict[str, Any], now_ms: int) -> tuple[str, ...]:
    if lane["owner"] is not None:
        due = "sending"
    elif lane["due_in_ms"] is None:
        due = "-"
    elif lane["due_in_ms"] == 0:
        due = "now"
    else:
        due = f"in {_seconds(lane['due_in_ms'])}"
    success = lane["last_success_ms"]
    return (
        lane["site_id"],
        lane["kind"],
        lane["state"] or "new",
        str(lane["backlog"]),
        due,
        str(lane["attempts"]),
        f"{_seconds(now_ms - success)} ago" if isinstance(success, int) else "never",
        lane["last_error"] or "-",
    )


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _seconds(ms: int | None) -> str:
    if ms is None:
        return "?"
    seconds = ms / 1000
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
