"""The sandbox as a process: `python -m forwarder.sandbox`, its options and signals."""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from forwarder.sandbox import Fault, add_sandbox_arguments, sample_event
from forwarder.sandbox.cli import parse_listen, sandbox_options

URL_LINE = re.compile(r"^sandbox listening on (http://127\.0\.0\.1:(\d+))$")


class SandboxProcess:
    def __init__(self, process: asyncio.subprocess.Process, url: str, stderr_path: Path) -> None:
        self.process = process
        self.url = url
        self.stderr_path = stderr_path

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        async with asyncio.timeout(10):
            return await self.process.wait()


async def start_sandbox(tmp_path: Path, *args: str) -> SandboxProcess:
    stderr_path = tmp_path / "sandbox.stderr"
    with stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "forwarder.sandbox",
            "--listen", "127.0.0.1:0", "--log-format", "json", *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )  # fmt: skip
    assert process.stdout is not None
    try:
        async with asyncio.timeout(20):
            line = (await process.stdout.readline()).decode().strip()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    match = URL_LINE.match(line)
    if match is None:
        process.kill()
        await process.wait()
        pytest.fail(f"unexpected first line {line!r}, stderr: {stderr_path.read_text()}")
    return SandboxProcess(process, match.group(1), stderr_path)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def test_process_serves_batch_and_stops_on_sigterm(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    sandbox = await start_sandbox(tmp_path, "--token", "secret-abc=1001,1002")
    try:
        carts = [sample_event("cart", 1), sample_event("cart", 2)]
        headers = {"Authorization": "Bearer secret-abc"}
        async with session.post(
            f"{sandbox.url}/v2/1001/batch", json={"cart": carts}, headers=headers
        ) as response:
            batch_status = response.status
            batch_body = await response.json()
        async with session.get(f"{sandbox.url}/_sandbox/received?site=1001") as response:
            received = await response.json()
    finally:
        code = await sandbox.stop(signal.SIGTERM)

    assert batch_status == 200
    assert batch_body == {"cart": [{"success": True}, {"success": True}]}
    assert received == [{"type": "cart", "data": carts[0]}, {"type": "cart", "data": carts[1]}]
    assert code == 0
    log_lines = [orjson.loads(line) for line in sandbox.stderr.splitlines()]
    events = [line["event"] for line in log_lines]
    assert events[0] == "sandbox listening"
    assert "sandbox request" in events
    assert "sandbox stopping" in events
    assert events[-1] == "sandbox stopped"
    request_line = next(line for line in log_lines if line["event"] == "sandbox request")
    assert request_line["token"] == "token-1"
    assert request_line["events"] == 2
    assert "secret-abc" not in sandbox.stderr


async def test_process_options_and_sigint(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# test tokens\n\nfile-token=1001\nfile-token=1002\n")
    sandbox = await start_sandbox(
        tmp_path,
        "--tokens-file", str(tokens_file),
        "--fault", "kind=error,count=1,retry_after_s=3",
        "--no-validate",
        "--record", "count",
        "--max-body-bytes", "100",
    )  # fmt: skip
    headers = {"Authorization": "Bearer file-token"}
    try:
        url = f"{sandbox.url}/v2/1002/batch"
        async with session.post(url, json={"cart": [{}]}, headers=headers) as first:
            first_status, retry_after = first.status, first.headers.get("Retry-After")
        async with session.post(
            url, json={"cart": [{"not": "validated"}]}, headers=headers
        ) as second:
            second_status = second.status
        async with session.post(url, data=b" " * 101, headers=headers) as third:
            third_status = third.status
        async with session.get(f"{sandbox.url}/_sandbox/stats") as response:
            stats = await response.json()
    finally:
        code = await sandbox.stop(signal.SIGINT)

    assert (first_status, retry_after) == (503, "3")
    assert second_status == 200
    assert third_status == 413
    assert stats["record"] == "count"
    assert stats["accepted"]["by_site"] == {"1002": {"cart": 1}}
    assert code == 0


async def test_process_invalid_option_exits_2(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "forwarder.sandbox", "--token", "no-sites-given",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(20):
        stdout, stderr = await process.communicate()

    assert process.returncode == 2
    assert stdout == b""
    assert b"invalid token entry: expected TOKEN=SITE[,SITE...]" in stderr
    assert b"no-sites-given" not in stderr


async def test_process_port_in_use_exits_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "forwarder.sandbox", "--listen", f"127.0.0.1:{port}", "--log-format", "json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(20):
            stdout, stderr = await process.communicate()

    assert process.returncode == 1
    assert stdout == b""
    assert (
        f"python -m forwarder.sandbox: error: cannot listen on 127.0.0.1:{port}: ".encode()
        in stderr
    )


async def run_command(*argv: str) -> tuple[int | None, str, str]:
    """Run `python ARGV...` to its end and return the exit status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(20):
        stdout, stderr = await process.communicate()
    return process.returncode, stdout.decode(), stderr.decode()


ENTRY_POINTS = [
    (["-m", "forwarder.cli", "sandbox"], "jirafe-forwarder sandbox"),
    (["-m", "forwarder.sandbox"], "python -m forwarder.sandbox"),
]


@pytest.mark.parametrize(("command", "prog"), ENTRY_POINTS, ids=[prog for _, prog in ENTRY_POINTS])
async def test_missing_tokens_file_exits_2(tmp_path: Path, command: list[str], prog: str) -> None:
    missing = tmp_path / "no-such-tokens"

    code, stdout, stderr = await run_command(*command, "--tokens-file", str(missing))

    assert code == 2
    assert stdout == ""
    assert stderr.splitlines() == [
        f"{prog}: error: cannot read tokens file {missing}: No such file or directory"
    ]


@pytest.mark.parametrize(("command", "prog"), ENTRY_POINTS, ids=[prog for _, prog in ENTRY_POINTS])
async def test_errors_start_like_argparse_errors(command: list[str], prog: str) -> None:
    own_code, _, own_stderr = await run_command(*command, "--listen", "8080")
    argparse_code, _, argparse_stderr = await run_command(*command, "--record", "everything")

    assert own_code == 2
    assert own_stderr.splitlines() == [
        f"{prog}: error: invalid listen address '8080': expected HOST:PORT, such as 127.0.0.1:8080"
    ]
    assert argparse_code == 2
    assert argparse_stderr.splitlines()[-1].startswith(f"{prog}: error: argument --record: ")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_sandbox_arguments(parser)
    return parser.parse_args(argv)


def test_options_defaults() -> None:
    options = sandbox_options(parse())

    assert options["host"] == "127.0.0.1"
    assert options["port"] == 8080
    assert options["tokens"] == {}
    assert options["validate"] is True
    assert options["record"] == "full"
    assert options["max_body_bytes"] == 10_000_000
    assert options["close_on_oversize"] is False
    assert options["faults"] == []
    assert options["seed"] == 0
    assert options["request_log_limit"] == 100_000


def test_options_merge_tokens_file_and_flags(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("alpha=1001\n  # comment\nYmFzZTY0==2001,2002\n")

    options = sandbox_options(
        parse(
            "--tokens-file", str(tokens_file),
            "--token", "alpha=1003",
            "--token", "beta=*",
            "--listen", "[::1]:0",
            "--fault", "kind=latency,latency_s=0.5,site=1001",
            "--close-on-oversize",
        )
    )  # fmt: skip

    assert options["tokens"] == {
        "alpha": {"1001", "1003"},
        "YmFzZTY0=": {"2001", "2002"},
        "beta": {"*"},
    }
    assert (options["host"], options["port"]) == ("::1", 0)
    assert options["faults"] == [Fault("latency", latency_s=0.5, site="1001")]
    assert options["close_on_oversize"] is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "8080"], "invalid listen address '8080'"),
        (["--listen", "localhost:http"], "invalid listen address"),
        (["--token", "tok=abc"], "invalid site id(s) abc"),
        (["--token", "tok="], "no site after '='"),
        (["--fault", "kind=hang,rate=3"], "invalid --fault 'kind=hang,rate=3'"),
        (["--fault", "kind=error,status=200"], "status must be from 400 to 599, got 200"),
        (["--max-body-bytes", "-1"], "invalid --max-body-bytes -1"),
    ],
)
def test_options_reject_invalid_values(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        sandbox_options(parse(*argv))

    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda path: None, "No such file or directory"),
        (lambda path: path.mkdir(), "Is a directory"),
        (
            lambda path: path.write_bytes(b"tok=1001\n\xff\n"),
            "it is not UTF-8 text (invalid byte at offset 9)",
        ),
    ],
    ids=["missing", "directory", "not UTF-8"],
)
def test_unreadable_tokens_file_is_named(tmp_path: Path, make: Any, reason: str) -> None:
    path = tmp_path / "tokens"
    make(path)

    with pytest.raises(ValueError) as raised:
        sandbox_options(parse("--tokens-file", str(path)))

    assert str(raised.value) == f"cannot read tokens file {path}: {reason}"


def test_arguments_record_parser_prog() -> None:
    parser = argparse.ArgumentParser(prog="jirafe-forwarder sandbox")
    add_sandbox_arguments(parser)

    assert parser.parse_args([]).sandbox_prog == "jirafe-forwarder sandbox"


def test_tokens_file_error_names_line(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("good=1001\nbad-line\n")

    with pytest.raises(ValueError) as raised:
        sandbox_options(parse("--tokens-file", str(tokens_file)))

    assert f"{tokens_file}, line 2: invalid token entry" in str(raised.value)


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("0.0.0.0:8080") == ("0.0.0.0", 8080)
    with pytest.raises(ValueError):
        parse_listen("127.0.0.1:70000")
