"""The operator subcommands `status` and `enqueue`, added to the CLI by `forwarder.cli`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import IO, Any

import orjson
import redis

from forwarder import enqueue as enqueue_module
from forwarder import status as status_module
from forwarder.config import Config
from forwarder.logs import redactor
from forwarder.redis_connect import sync_client
from forwarder.redis_store import Keys

COMMANDS = ("status", "enqueue")
STDIN_NAME = "standard input"

_STATUS_EPILOG = """\
exit status:
  0  healthy
  1  needs attention: a site is paused, the dead-letter store is full, or no
     forwarder instance is alive while events wait in Redis
  2  Redis is unreachable or rejected the connection, or the configuration
     is invalid

The delivery rate is measured between two lease renewals of each live
instance, so status waits up to lease.renew_interval_s + 1 s for it;
--no-rate skips the wait. status only reads from Redis."""

_ENQUEUE_EPILOG = """\
Each line is one producer envelope, such as
  {"site_id":"1234","type":"cart","data":{...}}
Lines are checked as the forwarder checks queue entries and pushed in file
order, 1000 per round trip; the first line is delivered first. Blank lines
are skipped. A line longer than api.max_batch_bytes + 4096 bytes is rejected.

exit status:
  0  every line was pushed (or, with --dry-run, is valid)
  1  some lines were rejected; the valid ones were pushed
  2  invalid usage or configuration, an unreadable file, or a Redis error
     (the message names the line to resume from)
  130  interrupted (the message names the line to resume from)"""


def add_commands(commands: Any, add_config: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the `status` and `enqueue` subcommands to the CLI's subparsers."""
    status = commands.add_parser(
        "status",
        help="show backlog, sites, instances and dead letters; exit 1 when something needs attention",
        description="Show the forwarder's state in Redis: backlog, intake leader, live\n"
        "instances, site lanes and dead letters.",
        epilog=_STATUS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config(status)
    status.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    status.add_argument(
        "--no-rate", action="store_true", help="do not wait for lease renewals to measure the delivery rate"
    )
    status.add_argument(
        "--lanes", type=int, default=20, metavar="N",
        help="list at most N lanes in the text output, problems first (default 20, 0 for all)",
    )

    enqueue = commands.add_parser(
        "enqueue",
        help="bulk load JSON-lines envelopes from a file or stdin onto the queue",
        description="Validate JSON-lines envelopes and push them onto {key_prefix}:events\n"
        "in file order.",
        epilog=_ENQUEUE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    enqueue.add_argument("file", metavar="FILE", help="JSON-lines file, or - for standard input")
    add_config(enqueue)
    enqueue.add_argument("--dry-run", action="store_true", help="check every line, push nothing")
    enqueue.add_argument(
        "--reject-file", metavar="PATH", help="write the rejected lines to PATH, unchanged, one per line"
    )


def dispatch(args: argparse.Namespace, load_config: Callable[[argparse.Namespace], Config]) -> int:
    """Run the `status` or `enqueue` subcommand and return the exit code."""
    if args.command == "status":
        return run_status(args, load_config(args))
    if args.command == "enqueue":
        return run_enqueue(args, load_config(args))
    raise ValueError(f"unknown command {args.command!r}: expected one of {', '.join(COMMANDS)}")


def _client(config: Config) -> redis.Redis:
    return sync_client(
        config.redis.url,
        socket_timeout=config.redis.socket_timeout_s,
        socket_connect_timeout=config.redis.connect_timeout_s,
    )


def _public_url(config: Config) -> str:
    return str(config.to_public_dict()["redis"]["url"])


def run_status(args: argparse.Namespace, config: Config) -> int:
    client = _client(config)
    try:
        snapshot = status_module.collect(client, config, measure_rate=not args.no_rate)
    except (redis.RedisError, OSError) as exc:
        message = redactor.redact(f"Redis at {_public_url(config)} failed: {type(exc).__name__}: {exc}")
        if args.json:
            document = {"healthy": False, "redis_reachable": False, "error": message}
            sys.stdout.write(orjson.dumps(document).decode() + "\n")
        print(f"jirafe-forwarder status: {message}", file=sys.stderr)
        return status_module.EXIT_UNREACHABLE
    finally:
        client.close()
    if args.json:
        snapshot["redis_reachable"] = True
        sys.stdout.write(orjson.dumps(snapshot, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(status_module.render(snapshot, args.lanes))
    return status_module.exit_code(snapshot)


def run_enqueue(args: argparse.Namespace, config: Config) -> int:
    name = STDIN_NAME if args.file == "-" else args.file
    try:
        stream: IO[bytes] = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    except OSError as exc:
        print(f"jirafe-forwarder enqueue: cannot read {name}: {exc.strerror or exc}", file=sys.stderr)
        return enqueue_module.EXIT_ERROR
    reject_file: IO[bytes] | None = None
    client: redis.Redis | None = None
    try:
        if args.reject_file is not None:
            try:
                reject_file = open(args.reject_file, "wb")
            except OSError as exc:
                print(f"jirafe-forwarder enqueue: cannot write {args.reject_file}: {exc.strerror or exc}",
                      file=sys.stderr)
                return enqueue_module.EXIT_ERROR
        if not args.dry_run:
            client = _client(config)
            try:
                client.ping()
            except (redis.RedisError, OSError) as exc:
                message = redactor.redact(f"{type(exc).__name__}: {exc}")
                print(f"jirafe-forwarder enqueue: Redis at {_public_url(config)} failed: {message};"
                      " nothing was pushed", file=sys.stderr)
                return enqueue_module.EXIT_ERROR
        return _enqueue(stream, name, config, client, reject_file, args.dry_run)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
        if reject_file is not None:
            reject_file.close()
        if client is not None:
            client.close()


def _enqueue(
    stream: IO[bytes], name: str, config: Config, client: redis.Redis | None,
    reject_file: IO[bytes] | None, dry_run: bool,
) -> int:
    key = Keys(config.redis.key_prefix).events
    total: int | None = None
    try:
        info = os.fstat(stream.fileno())
        total = info.st_size if info.st_size > 0 else None
    except (OSError, ValueError):
        pass
    progress = enqueue_module.Progress(total)
    try:
        summary = enqueue_module.enqueue(stream, config, client, reject_file, progress)
    except enqueue_module.EnqueueError as exc:
        if progress.enabled:
            sys.stderr.write("\n")
        sys.stdout.write(enqueue_module.format_summary(exc.summary, key, dry_run))
        done = exc.summary.pushed_through
        if name == STDIN_NAME:
            resume = f"skip the first {done} lines of the input and run enqueue again"
        else:
            resume = f"tail -n +{done + 1} {name} | jirafe-forwarder enqueue -"
        if isinstance(exc.__cause__, KeyboardInterrupt):
            print(f"jirafe-forwarder enqueue: interrupted after line {done} of {name}. To resume: {resume}",
                  file=sys.stderr)
            return 130
        print(redactor.redact(
            f"jirafe-forwarder enqueue: stopped after line {done} of {name}: {exc}. If Redis failed during a"
            f" push, up to {enqueue_module.CHUNK_LINES} events after that line may be in Redis as well."
            f" To resume: {resume}"
        ), file=sys.stderr)
        return enqueue_module.EXIT_ERROR
    sys.stdout.write(enqueue_module.format_summary(summary, key, dry_run))
    return enqueue_module.EXIT_SOME_REJECTED if summary.rejected_total else enqueue_module.EXIT_ALL_PUSHED
