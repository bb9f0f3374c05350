"""The `jirafe-forwarder` command line."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from forwarder.config import DEFAULT_CONFIG_PATH, Config, ConfigError, check_config, load_config
from forwarder.logs import configure_logging, get_logger, redactor
from forwarder.redis_connect import async_client

log = get_logger("forwarder.cli")


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", metavar="PATH", default=None,
        help=f"TOML configuration file (default {DEFAULT_CONFIG_PATH} when it exists, else built-in defaults)",
    )


def _config_path(args: argparse.Namespace) -> str | None:
    if args.config is not None:
        return args.config
    import os

    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None


def _load(args: argparse.Namespace) -> Config:
    config = load_config(_config_path(args))
    redactor.set_secrets(config.all_tokens())
    return config


def build_parser() -> argparse.ArgumentParser:
    from forwarder.sandbox.cli import add_sandbox_arguments

    parser = argparse.ArgumentParser(
        prog="jirafe-forwarder",
        description="Forward shop events from a Redis list to the Jirafe Event API v2.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon")
    _add_config(run)

    check = commands.add_parser("check-config", help="validate the configuration and list every problem")
    _add_config(check)
    check.add_argument("--print", action="store_true", help="print the effective configuration (tokens masked)")

    dead = commands.add_parser("dead", help="list, show, replay, purge or export dead letters")
    dead_commands = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    for name, text in (
        ("list", "list dead letters, one line each"),
        ("export", "write dead letters as JSON lines to stdout"),
        ("replay", "move dead letters back onto the queue"),
        ("purge", "delete dead letters"),
    ):
        sub = dead_commands.add_parser(name, help=text)
        _add_config(sub)
        sub.add_argument("--site", help="only this site id")
        sub.add_argument("--type", help="only this event type")
        sub.add_argument("--reason", help="only this reason, such as validation or invalid_json")
        sub.add_argument("--older-than", metavar="AGE", help="only dead letters older than AGE (30m, 12h, 7d)")
        sub.add_argument("--newer-than", metavar="AGE", help="only dead letters newer than AGE")
        if name == "list":
            sub.add_argument("--json", action="store_true", help="one JSON object per line, without raw bytes")
        if name in ("replay", "purge"):
            sub.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead-letter ids (default: all matching)")
        if name == "purge":
            sub.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    show = dead_commands.add_parser("show", help="print one dead letter in full")
    _add_config(show)
    show.add_argument("id", type=int, metavar="ID")

    sandbox = commands.add_parser("sandbox", help="serve the local Event API stand-in")
    add_sandbox_arguments(sandbox)

    demo = commands.add_parser("demo", help="run the whole pipeline on throwaway local servers")
    demo.add_argument("--events", type=int, default=2000, metavar="N", help="events to enqueue (default 2000)")
    demo.add_argument("--sites", type=int, default=4, metavar="N", help="number of sites (default 4)")

    try:
        from forwarder import ops_cli
    except ImportError:
        ops_cli = None  # type: ignore[assignment]
    if ops_cli is not None:
        ops_cli.add_commands(commands, _add_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"jirafe-forwarder: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        config = _load(args)
        configure_logging(config.log.level, config.log.format)  # type: ignore[arg-type]
        return _run_loop(_run_daemon(config, _config_path(args)))
    if args.command == "check-config":
        return _check_config(args)
    if args.command == "dead":
        config = _load(args)
        return asyncio.run(_dead(config, args))
    if args.command == "sandbox":
        from forwarder.sandbox.cli import run_sandbox

        return run_sandbox(args)
    if args.command == "demo":
        from forwarder.demo import run_demo

        configure_logging("error", "auto")
        return asyncio.run(run_demo(args.events, args.sites))
    from forwarder import ops_cli

    return ops_cli.dispatch(args, _load)


def _run_loop(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _run_daemon(config: Config, path: str | None) -> int:
    from forwarder.daemon import Daemon

    daemon = Daemon(config)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, daemon.stop)
    loop.add_signal_handler(signal.SIGINT, daemon.stop)
    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(daemon.reload(path))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    return await daemon.run()


def _check_config(args: argparse.Namespace) -> int:
    path = _config_path(args)
    problems = check_config(path)
    if problems:
        print(f"{path or 'built-in defaults'}: {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"{path or 'built-in defaults'}: configuration is valid")
    if args.print:
        print(orjson.dumps(load_config(path).to_public_dict(), option=orjson.OPT_INDENT_2).decode())
    return 0


async def _dead(config: Config, args: argparse.Namespace) -> int:
    from forwarder import dead
    from forwarder.redis_store import RedisStore

    client = async_client(config.redis.url, socket_timeout=config.redis.socket_timeout_s,
                          socket_connect_timeout=config.redis.connect_timeout_s)
    store = RedisStore(client, config.redis.key_prefix)
    try:
        if args.dead_command == "show":
            record = await dead.show_dead(store, args.id)
            if record is None:
                print(f"dead letter {args.id} not found", file=sys.stderr)
                return 1
            sys.stdout.write(orjson.dumps(record, option=orjson.OPT_INDENT_2).decode() + "\n")
            return 0
        try:
            dead_filter = dead.DeadFilter(
                args.site, args.type, args.reason,
                dead.parse_age(args.older_than) if args.older_than else None,
                dead.parse_age(args.newer_than) if args.newer_than else None,
            )
        except ValueError as exc:
            print(f"jirafe-forwarder dead: {exc}", file=sys.stderr)
            return 2
        if args.dead_command in ("list", "export"):
            return await _dead_list(store, dead_filter, args)
        ids = list(args.ids)
        if not ids:
            ids = [record["dead_id"] async for record in dead.iter_dead(store, dead_filter, with_raw=False)]
        if not ids:
            print("no dead letters match", file=sys.stderr)
            return 0
        if args.dead_command == "purge" and not args.yes:
            if not sys.stdin.isatty():
                print("purge needs --yes when standard input is not a terminal", file=sys.stderr)
                return 2
            answer = await asyncio.to_thread(input, f"Delete {len(ids)} dead letter(s) for good? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted", file=sys.stderr)
                return 1
        operation = store.replay_dead if args.dead_command == "replay" else store.purge_dead
        verb = "replayed" if args.dead_command == "replay" else "purged"
        done = await dead.move_dead(store, ids, operation, dead.ProgressBar(verb.capitalize()))
        print(f"{verb} {done} dead letter(s)")
        return 0
    finally:
        await client.aclose()


async def _dead_list(store: Any, dead_filter: Any, args: argparse.Namespace) -> int:
    from forwarder import dead

    out = sys.stdout
    count = 0
    export = args.dead_command == "export"
    async for record in dead.iter_dead(store, dead_filter, with_raw=export):
        count += 1
        if export:
            out.write(orjson.dumps(record).decode() + "\n")
        elif args.json:
            record.pop("raw", None)
            out.write(orjson.dumps(record).decode() + "\n")
        else:
            out.write(
                f"{record['dead_id']:>8}  {_ago(record['dead_at_ms'])}  site={record.get('site_id')}  "
                f"type={record.get('type')}  reason={record.get('reason')}  status={record.get('status')}  "
                f"attempts={record.get('attempts')}\n"
            )
    if not export:
        print(f"{count} dead letter(s)", file=sys.stderr)
    return 0


def _ago(ms: int) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


if __name__ == "__main__":
    sys.exit(main())
