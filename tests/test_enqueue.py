"""`jirafe-forwarder enqueue` as a subprocess against a real redis-server."""

from __future__ import annotations

import asyncio
import os
import pty
import sys
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from tests.daemon_proc import ROOT
from tests.e2e import envelope, run_cli
from tests.servers import RedisServer, free_port

KEY = "jirafe:events"
MAX_BATCH_BYTES = 2048
# Lines longer than api.max_batch_bytes + 4096 bytes are rejected unread.
LINE_LIMIT = MAX_BATCH_BYTES + 4096


def clean_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("JIRAFE_FORWARDER_")}


def write_config(tmp_path: Path, redis_url: str, max_batch_bytes: int = MAX_BATCH_BYTES) -> Path:
    path = tmp_path / "forwarder.toml"
    path.write_text(f'[redis]\nurl = "{redis_url}"\n\n[api]\nmax_batch_bytes = {max_batch_bytes}\n')
    return path


def sample_file() -> tuple[bytes, list[bytes], dict[str, list[int]]]:
    """Return a JSON-lines file, its valid lines in order, and the rejected line numbers by reason."""
    valid = [envelope(site, event_type, seq) for seq, (site, event_type) in enumerate(
        [("1001", "cart"), ("1002", "order"), ("1001", "pageview"), ("1002", "product"), ("1001", "cart")]
    )]
    oversized = orjson.dumps({"site_id": "1001", "type": "product", "data": {"text": "x" * LINE_LIMIT}})
    # Fits the line limit, but its data alone exceeds api.max_batch_bytes.
    large_event = orjson.dumps({"site_id": "1001", "type": "product", "data": {"text": "y" * 3000}})
    lines = [
        valid[0],                                        # 1
        b"",                                             # 2 blank
        b"{not json",                                    # 3 invalid_json
        valid[1] + b"\r",                                # 4 CRLF line ending
        b'{"site_id":"1001","type":"basket","data":{}}',  # 5 unknown_type
        b"   \t",                                        # 6 blank
        oversized,                                       # 7 event_too_large (line over the limit)
        valid[2],                                        # 8
        b'{"site_id":"1002","data":{}}',                 # 9 missing_field
        large_event,                                     # 10 event_too_large (data over the limit)
        valid[3],                                        # 11
        b"[1, 2]",                                       # 12 not_an_object
        b'{"site_id":"1002","type":"visit","data":{"site":"1001"}}',  # 13 site_mismatch
        valid[4],                                        # 14, no line ending at the end of the file
    ]
    rejected = {
        "invalid_json": [3],
        "unknown_type": [5],
        "event_too_large": [7, 10],
        "missing_field": [9],
        "not_an_object": [12],
        "site_mismatch": [13],
    }
    return b"\n".join(lines), valid, rejected


async def queue(client: aioredis.Redis) -> list[bytes]:
    """Return the queue from the consuming end: the entry delivered first comes first."""
    return list(reversed(await client.lrange(KEY, 0, -1)))


async def test_enqueue_mixed_file(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    content, valid, rejected = sample_file()
    data_file = tmp_path / "events.jsonl"
    data_file.write_bytes(content)
    reject_file = tmp_path / "rejected.jsonl"
    config = write_config(tmp_path, redis_server.url)

    code, stdout, stderr = await run_cli(
        "enqueue", str(data_file), "--config", str(config), "--reject-file", str(reject_file), env=clean_env()
    )

    assert code == 1, stderr.decode()
    assert await redis_client.llen(KEY) == len(valid)
    assert await queue(redis_client) == valid
    assert await redis_client.lindex(KEY, -1) == valid[0]
    summary = stdout.decode()
    assert f"pushed 5 events onto {KEY}; 7 lines rejected, 2 blank lines skipped, 14 lines read" in summary
    assert "rejected event_too_large: 2 (lines 7, 10)" in summary
    for reason, numbers in rejected.items():
        if len(numbers) == 1:
            assert f"rejected {reason}: 1 (line {numbers[0]})" in summary
    # The rejected lines come out unchanged, in file order, the oversized one whole.
    lines = content.split(b"\n")
    expected = [lines[number - 1] for number in sorted(n for numbers in rejected.values() for n in numbers)]
    assert reject_file.read_bytes().split(b"\n")[:-1] == expected
    assert len(reject_file.read_bytes().split(b"\n")[2]) > LINE_LIMIT
    # Not a terminal: no progress output.
    assert stderr == b""


async def test_enqueue_dry_run_pushes_nothing(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    content, valid, _ = sample_file()
    data_file = tmp_path / "events.jsonl"
    data_file.write_bytes(content)
    config = write_config(tmp_path, redis_server.url)

    code, stdout, stderr = await run_cli("enqueue", str(data_file), "--config", str(config), "--dry-run",
                                         env=clean_env())

    assert code == 1, stderr.decode()
    assert stdout.decode().startswith(f"would push {len(valid)} events onto {KEY}; 7 lines rejected")
    assert await redis_client.exists(KEY) == 0


async def test_enqueue_stdin_appends_in_order(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    # 2,500 lines span three LPUSH chunks of at most 1,000.
    first = [envelope(str(1001 + n % 3), "order", n) for n in range(2500)]
    second = [envelope("1001", "cart", n) for n in range(2500, 2510)]
    config = write_config(tmp_path, redis_server.url)

    for batch in (first, second):
        code, stdout, stderr = await run_cli(
            "enqueue", "-", "--config", str(config), env=clean_env(), stdin=b"\n".join(batch) + b"\n"
        )
        assert code == 0, stderr.decode()
        assert stdout.decode().startswith(f"pushed {len(batch)} events onto {KEY}; 0 lines rejected")

    assert await queue(redis_client) == first + second


async def test_enqueue_key_prefix(tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    config = tmp_path / "forwarder.toml"
    config.write_text(f'[redis]\nurl = "{redis_server.url}"\nkey_prefix = "{{shop}}"\n')
    line = envelope("1001", "cart", 1)

    code, _, stderr = await run_cli("enqueue", "-", "--config", str(config), env=clean_env(), stdin=line)

    assert code == 0, stderr.decode()
    assert await redis_client.lrange("{shop}:events", 0, -1) == [line]
    assert await redis_client.exists(KEY) == 0


async def test_enqueue_redis_unreachable(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    data_file = tmp_path / "events.jsonl"
    data_file.write_bytes(envelope("1001", "cart", 1))

    code, stdout, stderr = await run_cli("enqueue", str(data_file), "--config", str(config), env=clean_env())

    assert code == 2
    assert stdout == b""
    assert "failed" in stderr.decode()
    assert "nothing was pushed" in stderr.decode()


async def test_enqueue_missing_file(tmp_path: Path, redis_server: RedisServer) -> None:
    config = write_config(tmp_path, redis_server.url)
    missing = tmp_path / "missing.jsonl"

    code, _, stderr = await run_cli("enqueue", str(missing), "--config", str(config), env=clean_env())

    assert code == 2
    assert f"cannot read {missing}" in stderr.decode()


async def test_enqueue_memory_flat_for_large_file(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    config = write_config(tmp_path, redis_server.url, max_batch_bytes=100_000)
    line = envelope("1001", "product", 0, description="z" * 1000)
    small = tmp_path / "small.jsonl"
    small.write_bytes(line + b"\n")
    large = tmp_path / "large.jsonl"
    count = 100_000
    with large.open("wb") as file:
        for _ in range(count // 1000):
            file.write((line + b"\n") * 1000)
    assert large.stat().st_size > 100_000_000

    async def peak_rss_kib(path: Path) -> int:
        # Runs the real CLI in a child that reports its own peak RSS when it exits.
        program = (
            "import resource, runpy, sys\n"
            "try:\n"
            "    runpy.run_module('forwarder.cli', run_name='__main__')\n"
            "finally:\n"
            "    print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        )
        env = clean_env()
        env["PYTHONPATH"] = ROOT
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", program, "enqueue", str(path), "--config", str(config),
            env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 100)
        assert process.returncode == 0, stderr.decode()
        assert stdout.decode().startswith("pushed ")
        return int(stderr.decode().rsplit("peak ", 1)[1])

    small_peak = await peak_rss_kib(small)
    large_peak = await peak_rss_kib(large)

    assert await redis_client.llen(KEY) == count + 1
    # Reading the 100 MB file whole would add at least 100 MB; streaming adds a
    # chunk of about 1 MB. 40 MB leaves room for allocator noise.
    assert large_peak - small_peak < 40 * 1024


async def test_enqueue_progress_on_terminal(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    config = write_config(tmp_path, redis_server.url)
    data_file = tmp_path / "events.jsonl"
    data_file.write_bytes(b"\n".join(envelope("1001", "cart", n) for n in range(50)))
    controller, terminal = pty.openpty()
    env = clean_env()
    env["PYTHONPATH"] = ROOT
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "forwarder.cli", "enqueue", str(data_file), "--config", str(config),
            env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=terminal,
        )
        os.close(terminal)
        terminal = -1
        stdout, _ = await asyncio.wait_for(process.communicate(), 60)
        output = b""
        while True:
            try:
                piece = os.read(controller, 65536)
            except OSError:  # EIO once the child has closed its end
                break
            if not piece:
                break
            output += piece
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)

    assert process.returncode == 0
    assert stdout.decode().startswith("pushed 50 events")
    assert b"enqueue: 50 lines read, 50 pushed, 0 rejected, 100%" in output
    assert await redis_client.llen(KEY) == 50
