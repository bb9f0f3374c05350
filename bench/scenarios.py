"""The five scenarios. Each run starts its own redis-server and sink and returns one result dict.

Every wait here is bounded: a drain gives up at its time limit, a producer stops after
its duration, and each process under test is stopped with SIGTERM and then SIGKILL.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis

from bench import procs
from bench.contenders import EVENTS_KEY, Contender
from bench.events import Template, cart_template, mix_templates

LOGS = procs.RESULTS / "logs"
POLL_S = 0.1


@dataclass
class Sizes:
    """Event counts and durations of one run mode (full or --quick)."""

    drain_events: int
    peer_events: dict[str, int]
    # Scenario 1 runs of the product without uvloop and/or hiredis.
    variant_events: int
    trickle_seconds: float
    trickle_rate: float
    steady_seconds: float
    outage_before_s: float
    outage_s: float
    outage_after_s: float
    outage_rate: float


FULL = Sizes(
    drain_events=1_000_000,
    peer_events={"segment": 100_000, "arq": 30_000},
    variant_events=1_000_000,
    trickle_seconds=60, trickle_rate=500,
    steady_seconds=60,
    outage_before_s=10, outage_s=60, outage_after_s=60, outage_rate=1000,
)
QUICK = Sizes(
    drain_events=100_000,
    peer_events={"segment": 20_000, "arq": 10_000},
    variant_events=100_000,
    trickle_seconds=20, trickle_rate=500,
    steady_seconds=20,
    outage_before_s=5, outage_s=15, outage_after_s=20, outage_rate=1000,
)


class Bench:
    """The Redis server and sink of one run, started fresh and stopped on exit."""

    def __init__(self, name: str, latency: bool = False) -> None:
        self.name = name
        self.redis_server = procs.start_redis(name)
        self.redis = redis.Redis.from_url(self.redis_server.url)
        self.redis_sampled = procs.Sampled(self.redis_server.process.pid)  # type: ignore[union-attr]
        self.sink = procs.Sink(latency=latency)
        try:
            self.sink.start()
        except BaseException:
            self.redis_server.stop()
            raise

    def close(self) -> None:
        self.sink.stop()
        self.redis.close()
        self.redis_server.stop()

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _log_path(scenario: str, contender: Contender, run: int) -> Path:
    slug = contender.name.replace(" ", "-")
    return LOGS / f"{scenario}-{slug}-{run}.log"


def _wait_ready(contender: Contender, process: subprocess.Popen[bytes], client: redis.Redis,
                log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{contender.name} exited with {process.returncode} before it was ready; "
                               f"see {log_path}")
        if contender.ready(client):
            return
        time.sleep(0.02)
    raise TimeoutError(f"{contender.name} not ready within 60 s; see {log_path}")


def _product_leftovers(client: redis.Redis) -> dict[str, int]:
    return {
        "dead_letters": int(client.zcard("jirafe:dead:index")),
        "backlog_left": int(client.llen(EVENTS_KEY)),
    }


def drain(scenario: str, contender: Contender, count: int, template_name: str, sites: int, run: int,
          profile_path: Path | None = None) -> dict[str, Any]:
    """Pre-fill `count` envelopes, release them to the contender and time the drain."""
    templates: list[tuple[int, Template]] = (
        [(1, cart_template())] if template_name == "cart" else mix_templates()
    )
    log_path = _log_path(scenario, contender, run)
    # Bounded but generous: enough for 100 events/s, half the rate of arq with its
    # default settings, the slowest setting tried.
    max_seconds = 60 + count / 100
    with Bench(f"{scenario}-{run}") as bench:
        filled = time.monotonic()
        contender.fill(bench.redis, bench.redis_server.url, count, templates, sites, template_name)
        fill_s = time.monotonic() - filled
        process = contender.start(bench.redis_server.url, bench.sink, count, log_path, max_seconds)
        spy: subprocess.Popen[bytes] | None = None
        try:
            _wait_ready(contender, process, bench.redis, log_path)
            sampled = procs.Sampled(process.pid)
            if profile_path is not None:
                spy = _start_profiler(process.pid, profile_path)
                _start_slowlog(bench.redis)
            cpu_start = sampled.cpu_s()
            redis_cpu_start = bench.redis_sampled.cpu_s()
            sink_cpu_start = bench.sink.sampled.cpu_s()  # type: ignore[union-attr]
            busy_start = procs.busy_cpu_s()
            started = time.time()
            contender.release(bench.redis)
            stats = _wait_accepted(bench, process, sampled, contender, count, started + max_seconds)
            cpu_s = sampled.cpu_s() - cpu_start
            redis_cpu_s = bench.redis_sampled.cpu_s() - redis_cpu_start
            sink_cpu_s = bench.sink.sampled.cpu_s() - sink_cpu_start  # type: ignore[union-attr]
            busy_s = procs.busy_cpu_s() - busy_start
            wall_s = time.time() - started
            peak_rss_mb = sampled.peak_rss_mb()
            leftovers = _product_leftovers(bench.redis) if contender.kind == "product" else {}
            if profile_path is not None:
                # Commands run inside Lua scripts are counted too, so this splits
                # Redis's time between the scripts' RPUSH, LRANGE, LTRIM and the rest.
                stats_path = profile_path.with_suffix(".redis-commandstats.json")
                stats_path.write_bytes(orjson.dumps(bench.redis.info("commandstats"),
                                                    option=orjson.OPT_INDENT_2))
                scripts_path = profile_path.with_suffix(".redis-scripts.json")
                scripts_path.write_bytes(orjson.dumps(_script_times(bench.redis, count),
                                                      option=orjson.OPT_INDENT_2))
        finally:
            if spy is not None:
                _stop_profiler(spy)
            exit_code = procs.stop_process(process)
    accepted = stats["accepted"]
    seconds = (stats["last_accept"] or time.time()) - started
    result = {
        "scenario": scenario,
        "contender": contender.name,
        "settings": contender.settings,
        "run": run,
        "events": count,
        "accepted": accepted,
        "complete": accepted >= count,
        "seconds": round(seconds, 3),
        "events_per_s": round(accepted / seconds, 1) if seconds > 0 else None,
        "cpu_s": round(cpu_s, 3),
        "cpu_us_per_event": round(cpu_s / max(accepted, 1) * 1e6, 2),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "redis_cpu_us_per_event": round(redis_cpu_s / max(accepted, 1) * 1e6, 2),
        "sink_cpu_us_per_event": round(sink_cpu_s / max(accepted, 1) * 1e6, 2),
        "requests": stats["requests"] + stats["segment"]["requests"],
        "body_bytes": stats["body_bytes"] + stats["segment"]["body_bytes"],
        "fill_s": round(fill_s, 1),
        # Cores used by everything else on the machine while this drain ran (the
        # harness's polling, py-spy when profiling, and any other workload).
        "other_cores": round(max(0.0, busy_s - cpu_s - redis_cpu_s - sink_cpu_s) / wall_s, 2),
        "exit_code": exit_code,
        "log": str(log_path.relative_to(procs.ROOT)),
        **leftovers,
    }
    if not result["complete"]:
        result["error"] = f"only {accepted} of {count} events reached the sink"
    return result


def _wait_accepted(bench: Bench, process: subprocess.Popen[bytes], sampled: procs.Sampled,
                   contender: Contender, count: int, deadline: float) -> dict[str, Any]:
    """Poll the sink until `count` events arrived, the process exits or the deadline passes."""
    last_check = 0.0
    while True:
        stats = bench.sink.stats()
        if stats["accepted"] >= count:
            return stats
        if process.poll() is not None or time.time() >= deadline:
            return stats
        if time.monotonic() - last_check >= 1.0:
            procs.check_loopback(sampled, contender.name)
            last_check = time.monotonic()
        time.sleep(POLL_S)


def _start_slowlog(client: redis.Redis) -> None:
    # Log every command with its duration, so that script time splits by script.
    client.config_set("slowlog-max-len", 500_000)
    client.config_set("slowlog-log-slower-than", 0)
    client.slowlog_reset()


def _script_times(client: redis.Redis, events: int) -> dict[str, Any]:
    """Return Redis's execution time per product script (and per other command) from the slow log."""
    import hashlib

    from forwarder import redis_store

    names = {
        hashlib.sha1(value.encode()).hexdigest(): name.strip("_").lower()
        for name, value in vars(redis_store).items()
        if isinstance(value, str) and "redis.call" in value
    }
    totals: dict[str, dict[str, float]] = {}
    entries = client.slowlog_get(-1)
    for entry in entries:
        command = entry["command"].split()
        name = command[0].decode().lower() if command else "?"
        if name == "evalsha" and len(command) > 1:
            name = names.get(command[1].decode(), "unknown script")
        total = totals.setdefault(name, {"calls": 0, "usec": 0})
        total["calls"] += 1
        total["usec"] += entry["duration"]
    for total in totals.values():
        total["usec_per_event"] = round(total["usec"] / max(events, 1), 3)
    client.config_set("slowlog-log-slower-than", 10_000)
    return {"entries": len(entries), "by_command": dict(sorted(totals.items(), key=lambda kv: -kv[1]["usec"]))}


def _start_profiler(pid: int, path: Path) -> subprocess.Popen[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    py_spy = procs.VENV_PYTHON.parent / "py-spy"
    # raw is the collapsed-stack format: speedscope opens it, and bench.profile reads it.
    return subprocess.Popen(
        [str(py_spy), "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
         "--output", str(path), "--nonblocking", "--duration", "600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _stop_profiler(spy: subprocess.Popen[bytes]) -> None:
    import signal

    if spy.poll() is None:
        spy.send_signal(signal.SIGINT)
    try:
        spy.wait(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


# ------------------------------------------------------------------ steady producers


def _start_producer(redis_url: str, rate: float, seconds: float, sites: int, template: str,
                    log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path.with_suffix(".producer.log"), "wb") as errors:
        return subprocess.Popen(
            [str(procs.VENV_PYTHON), "-m", "bench.producer", "--redis", redis_url, "--rate", str(rate),
             "--seconds", str(seconds), "--sites", str(sites), "--template", template],
            cwd=procs.ROOT, env=procs.peer_env(), stdout=subprocess.PIPE, stderr=errors,
        )


def _producer_result(producer: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    out, _ = producer.communicate(timeout=timeout_s)
    lines = out.decode().strip().splitlines()
    if producer.returncode != 0 or not lines:
        raise RuntimeError(f"producer failed with exit status {producer.returncode}")
    return orjson.loads(lines[-1])


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def _steady_start(bench: Bench, contender: Contender, scenario: str, run: int
                  ) -> tuple[subprocess.Popen[bytes], procs.Sampled, Path]:
    if contender.kind != "product":
        # The peers take an event count to stop at, which a steady producer does not have.
        raise ValueError(f"steady scenarios run the product only, not {contender.name!r}")
    log_path = _log_path(scenario, contender, run)
    process = contender.start(bench.redis_server.url, bench.sink, 0, log_path, 0)
    _wait_ready(contender, process, bench.redis, log_path)
    return process, procs.Sampled(process.pid), log_path


def _wait_delivered(bench: Bench, pushed: int, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = bench.sink.stats()
        if stats["accepted"] >= pushed or time.monotonic() >= deadline:
            return stats
        time.sleep(POLL_S)


def steady(scenario: str, contender: Contender, rate: float, seconds: float, sites: int,
           run: int, profile_path: Path | None = None) -> dict[str, Any]:
    """Scenarios 3 and 4: a steady producer; latency from LPUSH to the sink, CPU and RSS."""
    with Bench(f"{scenario}-{run}", latency=True) as bench:
        process, sampled, log_path = _steady_start(bench, contender, scenario, run)
        spy = _start_profiler(process.pid, profile_path) if profile_path is not None else None
        try:
            cpu_start = sampled.cpu_s()
            busy_start = procs.busy_cpu_s()
            started = time.time()
            producer = _start_producer(bench.redis_server.url, rate, seconds, sites, "cart", log_path)
            rss_samples = []
            while producer.poll() is None and time.time() < started + seconds + 30:
                rss_samples.append(sampled.rss_mb())
                procs.check_loopback(sampled, contender.name)
                time.sleep(0.5)
            pushed = _producer_result(producer, 30)["pushed"]
            stats = _wait_delivered(bench, pushed, 30)
            cpu_s = sampled.cpu_s() - cpu_start
            busy_s = procs.busy_cpu_s() - busy_start
            wall_s = time.time() - started
            peak_rss_mb = sampled.peak_rss_mb()
            latencies = bench.sink.latencies()
            leftovers = _product_leftovers(bench.redis) if contender.kind == "product" else {}
        finally:
            if spy is not None:
                _stop_profiler(spy)
            exit_code = procs.stop_process(process)
    every = [value for values in latencies.values() for value in values]
    per_site_p99 = [percentile(values, 0.99) for values in latencies.values() if values]
    first_latency = [values[0] for values in latencies.values() if values]
    all_sites_at = max(stats["site_first_accept"].values()) - started if stats["site_first_accept"] else None
    return {
        "scenario": scenario,
        "contender": contender.name,
        "settings": contender.settings,
        "run": run,
        "rate": rate,
        "seconds": seconds,
        "sites": sites,
        "pushed": pushed,
        "accepted": stats["accepted"],
        "complete": stats["accepted"] >= pushed,
        "sites_reached": stats["sites"],
        "latency_ms_p50": percentile(every, 0.50),
        "latency_ms_p99": percentile(every, 0.99),
        "latency_ms_max": max(every) if every else None,
        "site_p99_ms_min": min(per_site_p99) if per_site_p99 else None,
        "site_p99_ms_median": statistics.median(per_site_p99) if per_site_p99 else None,
        "site_p99_ms_max": max(per_site_p99) if per_site_p99 else None,
        "first_event_latency_ms_max": max(first_latency) if first_latency else None,
        "all_sites_first_batch_s": round(all_sites_at, 3) if all_sites_at is not None else None,
        "requests": stats["requests"],
        "cpu_s": round(cpu_s, 3),
        "cpu_us_per_event": round(cpu_s / max(stats["accepted"], 1) * 1e6, 2),
        "mean_rss_mb": round(statistics.fmean(rss_samples), 1) if rss_samples else None,
        # Cores used by all processes, the benchmark's own included, while it ran.
        "machine_cores": round(busy_s / wall_s, 2),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "exit_code": exit_code,
        "log": str(log_path.relative_to(procs.ROOT)),
        **leftovers,
    }


def outage(scenario: str, contender: Contender, sizes: Sizes, sites: int, run: int) -> dict[str, Any]:
    """Scenario 5: steady producer, the sink responds with 503 for a while, then recovery."""
    rate = sizes.outage_rate
    total_s = sizes.outage_before_s + sizes.outage_s + sizes.outage_after_s
    # After the producer stops, wait this long at most for the rest to arrive.
    recovery_limit_s = 300.0
    with Bench(f"{scenario}-{run}") as bench:
        process, sampled, log_path = _steady_start(bench, contender, scenario, run)
        samples: list[dict[str, float]] = []
        marks: dict[str, float] = {}
        try:
            cpu_start = sampled.cpu_s()
            started = time.time()
            producer = _start_producer(bench.redis_server.url, rate, total_s, sites, "cart", log_path)
            outage_at = started + sizes.outage_before_s
            recover_at = outage_at + sizes.outage_s
            pushed_at_recovery = None
            caught_up_at = None
            deadline = started + total_s + recovery_limit_s
            producer_done = False
            while time.time() < deadline:
                now = time.time()
                if "outage" not in marks and now >= outage_at:
                    bench.sink.start_outage()
                    marks["outage"] = time.time()
                if "outage" in marks and "recovered" not in marks and now >= recover_at:
                    bench.sink.end_outage()
                    marks["recovered"] = time.time()
                    pushed_at_recovery = int(bench.redis.get("bench:pushed") or 0)
                stats = bench.sink.stats()
                samples.append({"t": round(time.time() - started, 2), "accepted": stats["accepted"],
                                "rss_mb": round(sampled.rss_mb(), 1)})
                if pushed_at_recovery is not None and caught_up_at is None \
                        and stats["accepted"] >= pushed_at_recovery:
                    caught_up_at = time.time()
                if not producer_done and producer.poll() is not None:
                    producer_done = True
                if producer_done and caught_up_at is not None:
                    pushed = int(bench.redis.get("bench:pushed") or 0)
                    if stats["accepted"] >= pushed:
                        break
                procs.check_loopback(sampled, contender.name)
                time.sleep(0.25)
            pushed = _producer_result(producer, 60)["pushed"]
            final = bench.sink.stats()
            cpu_s = sampled.cpu_s() - cpu_start
            peak_rss_mb = sampled.peak_rss_mb()
            leftovers = _product_leftovers(bench.redis)
        finally:
            exit_code = procs.stop_process(process)
    outage_rel = marks.get("outage", outage_at) - started
    recovered_rel = marks.get("recovered", recover_at) - started
    during = [s["rss_mb"] for s in samples if outage_rel <= s["t"] < recovered_rel]
    after = [s["rss_mb"] for s in samples if s["t"] >= recovered_rel]
    accepted_at_recovery = max((s["accepted"] for s in samples if s["t"] <= recovered_rel), default=0)
    first_after = next((s["t"] for s in samples
                        if s["t"] > recovered_rel and s["accepted"] > accepted_at_recovery), None)
    catch_up_s = caught_up_at - started - recovered_rel if caught_up_at else None
    caught_up_accepted = next((s["accepted"] for s in samples
                               if caught_up_at and s["t"] >= caught_up_at - started), None)
    catch_up_rate = None
    if catch_up_s and first_after is not None and caught_up_accepted is not None:
        window = caught_up_at - started - first_after  # type: ignore[operator]
        if window > 0:
            catch_up_rate = round((caught_up_accepted - accepted_at_recovery) / window, 1)
    return {
        "scenario": scenario,
        "contender": contender.name,
        "settings": contender.settings,
        "run": run,
        "rate": rate,
        "outage_s": sizes.outage_s,
        "pushed": pushed,
        "accepted": final["accepted"],
        "complete": final["accepted"] >= pushed,
        "backlog_at_recovery": (pushed_at_recovery or 0) - accepted_at_recovery,
        "first_delivery_after_recovery_s": round(first_after - recovered_rel, 2) if first_after else None,
        "catch_up_s": round(catch_up_s, 2) if catch_up_s is not None else None,
        "catch_up_events_per_s": catch_up_rate,
        "rss_mb_before": max((s["rss_mb"] for s in samples if s["t"] < outage_rel), default=None),
        "rss_mb_during_max": max(during) if during else None,
        "rss_mb_after_max": max(after) if after else None,
        "rss_mb_final": after[-1] if after else None,
        "peak_rss_mb": round(peak_rss_mb, 1),
        "cpu_s": round(cpu_s, 3),
        "status_503": final["requests_by_status"].get("503", 0),
        "exit_code": exit_code,
        "log": str(log_path.relative_to(procs.ROOT)),
        "samples": samples,
        **leftovers,
    }


def main_guard() -> None:
    if sys.platform != "linux":
        raise SystemExit("the benchmark reads /proc and runs on Linux only")
