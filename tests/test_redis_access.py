"""Redis access as docs/operations.md describes it: the ACL user's command list, and TLS."""

from __future__ import annotations

import asyncio
import shlex
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from forwarder.sandbox import Sandbox
from tests.daemon_proc import ROOT, StartDaemon, daemon_env
from tests.e2e import envelope, push, run_cli, wait_drained, wait_redis
from tests.servers import RedisServer, free_port

OPERATIONS = Path(ROOT) / "docs" / "operations.md"
PASSWORD = "acl-test-password-6d1f"



def documented_acl_command() -> list[str]:
    """Return the ACL SETUSER command that docs/operations.md gives operators."""
    lines = [line.strip() for line in OPERATIONS.read_text().splitlines()
             if line.strip().startswith("ACL SETUSER jirafe-forwarder ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].replace(">PASSWORD", f">{PASSWORD}"))


@pytest.fixture
async def acl_url(redis_server: RedisServer, redis_client: aioredis.Redis) -> AsyncIterator[str]:
    await redis_client.execute_command(*documented_acl_command())
    yield f"redis://jirafe-forwarder:{PASSWORD}@127.0.0.1:{redis_server.port}/0"
    await redis_client.acl_deluser("jirafe-forwarder")


async def test_documented_acl_covers_daemon_and_cli(
    tmp_path: Path, acl_url: str, redis_client: aioredis.Redis, start_daemon: StartDaemon
) -> None:
    # The user may touch only keys under the prefix.
    limited = aioredis.Redis.from_url(acl_url)
    try:
        with pytest.raises(NoPermissionError):
            await limited.set("other:key", "1")
    finally:
        await limited.aclose()

    config = tmp_path / "forwarder.toml"
    config.write_text('[api]\ntoken = "token-default"\n')
    invalid_cart = orjson.loads(envelope("1001", "cart", 99))
    del invalid_cart["data"]["total"]
    entries = [*(envelope("1001", "order", n) for n in range(20)), orjson.dumps(invalid_cart), b"{not json",
               *(envelope("1002", "order", n) for n in range(3))]

    async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
        env = daemon_env(acl_url, sandbox.base_url, token=None, batch_linger_ms=20)
        daemon = await start_daemon(env, ["--config", str(config)])
        await push(redis_client, entries)
        await sandbox.wait_for(lambda state: state.total_accepted >= 20, timeout=30)
        await daemon.wait_for_log("site paused: the API rejected its credentials; events are kept")
        await daemon.wait_for(lambda records: len([r for r in records if "dead-lettered" in r["event"]]) >= 2)
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for_log("configuration reloaded")

        cli_env = dict(env)
        code, stdout, stderr = await run_cli("status", "--json", "--config", str(config), env=cli_env)
        assert code == 1, stderr.decode()
        assert orjson.loads(stdout)["rate"]["instances"] == 1

        data_file = tmp_path / "more.jsonl"
        data_file.write_bytes(b"\n".join(envelope("1001", "order", n) for n in range(20, 25)))
        code, _, stderr = await run_cli("enqueue", str(data_file), "--config", str(config), env=cli_env)
        assert code == 0, stderr.decode()
        await sandbox.wait_for(lambda state: state.total_accepted >= 25, timeout=30)

        for args in (["dead", "list"], ["dead", "export"], ["dead", "show", "1"],
                     ["dead", "replay", "--reason", "validation"]):
            code, _, stderr = await run_cli(*args, "--config", str(config), env=cli_env)
            assert code == 0, (args, stderr.decode())
        # The replayed cart is still invalid, so the API rejects it again. (Its log
        # line is a repeat within the rate limit's window, so Redis is watched.)
        await wait_redis(lambda: redis_client.zcard("jirafe:dead:index"), 2)
        code, _, stderr = await run_cli("dead", "purge", "--yes", "--config", str(config), env=cli_env)
        assert code == 0, stderr.decode()
        assert await redis_client.zcard("jirafe:dead:index") == 0

        assert await daemon.stop() == 0

    # redis-py raises NoPermissionError for a NOPERM reply.
    assert not [line for line in daemon.raw_lines if b"NoPermissionError" in line or b"no permissions" in line]
    assert not daemon.logs("redis call failed, retrying")


def make_certificates(directory: Path) -> None:
    """Write a CA and a server certificate for 127.0.0.1 into `directory`."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=jirafe-forwarder test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext")


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server that accepts TLS only, and the CA file that verifies it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (Debian package openssl)")
    directory = tmp_path / "tls"
    directory.mkdir()
    make_certificates(directory)
    port = free_port()
    binary = shutil.which("redis-server")
    assert binary is not None
    process = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--dir", str(directory), "--tls-cert-file", "server.pem", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"],
        cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        yield port, directory / "ca.pem"
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
        if process.returncode not in (0, -signal.SIGTERM):
            pytest.fail(f"TLS redis-server failed: {output.decode(errors='replace')[-2000:]}")


async def wait_for_tls_redis(url: str) -> aioredis.Redis:
    client = aioredis.Redis.from_url(url)
    async with asyncio.timeout(20):
        while True:
            try:
                await client.ping()
                return client
            except (aioredis.ConnectionError, OSError):
                await asyncio.sleep(0.05)  # the server is still starting; nothing to await


async def test_daemon_and_cli_over_tls(tmp_path: Path, tls_redis: tuple[int, Path], start_daemon: StartDaemon) -> None:
    port, ca_file = tls_redis
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca_file}"
    client = await wait_for_tls_redis(url)
    try:
        async with Sandbox(tokens={"token-default": {"1001"}}) as sandbox:
            env = daemon_env(url, sandbox.base_url, batch_linger_ms=20)
            daemon = await start_daemon(env)
            data_file = tmp_path / "events.jsonl"
            data_file.write_bytes(b"\n".join(envelope("1001", "cart", n) for n in range(30)))
            code, _, stderr = await run_cli("enqueue", str(data_file), env=env)
            assert code == 0, stderr.decode()
            await sandbox.wait_for(lambda state: state.total_accepted >= 30, timeout=30)
            await wait_drained(client)
            code, stdout, stderr = await run_cli("status", "--json", "--no-rate", env=env)
            assert code == 0, stderr.decode()
            document = orjson.loads(stdout)
            assert document["redis"]["url"].startswith("rediss://")
            assert document["live_instances"] == 1
            assert await daemon.stop() == 0
            assert [event.data["seq"] for event in sandbox.state.events("1001", "cart")] == list(range(30))
    finally:
        await client.aclose()

    # A client that does not trust the CA is turned away.
    untrusted = {**env, "JIRAFE_FORWARDER_REDIS_URL": f"rediss://127.0.0.1:{port}/0"}
    code, _, stderr = await run_cli("status", "--no-rate", env=untrusted)
    assert code == 2
    assert "CERTIFICATE_VERIFY_FAILED" in stderr.decode() or "certificate verify failed" in stderr.decode()
