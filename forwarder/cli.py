"""The `jirafe-forwarder` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tomllib
from collections.abc import Sequence
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from forwarder.config import (
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    Config,
    ConfigError,
    check_config,
    load_config,
)
from forwarder.logs import configure_logging, get_logger, redactor
from forwarder.redis_connect import async_client, is_sentinel_url

log = get_logger("forwarder.cli")

# Exit status after standard output was closed early, as in `dead list | head -1`.
# It is the status a shell reports for a command killed by SIGPIPE (128 + 13), so
# scripts that use `set -o pipefail` see that the output was cut short.
EXIT_STDOUT_CLOSED = 141

MISSING_TOKEN_PROBLEM = (
    f"api.token: no default token is set: set api.token or api.token_file, or the environment "
    f"variable {ENV_PREFIX}API_TOKEN. The daemon sends it for every site without a token of "
    "its own in [sites], and pauses those sites while it is missing"
)

_DEAD_SELECTION_HELP = """\
Without ids, the command acts on every dead letter that matches the filters.
Ids and filters combine: a named id is acted on only when its dead letter also
matches every filter given. Each id that is not found or does not match is
reported on stderr, and the others are still acted on."""

_REPLAY_ORDER_WARNING = """\
Replayed events are pushed at the producer end of the queue, oldest dead letter
first, so they are delivered after every event already waiting there, and after
newer events of the same entity (a cart, an order, a customer). The API keeps
the last state it receives, so a replayed old version overwrites a newer one.
Replay an event only when no newer version of its entity was sent since, or
push the entity's current state again instead."""


def _dead_exit_status(exit_1_meaning: str | None) -> str:
    """Return the exit-status section of a dead subcommand's help, with 1 only when it is used."""
    lines = ["exit status:", "  0  done"]
    if exit_1_meaning is not None:
        lines.append(f"  1  {exit_1_meaning}")
    lines += [
        "  2  invalid usage or configuration, or Redis failed or rejected the",
        "     connection (the message names the Redis URL, password masked)",
        "  141  standard output was closed before everything was written",
    ]
    return "\n".join(lines)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", metavar="PATH", default=None,
        help=f"TOML configuration file (default {DEFAULT_CONFIG_PATH} when it exists, else built-in defaults)",
    )


def _config_path(args: argparse.Namespace) -> str | None:
    if args.config is not None:
        return args.config
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

    _add_dead_commands(commands)

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


def _add_dead_commands(commands: Any) -> None:
    dead = commands.add_parser("dead", help="list, show, replay, purge or export dead letters")
    dead_commands = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    not_found = "a named id was not found or did not match the filters"
    epilogs = {
        "list": _dead_exit_status(None),
        "export": _dead_exit_status(None),
        "replay": f"{_DEAD_SELECTION_HELP}\n\n{_REPLAY_ORDER_WARNING}\n\n{_dead_exit_status(not_found)}",
        "purge": f"{_DEAD_SELECTION_HELP}\n\n"
        + _dead_exit_status(f"{not_found}, or the confirmation was declined"),
    }
    for name, text in (
        ("list", "list dead letters, one line each, oldest first"),
        ("export", "write dead letters as JSON lines to stdout, oldest first"),
        ("replay", "move dead letters back onto the queue, behind the events waiting there"),
        ("purge", "delete dead letters"),
    ):
        sub = dead_commands.add_parser(
            name, help=text, description=text[0].upper() + text[1:] + ".", epilog=epilogs[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_config(sub)
        sub.add_argument("--site", help="only this site id")
        sub.add_argument("--type", help="only this event type")
        sub.add_argument("--reason", help="only this reason, such as validation or invalid_json")
        sub.add_argument("--older-than", metavar="AGE", help="only dead letters older than AGE (30m, 12h, 7d)")
        sub.add_argument("--newer-than", metavar="AGE", help="only dead letters newer than AGE")
        if name == "list":
            sub.add_argument("--json", action="store_true", help="one JSON object per line, without raw bytes")
        if name in ("replay", "purge"):
            sub.add_argument(
                "ids", nargs="*", type=int, metavar="ID",
                help="dead-letter ids, each acted on only if it matches the filters (default: all matching)",
            )
        if name == "purge":
            sub.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    show = dead_commands.add_parser(
        "show", help="print one dead letter in full", description="Print one dead letter in full, as JSON.",
        epilog=_dead_exit_status("the dead letter was not found"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config(show)
    show.add_argument("id", type=int, metavar="ID")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = _dispatch(args)
        # Flush inside the try, so that a reader that is gone is handled below and
        # not reported at exit.
        sys.stdout.flush()
        return code
    except ConfigError as exc:
        print(f"jirafe-forwarder: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Taken to come from stdout: redis-py (8.2) and aiohttp (3.x) wrap socket errors
        # in their own exception types.
        return _stdout_closed()


def _stdout_closed() -> int:
    """Point stdout at /dev/null after its reader went away, and return the exit status.

    Without this, the interpreter's final flush of stdout fails again and prints a
    second error at exit.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_STDOUT_CLOSED


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        config = _load(args)
        if config.api.token is None:
            raise ConfigError([MISSING_TOKEN_PROBLEM])
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

    problem = await _redis_startup_problem(config)
    if problem is not None:
        print(f"jirafe-forwarder run: {problem}", file=sys.stderr)
        return 2
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


def _redis_failure(config: Config, exc: BaseException) -> str:
    """Describe a failed Redis connection or command in one line, password masked."""
    url = config.to_public_dict()["redis"]["url"]
    detail = " ".join(str(exc).split()).rstrip(".")
    if isinstance(exc, redis.AuthenticationError):
        hint = "Check the user and password in redis.url"
    elif isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
        hint = "Check that Redis is running and that redis.url points at it"
    else:
        hint = "Check redis.url"
    return redactor.redact(f"Redis at {url} failed: {type(exc).__name__}: {detail}. {hint}")


def _redis_client(config: Config) -> aioredis.Redis:
    """Build a client for the command line; raise TypeError or ValueError for a bad URL."""
    return async_client(
        config.redis.url, socket_timeout=config.redis.socket_timeout_s,
        socket_connect_timeout=config.redis.connect_timeout_s,
    )


async def _redis_startup_problem(config: Config) -> str | None:
    """Send one PING as `run` will, and describe an error that retrying cannot fix.

    redis-py 8.2 parses query options when it builds the client (ValueError) and passes
    unknown ones to the connection (TypeError at the first command). The server
    rejects a wrong user or password (AuthenticationError) and a database number out
    of range (ResponseError). Those stop the start. An unreachable server is left to
    the daemon, which waits for it and logs each try.
    """
    from forwarder.daemon import REDIS_TRANSIENT

    try:
        client = _redis_client(config)
    except (TypeError, ValueError) as exc:
        return _redis_failure(config, exc)
    try:
        await client.ping()
    except redis.AuthenticationError as exc:
        return _redis_failure(config, exc)
    except REDIS_TRANSIENT:
        return None
    except (redis.RedisError, TypeError, ValueError) as exc:
        return _redis_failure(config, exc)
    finally:
        await client.aclose()
    return None


def _check_config(args: argparse.Namespace) -> int:
    path = _config_path(args)
    problems = check_config(path)
    if problems:
        if _default_token_source_missing(path):
            problems.append(MISSING_TOKEN_PROBLEM)
    else:
        config = load_config(path)
        url_problem = _redis_url_problem(config)
        if url_problem is not None:
            problems.append(url_problem)
        if config.api.token is None:
            problems.append(MISSING_TOKEN_PROBLEM)
    if problems:
        print(f"{path or 'built-in defaults'}: {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"{path or 'built-in defaults'}: configuration is valid")
    if args.print:
        print(orjson.dumps(load_config(path).to_public_dict(), option=orjson.OPT_INDENT_2).decode())
    return 0


def _redis_url_problem(config: Config) -> str | None:
    """Build a connection object for redis.url without connecting, and describe an error.

    config.py checks the URL's form, while redis-py 8.2 rejects some query options only
    here: a value it cannot parse (ValueError) or an option it does not know
    (TypeError). Sentinel URLs are skipped, because config.py already parses them
    with the same code that builds their clients.
    """
    if is_sentinel_url(config.redis.url):
        return None
    try:
        pool = redis.ConnectionPool.from_url(config.redis.url)
        pool.make_connection()
    except (TypeError, ValueError) as exc:
        url = config.to_public_dict()["redis"]["url"]
        detail = " ".join(str(exc).split()).rstrip(".")
        return redactor.redact(f"redis.url: invalid value {url}: redis-py rejects it: {detail}")
    pool.disconnect()
    return None


def _default_token_source_missing(path: str | None) -> bool:
    """Return True when neither the file nor the environment sets api.token or api.token_file.

    Used only when the configuration has other problems and cannot be loaded, so that
    check-config still lists a missing token with them. A file that is not valid TOML
    counts as setting it, because its problem is reported already.
    """
    if any(f"{ENV_PREFIX}API_{key}" in os.environ for key in ("TOKEN", "TOKEN_FILE")):
        return False
    if path is None:
        return True
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError):
        return False
    api = data.get("api", {})
    return isinstance(api, dict) and "token" not in api and "token_file" not in api


async def _dead(config: Config, args: argparse.Namespace) -> int:
    from forwarder import dead
    from forwarder.redis_store import RedisStore

    prog = f"jirafe-forwarder dead {args.dead_command}"
    dead_filter: dead.DeadFilter | None = None
    if args.dead_command != "show":
        try:
            dead_filter = dead.DeadFilter(
                args.site, args.type, args.reason,
                dead.parse_age(args.older_than) if args.older_than is not None else None,
                dead.parse_age(args.newer_than) if args.newer_than is not None else None,
            )
        except ValueError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 2
    try:
        client = _redis_client(config)
    except (TypeError, ValueError) as exc:
        print(f"{prog}: {_redis_failure(config, exc)}", file=sys.stderr)
        return 2
    try:
        # One PING first, so that a URL option redis-py rejects (TypeError, ValueError)
        # is reported here, and not mistaken for a bug in the commands below.
        await client.ping()
    except (redis.RedisError, OSError, TypeError, ValueError) as exc:
        await client.aclose()
        print(f"{prog}: {_redis_failure(config, exc)}", file=sys.stderr)
        return 2
    store = RedisStore(client, config.redis.key_prefix)
    try:
        if args.dead_command == "show":
            return await _dead_show(store, args.id)
        if args.dead_command in ("list", "export"):
            return await _dead_list(store, dead_filter, args)
        return await _dead_move(store, dead_filter, args)
    except dead.MoveInterrupted as exc:
        verb = "replayed" if args.dead_command == "replay" else "purged"
        cause = exc.__cause__ or exc
        print(f"{prog}: {_redis_failure(config, cause)}. At least {exc.done} dead letter(s) were {verb}"
              " before the failure; list the rest and run the command again", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise
    except (redis.RedisError, OSError) as exc:
        print(f"{prog}: {_redis_failure(config, exc)}", file=sys.stderr)
        return 2
    finally:
        await client.aclose()


async def _dead_show(store: Any, dead_id: int) -> int:
    from forwarder import dead

    record = await dead.show_dead(store, dead_id)
    if record is None:
        print(f"dead letter {dead_id} not found", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(record, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


async def _dead_move(store: Any, dead_filter: Any, args: argparse.Namespace) -> int:
    """Replay or purge the named ids that match the filters, or every match without ids."""
    from forwarder import dead

    incomplete = False
    if args.ids:
        selection = await dead.select_ids(store, args.ids, dead_filter)
        for dead_id in selection.missing:
            print(f"dead letter {dead_id} not found", file=sys.stderr)
        for dead_id in selection.unmatched:
            print(f"dead letter {dead_id} does not match the filters, skipped", file=sys.stderr)
        ids = selection.matching
        incomplete = bool(selection.missing or selection.unmatched)
    else:
        ids = [record["dead_id"] async for record in dead.iter_dead(store, dead_filter, with_raw=False)]
    if not ids:
        print("no dead letters match", file=sys.stderr)
        return 1 if incomplete else 0
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
    if done < len(ids):
        # Another command replayed or purged them between the lookup and this call.
        print(f"{len(ids) - done} dead letter(s) were gone before they could be {verb}", file=sys.stderr)
        incomplete = incomplete or bool(args.ids)
    return 1 if incomplete else 0


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
    # Flush first, so that a closed stdout stops the command before it reports a count.
    out.flush()
    if not export:
        print(f"{count} dead letter(s)", file=sys.stderr)
    return 0


def _ago(ms: int) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


if __name__ == "__main__":
    sys.exit(main())
