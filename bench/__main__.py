"""Benchmark harness of jirafe-forwarder. See docs/benchmarks.md.

    .venv/bin/python -m bench setup                 # peers' virtualenv and import shadows
    .venv/bin/python -m bench run [--scenario N] [--repeat K] [--quick] [--profile]
    .venv/bin/python -m bench tune {floor,segment,arq,product} [--events N]
    .venv/bin/python -m bench render FILE           # print the tables of a results JSON file
    .venv/bin/python -m bench profile FILE          # summarize a py-spy raw profile

Results go to bench/results/ (git-ignored): one JSON file and one Markdown file per run.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from itertools import product as cartesian
from pathlib import Path
from typing import Any

import orjson

from bench import procs, report, scenarios
from bench.contenders import Contender, product
from bench.micro import command_micro

# Peer settings chosen with `python -m bench tune` on this machine (docs/benchmarks.md
# lists every setting tried). Their CLI options take these names.
FLOOR_BEST = {"chunk": 10_000, "concurrency": 4}
SEGMENT_BEST = {"upload_size": 400, "threads": 1, "upload_interval": 0.05, "queue": 50_000}
ARQ_BEST = {"max_jobs": 500, "poll_delay": 0.01, "uvloop": True}

TUNE_GRID: dict[str, list[dict[str, Any]]] = {
    "floor": [{"chunk": chunk, "concurrency": concurrency}
              for chunk, concurrency in cartesian((2_000, 10_000, 50_000), (4, 8, 16))],
    "segment": [{"upload_size": size, "threads": threads, "upload_interval": interval}
                for size, threads, interval in cartesian((100, 250, 400), (1, 2, 4), (0.5,))]
               + [{"upload_size": 400, "threads": 1, "upload_interval": 0.05, "queue": 50_000}],
    "arq": [{"max_jobs": jobs, "poll_delay": delay, "uvloop": True}
            for jobs, delay in cartesian((10, 50, 200, 500), (0.5, 0.01))]
           + [{"max_jobs": 200, "poll_delay": 0.01}],
    "product": [{}, {"batch_intake_chunk_events": 5000}, {"api_max_concurrency": 16},
                {"batch_max_events": 5000}, {"batch_linger_ms": 0},
                {"batch_intake_chunk_events": 5000, "batch_max_events": 5000}],
}
TUNE_EVENTS = {"floor": 100_000, "segment": 20_000, "arq": 5_000, "product": 100_000}

SITES = 50
TRICKLE_SITES = 1000


def _peer(name: str, settings: dict[str, Any]) -> Contender:
    return Contender(name, dict(settings))


def machine() -> dict[str, Any]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError as exc:
            return f"unavailable: {exc}"

    cpu_model = ""
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": run("nproc"),
        "cpu": cpu_model,
        "free_g": run("free", "-g"),
        "python": platform.python_version(),
        "redis": run("redis-server", "--version"),
        "kernel": platform.release(),
        "shadows": {name: procs.shadow_check(name) for name in
                    ("no-uvloop", "no-hiredis", "no-uvloop-no-hiredis")},
    }


def _attempt(results: list[dict[str, Any]], title: str, measure: Callable[..., dict[str, Any]],
             *args: Any, **kwargs: Any) -> dict[str, Any] | None:
    """Run one measurement; a failure is recorded and reported, and the run goes on."""
    started = time.monotonic()
    print(f"-- {title}", flush=True)
    try:
        result = measure(*args, **kwargs)
    except Exception as exc:
        traceback.print_exc()
        results.append({"what": title, "error_text": f"{type(exc).__name__}: {exc}"})
        return None
    result["wall_s"] = round(time.monotonic() - started, 1)
    results.append(result)
    summary = {key: value for key, value in result.items() if key not in ("samples", "settings")}
    print(orjson.dumps(summary).decode(), flush=True)
    return result


def command_run(args: argparse.Namespace) -> int:
    scenarios.main_guard()
    procs.prepare_shadows()
    sizes = scenarios.QUICK if args.quick else scenarios.FULL
    repeat = args.repeat or (1 if args.quick else 3)
    chosen = set(args.scenario or [1, 2, 3, 4, 5])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: list[dict[str, Any]] = []
    info = machine()
    # Every run of every scenario adds one result; report.group_medians pairs them up.
    started = time.monotonic()
    n = sizes.drain_events

    for run in range(repeat):
        if 1 in chosen:
            line_up = [product()]
            if not args.no_peers:
                line_up += [_peer("floor", FLOOR_BEST), _peer("segment", SEGMENT_BEST), _peer("arq", ARQ_BEST)]
            if not args.no_variants:
                line_up += [product("no-uvloop"), product("no-hiredis"), product("no-uvloop-no-hiredis")]
            for contender in line_up:
                count = sizes.variant_events if contender.shadow else sizes.peer_events.get(contender.kind, n)
                _attempt(results, f"scenario 1, {contender.describe()}, run {run + 1}",
                         scenarios.drain, "1", contender, count, "cart", SITES, run)
        if 2 in chosen:
            _attempt(results, f"scenario 2, product, run {run + 1}",
                     scenarios.drain, "2", product(), n, "mix", SITES, run)
        if 3 in chosen:
            _attempt(results, f"scenario 3, product, run {run + 1}", scenarios.steady, "3", product(),
                     sizes.trickle_rate, sizes.trickle_seconds, TRICKLE_SITES, run)
        if 4 in chosen:
            _attempt(results, f"scenario 4, product, run {run + 1}", scenarios.steady, "4", product(),
                     100, sizes.steady_seconds, SITES, run)
        if 5 in chosen and run < args.outage_repeat:
            _attempt(results, f"scenario 5, product, run {run + 1}",
                     scenarios.outage, "5", product(), sizes, SITES, run)

    if args.profile:
        # Not part of the tables: py-spy's sampling costs the process under test some CPU.
        path = procs.RESULTS / f"profile-s1-{stamp}.txt"
        _attempt(results, f"scenario 1, product under py-spy, profile in {path.name}",
                 scenarios.drain, "profile-1", product(), n, "cart", SITES, 0, profile_path=path)
        steady_path = procs.RESULTS / f"profile-s4-{stamp}.txt"
        _attempt(results, f"scenario 4, product under py-spy, profile in {steady_path.name}",
                 scenarios.steady, "profile-4", product(), 100, sizes.steady_seconds, SITES, 0,
                 profile_path=steady_path)

    elapsed = time.monotonic() - started
    document = {"machine": info, "quick": args.quick, "repeat": repeat, "elapsed_s": round(elapsed, 1),
                "sizes": sizes.__dict__, "results": results}
    json_path = procs.RESULTS / f"run-{stamp}.json"
    json_path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    text = render(document)
    md_path = procs.RESULTS / f"run-{stamp}.md"
    md_path.write_text(text)
    print()
    print(text)
    print(f"\nresults: {json_path.relative_to(procs.ROOT)}, {md_path.relative_to(procs.ROOT)}")
    failed = [result for result in results if "error_text" in result or not result.get("complete", True)]
    return 1 if failed else 0


def render(document: dict[str, Any]) -> str:
    info = document["machine"]
    medians = report.group_medians(document["results"])
    parts = [
        f"Run of {info['date']}: {info['nproc']} cores ({info['cpu']}), Python {info['python']}, "
        f"{info['redis'].split(' sha')[0]}, kernel {info['kernel']}; "
        f"{'quick' if document['quick'] else 'full'} mode, {document['repeat']} run(s) each, "
        f"{document['elapsed_s'] / 60:.1f} min in total. Redis, the sink and the process under "
        "test share the 2 cores.",
        "",
    ]
    for scenario, title in (("1", "Scenario 1: drain a backlog of 1.2 KB carts, 50 sites"),
                            ("2", "Scenario 2: drain a backlog of mixed types and sizes, 50 sites")):
        rows = [row for row in medians if row["scenario"] == scenario]
        if rows:
            parts += [f"### {title} ({report.SINK_MODE}), medians", "", report.drain_table(rows), ""]
            ratios = report.ratio_table(rows)
            if ratios:
                parts += [ratios, ""]
    steady_rows = [row for row in medians if row["scenario"] in ("3", "4")]
    if steady_rows:
        parts += ["### Scenarios 3 and 4: steady producers, latency from LPUSH to sink receipt "
                  "(sink in counting mode), medians", "", report.steady_table(steady_rows), ""]
    outage_rows = [row for row in medians if row["scenario"] == "5"]
    if outage_rows:
        parts += ["### Scenario 5: API outage (503 from the sink) under a steady producer, medians", "",
                  report.outage_table(outage_rows), ""]
    errors = [result for result in document["results"] if "error_text" in result]
    if errors:
        parts += ["### Failed measurements", ""]
        parts += [f"- {error['what']}: {error['error_text']}" for error in errors]
    return "\n".join(parts)


def command_tune(args: argparse.Namespace) -> int:
    scenarios.main_guard()
    count = args.events or TUNE_EVENTS[args.peer]
    results: list[dict[str, Any]] = []
    for settings in TUNE_GRID[args.peer]:
        contender = product(**settings) if args.peer == "product" else _peer(args.peer, settings)
        _attempt(results, f"tune {contender.describe()}", scenarios.drain, "tune", contender, count, "cart",
                 SITES, 0)
    rows = [result for result in results if "error_text" not in result]
    for row in rows:
        row["runs"] = 1
    text = f"Tuning {args.peer} on scenario 1 with {count:,} events, one run each\n\n" + report.drain_table(rows)
    path = procs.RESULTS / f"tune-{args.peer}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text(text)
    print()
    print(text)
    return 0


def command_setup(args: argparse.Namespace) -> int:
    procs.prepare_shadows()
    requirements = procs.ROOT / "bench" / "requirements-arq.txt"
    if not (procs.ARQ_VENV / "bin" / "python").exists():
        # The interpreter behind .venv, so that both environments run the same Python.
        base = Path(sys.base_prefix) / "bin" / "python3"
        subprocess.run([str(base), "-m", "venv", str(procs.ARQ_VENV)], check=True)
    subprocess.run([str(procs.ARQ_VENV / "bin" / "pip"), "install", "-q", "-r", str(requirements)], check=True)
    print(f"arq virtualenv ready: {procs.ARQ_VENV.relative_to(procs.ROOT)}")
    for name in ("no-uvloop", "no-hiredis", "no-uvloop-no-hiredis"):
        print(f"shadow {name}: {procs.shadow_check(name)}")
    return 0


def command_render(args: argparse.Namespace) -> int:
    print(render(orjson.loads(Path(args.file).read_bytes())))
    return 0


def command_profile(args: argparse.Namespace) -> int:
    print(report.summarize_profile(Path(args.file), args.top))
    return 0


def _interrupt(signum: int, frame: object) -> None:
    # Turn SIGTERM into KeyboardInterrupt, so that every `finally` stops its processes.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(prog="python -m bench", description="Benchmarks of jirafe-forwarder.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the scenarios and print the tables")
    run.add_argument("--scenario", type=int, action="append", choices=(1, 2, 3, 4, 5),
                     help="run only this scenario (repeatable; default all five)")
    run.add_argument("--repeat", type=int, help="runs of each measurement (default 3, 1 with --quick)")
    run.add_argument("--quick", action="store_true",
                     help="100,000-event drains, 20 s steady phases and a 15 s outage")
    run.add_argument("--profile", action="store_true",
                     help="add one untimed scenario 1 run of the product under py-spy")
    run.add_argument("--no-peers", action="store_true", help="skip the peers in scenario 1")
    run.add_argument("--no-variants", action="store_true",
                     help="skip the product runs without uvloop and hiredis in scenario 1")
    run.add_argument("--outage-repeat", type=int, default=1,
                     help="runs of scenario 5, at most --repeat (default 1: one run takes minutes)")
    tune = commands.add_parser("tune", help="try each setting of a peer's grid on scenario 1")
    tune.add_argument("peer", choices=sorted(TUNE_GRID))
    tune.add_argument("--events", type=int, help="events per trial")
    commands.add_parser("setup", help="create the arq virtualenv and the uvloop/hiredis shadows")
    rendered = commands.add_parser("render", help="print the tables of a results JSON file again")
    rendered.add_argument("file")
    profile = commands.add_parser("profile", help="summarize a py-spy raw profile")
    profile.add_argument("file")
    profile.add_argument("--top", type=int, default=30)
    commands.add_parser("micro", help="measure the per-event costs behind the hot-path choices (about 30 s)")
    args = parser.parse_args(argv)
    handler = {"run": command_run, "tune": command_tune, "setup": command_setup, "render": command_render,
               "profile": command_profile, "micro": command_micro}
    return handler[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
