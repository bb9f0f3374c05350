"""Run the sandbox: `python -m forwarder.sandbox --listen 127.0.0.1:8080 --token secret=1001`."""

from __future__ import annotations

import argparse
import sys

from forwarder.sandbox.cli import add_sandbox_arguments, run_sandbox


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m forwarder.sandbox",
        description="Local stand-in for the Jirafe Event API v2, with inspection and fault injection.",
    )
    add_sandbox_arguments(parser)
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="default info",
    )
    parser.add_argument(
        "--log-format",
        default="auto",
        choices=("auto", "json", "console"),
        help="auto writes JSON lines unless stderr is a terminal (default auto)",
    )
    return run_sandbox(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
