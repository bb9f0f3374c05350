"""Medians of repeated runs, the tables printed after a run, and the py-spy profile summary."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

SINK_MODE = "sink: sandbox counting mode (validate=False, record=count)"


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the first run with each numeric field replaced by the median over `runs`."""
    merged = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        values = [run[key] for run in runs if isinstance(run.get(key), int | float)]
        if values:
            merged[key] = round(statistics.median(values), 3)
    merged["runs"] = len(runs)
    merged["complete"] = all(run.get("complete") for run in runs)
    return merged


def group_medians(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        if "error_text" in result:
            continue
        groups[(result["scenario"], result["contender"])].append(result)
    return [median_of(runs) for runs in groups.values()]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _settings(row: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in row["settings"].items()) or "defaults"


def drain_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| process | settings | events | events/s | CPU µs/event | peak RSS MB | Redis CPU µs/event "
        "| sink CPU µs/event | other load, cores | requests | runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mark = "" if row["complete"] else " (incomplete)"
        lines.append(
            f"| {row['contender']}{mark} | {_settings(row)} | {_fmt(row['events'])} "
            f"| {_fmt(row['events_per_s'], 0)} | {_fmt(row['cpu_us_per_event'])} "
            f"| {_fmt(row['peak_rss_mb'])} | {_fmt(row['redis_cpu_us_per_event'])} "
            f"| {_fmt(row['sink_cpu_us_per_event'])} | {_fmt(row.get('other_cores'), 2)} "
            f"| {_fmt(row['requests'])} | {row['runs']} |"
        )
    return "\n".join(lines)


def ratio_table(rows: list[dict[str, Any]]) -> str:
    """Product figures as ratios to each peer of the same scenario and run."""
    product = next((row for row in rows if row["contender"] == "product"), None)
    peers = [row for row in rows if not row["contender"].startswith("product")]
    if product is None or not peers:
        return ""
    lines = [
        "| peer | product events/s ÷ peer | peer CPU/event ÷ product | product RSS MB / peer RSS MB |",
        "|---|---:|---:|---|",
    ]
    for row in peers:
        speed = product["events_per_s"] / row["events_per_s"] if row["events_per_s"] else None
        cpu = row["cpu_us_per_event"] / product["cpu_us_per_event"] if product["cpu_us_per_event"] else None
        lines.append(
            # \u00d7 is the multiplication sign: the cells read as ratios, such as 4.9 times.
            f"| {row['contender']} | {_fmt(speed, 2)}\u00d7 | {_fmt(cpu, 2)}\u00d7 "
            f"| {_fmt(product['peak_rss_mb'])} / {_fmt(row['peak_rss_mb'])} |"
        )
    return "\n".join(lines)


def steady_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | rate/s | sites | events | latency p50 ms | p99 ms | max ms | per-site p99 ms "
        "(min / median / max) | slowest first event ms | all sites reached s | CPU µs/event "
        "| mean RSS MB | peak RSS MB | machine load, cores | runs |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['scenario']} | {_fmt(row['rate'], 0)} | {row['sites']} | {_fmt(row['accepted'])} "
            f"| {_fmt(row['latency_ms_p50'])} | {_fmt(row['latency_ms_p99'])} "
            f"| {_fmt(row['latency_ms_max'])} | {_fmt(row['site_p99_ms_min'])} / "
            f"{_fmt(row['site_p99_ms_median'])} / {_fmt(row['site_p99_ms_max'])} "
            f"| {_fmt(row['first_event_latency_ms_max'])} | {_fmt(row['all_sites_first_batch_s'], 2)} "
            f"| {_fmt(row['cpu_us_per_event'])} | {_fmt(row['mean_rss_mb'])} | {_fmt(row['peak_rss_mb'])} "
            f"| {_fmt(row.get('machine_cores'), 2)} | {row['runs']} |"
        )
    return "\n".join(lines)


def outage_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| rate/s | outage s | backlog at recovery | first delivery after recovery s | catch-up s "
        "| catch-up events/s | RSS MB before / during max / after max / final | peak RSS MB "
        "| 503s | dead letters | all delivered | runs |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {_fmt(row['rate'], 0)} | {_fmt(row['outage_s'], 0)} | {_fmt(row['backlog_at_recovery'], 0)} "
            f"| {_fmt(row['first_delivery_after_recovery_s'], 2)} | {_fmt(row['catch_up_s'], 2)} "
            f"| {_fmt(row['catch_up_events_per_s'], 0)} | {_fmt(row['rss_mb_before'])} / "
            f"{_fmt(row['rss_mb_during_max'])} / {_fmt(row['rss_mb_after_max'])} / {_fmt(row['rss_mb_final'])} "
            f"| {_fmt(row['peak_rss_mb'])} | {_fmt(row['status_503'], 0)} | {_fmt(row['dead_letters'], 0)} "
            f"| {'yes' if row['complete'] else 'no'} | {row['runs']} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------- profiles


def summarize_profile(path: Path, top: int = 30) -> str:
    """Summarize a py-spy raw (collapsed stack) file: self and inclusive share per function.

    Each line is `frame;frame;...;leaf COUNT`, outermost frame first. A function's
    inclusive share counts each sample once, however often the function is on its stack.
    """
    own: Counter[str] = Counter()
    own_lines: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(frame) for frame in stack.split(";")]
        own[_function(frames[-1])] += count
        own_lines[frames[-1]] += count
        for function in {_function(frame) for frame in frames}:
            inclusive[function] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples", "", "| self % | function |", "|---:|---|"]
    lines += [f"| {count / total * 100:.1f} | `{frame}` |" for frame, count in own.most_common(top)]
    lines += ["", "| inclusive % | function |", "|---:|---|"]
    lines += [f"| {count / total * 100:.1f} | `{frame}` |" for frame, count in inclusive.most_common(top)]
    lines += ["", "| self % | line |", "|---:|---|"]
    lines += [f"| {count / total * 100:.1f} | `{frame}` |" for frame, count in own_lines.most_common(top)]
    return "\n".join(lines)


def _function(frame: str) -> str:
    # Drop the line number: `name (module.py:12)` becomes `name (module.py)`.
    head, sep, tail = frame.rpartition(":")
    return f"{head})" if sep and tail.rstrip(")").isdigit() else frame


def _short(frame: str) -> str:
    # py-spy writes `function (path/to/module.py:line)`; keep the path from the package on.
    name, _, location = frame.partition(" (")
    location = location.rstrip(")")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in location:
            location = location.split(marker, 1)[1]
            break
    return f"{name} ({location})" if location else name
