"""Request body size limit: exact limit, one byte over, chunked bodies and closing early."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from forwarder.sandbox import DEFAULT_MAX_BODY_BYTES, Sandbox

TOKENS = {"tok-a": {"1001"}}
AUTH = {"Authorization": "Bearer tok-a"}


def padded_batch(size: int) -> bytes:
    """Return a valid empty batch padded with JSON whitespace to exactly `size` bytes."""
    body = b'{"cart": []}'
    return body + b" " * (size - len(body))


def raw_request(port: int, headers: str) -> bytes:
    return (
        f"POST /v2/1001/batch HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer tok-a\r\n{headers}\r\n"
    ).encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one HTTP/1.1 response with a Content-Length; return its status and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return status, await reader.readexactly(length)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=AUTH) as client:
        yield client


async def test_default_limit_is_ten_million_bytes(session: aiohttp.ClientSession) -> None:
    async with Sandbox(tokens=TOKENS) as sandbox:
        url = f"{sandbox.base_url}/1001/batch"
        async with session.post(url, data=io.BytesIO(padded_batch(10_000_000))) as at_limit:
            at_limit_status = at_limit.status
        async with session.post(url, data=io.BytesIO(padded_batch(10_000_001))) as over:
            over_status = over.status
            over_body = orjson.loads(await over.read())

    assert DEFAULT_MAX_BODY_BYTES == 10_000_000
    assert at_limit_status == 200
    assert over_status == 413
    assert over_body["error_type"] == "too_large"
    assert over_body["success"] is False


@pytest.mark.parametrize(("size", "status"), [(999, 200), (1000, 200), (1001, 413)])
async def test_configured_limit_is_inclusive(
    session: aiohttp.ClientSession, size: int, status: int
) -> None:
    async with Sandbox(tokens=TOKENS, max_body_bytes=1000) as sandbox:
        async with session.post(
            f"{sandbox.base_url}/1001/batch", data=padded_batch(size)
        ) as response:
            body = orjson.loads(await response.read())

    assert response.status == status
    if status == 413:
        assert body["error_type"] == "too_large"
    else:
        assert body == {"cart": []}
    assert sandbox.state.requests[-1].body_bytes == size


async def test_limit_applies_to_single_event_and_tracker_paths(
    session: aiohttp.ClientSession,
) -> None:
    async with Sandbox(tokens=TOKENS, max_body_bytes=50) as sandbox:
        async with session.post(f"{sandbox.base_url}/1001/customer", data=b" " * 51) as single:
            single_status = single.status
        async with session.post(f"{sandbox.base_url}/tracker/visit", data=b" " * 51) as tracker:
            tracker_status = tracker.status

    assert single_status == 413
    assert tracker_status == 413


async def test_chunked_body_over_limit_gets_413(session: aiohttp.ClientSession) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        body = padded_batch(1500)
        for start in range(0, len(body), 500):
            yield body[start : start + 500]

    async with Sandbox(tokens=TOKENS, max_body_bytes=1000) as sandbox:
        async with session.post(f"{sandbox.base_url}/1001/batch", data=chunks()) as response:
            body = orjson.loads(await response.read())

    assert response.status == 413
    assert body["error_type"] == "too_large"
    assert sandbox.state.requests[-1].content_length is None


async def test_oversized_body_is_drained_and_connection_kept() -> None:
    async with Sandbox(tokens=TOKENS, max_body_bytes=100) as sandbox:
        reader, writer = await asyncio.open_connection("127.0.0.1", sandbox.port)
        try:
            writer.write(raw_request(sandbox.port, "Content-Length: 101\r\n") + padded_batch(101))
            first_status, first_body = await read_response(reader)
            # The same connection serves the next request.
            writer.write(raw_request(sandbox.port, "Content-Length: 100\r\n") + padded_batch(100))
            second_status, _ = await read_response(reader)
        finally:
            writer.close()
            await writer.wait_closed()

    assert first_status == 413
    assert orjson.loads(first_body)["error_type"] == "too_large"
    assert second_status == 200
    assert sandbox.state.requests[0].body_bytes == 101


async def test_close_on_oversize_answers_before_body_is_sent() -> None:
    async with Sandbox(tokens=TOKENS, max_body_bytes=100, close_on_oversize=True) as sandbox:
        reader, writer = await asyncio.open_connection("127.0.0.1", sandbox.port)
        try:
            # Only the headers: the sandbox must respond without waiting for the body.
            writer.write(raw_request(sandbox.port, "Content-Length: 101\r\n"))
            async with asyncio.timeout(5):
                status, body = await read_response(reader)
                rest = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()

    assert status == 413
    assert orjson.loads(body) == {
        "error_type": "too_large",
        "message": "request body is larger than the limit of 100 bytes",
        "success": False,
    }
    assert rest == b""  # the sandbox closed the connection
    assert sandbox.state.requests[0].body_bytes == 0
    assert sandbox.state.requests[0].content_length == 101


async def test_close_on_oversize_stops_reading_chunked_body() -> None:
    async with Sandbox(tokens=TOKENS, max_body_bytes=100, close_on_oversize=True) as sandbox:
        reader, writer = await asyncio.open_connection("127.0.0.1", sandbox.port)
        try:
            # One 128-byte chunk and no final chunk: the body never ends.
            writer.write(
                raw_request(sandbox.port, "Transfer-Encoding: chunked\r\n")
                + b"80\r\n"
                + b" " * 128
                + b"\r\n"
            )
            async with asyncio.timeout(5):
                status, _ = await read_response(reader)
                rest = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()

    assert status == 413
    assert rest == b""
    assert sandbox.state.requests[0].body_bytes == 128


async def test_close_on_oversize_seen_by_uploading_client(session: aiohttp.ClientSession) -> None:
    body = padded_batch(4_000_000)
    async with Sandbox(tokens=TOKENS, max_body_bytes=1000, close_on_oversize=True) as sandbox:
        try:
            async with session.post(
                f"{sandbox.base_url}/1001/batch", data=io.BytesIO(body)
            ) as response:
                outcome: int | str = response.status
        except aiohttp.ClientError as exc:
            # The client may see the reset before it reads the 413, as with a proxy.
            outcome = type(exc).__name__

    assert outcome in (413, "ClientOSError", "ServerDisconnectedError")
    assert sandbox.state.requests[0].status == 413
    assert sandbox.state.requests[0].body_bytes == 0
