"""Command-line glue: `jirafe-forwarder sandbox` and `python -m forwarder.sandbox`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from forwarder.logs import configure_logging, get_logger
from forwarder.sandbox.auth import parse_token_spec, read_tokens_file
from forwarder.sandbox.faults import Fault
from forwarder.sandbox.server import DEFAULT_MAX_BODY_BYTES, Sandbox
from forwarder.sandbox.state import RECORD_MODES

log = get_logger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8080"


def parse_listen(text: str) -> tuple[str, int]:
    """Parse HOST:PORT (IPv6 hosts in brackets). Raises ValueError on a bad address."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(
            f"invalid listen address {text!r}: expected HOST:PORT, such as {DEFAULT_LISTEN}"
        )
    return host, int(port_text)


def add_sandbox_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sandbox options to `parser` (the `sandbox` subcommand or a standalone parser)."""
    # run_sandbox starts its error messages with the program name, as argparse does.
    parser.set_defaults(sandbox_prog=parser.prog)
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address to listen on, where port 0 picks a free port (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="TOKEN=SITE[,SITE...]",
        help="accept a bearer token for these site ids, '*' for every site (repeatable). "
        "Prefer --tokens-file, because the command line is visible to other users.",
    )
    parser.add_argument(
        "--tokens-file",
        metavar="PATH",
        help="read tokens from a file with one TOKEN=SITE[,SITE...] per line. "
        "Blank lines and lines starting with # are skipped.",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="BYTES",
        help=f"largest accepted request body in bytes, where larger bodies get 413 (default {DEFAULT_MAX_BODY_BYTES})",
    )
    parser.add_argument(
        "--close-on-oversize",
        action="store_true",
        help="respond with 413 and close the connection without reading an oversized body, as proxies do",
    )
    parser.add_argument(
        "--no-validate",
        dest="validate",
        action="store_false",
        help="counting mode: accept events without schema validation (for benchmarks)",
    )
    parser.add_argument(
        "--record",
        choices=RECORD_MODES,
        default="full",
        help="what to keep of accepted events: full (every event), digest (enough to count "
        "duplicates) or count (counters only) (default full)",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="inject a fault from the start, as key=value pairs or a JSON object, such as "
        "'kind=error,status=503,rate=0.5,retry_after_s=2' (repeatable, see docs/sandbox.md)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the fault random generators, for repeatable runs (default 0)",
    )
    parser.add_argument(
        "--request-log-limit",
        type=int,
        default=100_000,
        metavar="N",
        help="number of latest requests kept for /_sandbox/requests (default 100000)",
    )


def sandbox_options(args: argparse.Namespace) -> dict[str, Any]:
    """Build the Sandbox keyword arguments from parsed options.

    Raises ValueError on an invalid option or a tokens file that cannot be read.
    """
    host, port = parse_listen(args.listen)
    tokens: dict[str, frozenset[str]] = {}
    if args.tokens_file:
        try:
            tokens.update(read_tokens_file(args.tokens_file))
        except OSError as exc:
            raise ValueError(
                f"cannot read tokens file {args.tokens_file}: {exc.strerror or exc}"
            ) from None
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"cannot read tokens file {args.tokens_file}: it is not UTF-8 text "
                f"(invalid byte at offset {exc.start})"
            ) from None
    for spec in args.token:
        token, sites = parse_token_spec(spec)
        tokens[token] = tokens.get(token, frozenset()) | sites
    if args.max_body_bytes < 0:
        raise ValueError(f"invalid --max-body-bytes {args.max_body_bytes}: must be 0 or more")
    if args.request_log_limit < 0:
        raise ValueError(f"invalid --request-log-limit {args.request_log_limit}: must be 0 or more")
    faults = []
    for spec in args.fault:
        try:
            faults.append(Fault.parse(spec))
        except ValueError as exc:
            raise ValueError(f"invalid --fault {spec!r}: {exc}") from None
    return {
        "tokens": tokens,
        "host": host,
        "port": port,
        "validate": args.validate,
        "record": args.record,
        "max_body_bytes": args.max_body_bytes,
        "close_on_oversize": args.close_on_oversize,
        "faults": faults,
        "seed": args.seed,
        "request_log_limit": args.request_log_limit,
    }


def run_sandbox(args: argparse.Namespace) -> int:
    """Run the sandbox until SIGTERM or SIGINT and return the exit status.

    Configures logging from `args.log_level` and `args.log_format` when the caller's
    parser defines them (default info, auto). Prints `sandbox listening on URL` on
    stdout once the port is bound. Returns 0 after a clean stop, 1 when the address
    cannot be bound and 2 on invalid options. Error messages go to stderr and start
    with `PROG: error:`, as argparse's do, where PROG is the program name of the parser
    that add_sandbox_arguments extended.
    """
    configure_logging(getattr(args, "log_level", "info"), getattr(args, "log_format", "auto"))
    prog = getattr(args, "sandbox_prog", "sandbox")
    try:
        options = sandbox_options(args)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(options, prog))


async def _serve(options: dict[str, Any], prog: str) -> int:
    sandbox = Sandbox(**options)
    try:
        await sandbox.start()
    except OSError as exc:
        log.error(
            "sandbox failed to listen", host=options["host"], port=options["port"], error=str(exc)
        )
        print(
            f"{prog}: error: cannot listen on {options['host']}:{options['port']}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    print(f"sandbox listening on {sandbox.url}", flush=True)

    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _resolve_once, received, signum)
    try:
        signum = await received
        log.info("sandbox stopping", signal=signum.name)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await sandbox.stop()
    return 0


def _resolve_once(future: asyncio.Future[signal.Signals], signum: signal.Signals) -> None:
    if not future.done():
        future.set_result(signum)
