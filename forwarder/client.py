"""HTTP client for the Event API: one request, its outcome, and nothing else."""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiohttp
import orjson

from forwarder.backoff import parse_retry_after
from forwarder.outcome import Outcome, classify_response, classify_transport_error


@dataclass(slots=True)
class Response:
    outcome: Outcome
    body: bytes
    elapsed_s: float


class ApiClient:
    """Sends request bodies to the Event API with the configured timeouts."""

    def __init__(
        self, base_url: str, timeout_s: float, connect_timeout_s: float, read_timeout_s: float, max_connections: int
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(
            total=timeout_s, connect=connect_timeout_s, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._max_connections, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            # Responses are small JSON documents read whole; no cookies are involved.
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def batch_url(self, site_id: str) -> str:
        return f"{self.base_url}/{site_id}/batch"

    def tracker_url(self, event_type: str) -> str:
        return f"{self.base_url}/tracker/{event_type}"

    async def post(self, url: str, token: str, body: bytes, batch: bool) -> Response:
        assert self._session is not None, "ApiClient.start() was not called"
        headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "User-Agent": "jirafe-forwarder",
        }
        started = time.monotonic()
        response_started = False
        try:
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                response_started = True
                payload = await resp.read()
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Response(classify_transport_error(exc, response_started), b"", time.monotonic() - started)
        error_type = None if 200 <= status < 300 else _error_type(payload)
        outcome = classify_response(status, error_type, retry_after, batch=batch)
        return Response(outcome, payload, time.monotonic() - started)


def _error_type(payload: bytes) -> str | None:
    try:
        parsed = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if isinstance(parsed, dict):
        value = parsed.get("error_type")
        if isinstance(value, str) and len(value) <= 64:
            return value
    return None
