"""Redis clients built from `redis.url`: plain, TLS, Unix socket, or through Sentinel.

Sentinel URLs name the sentinels and the monitored service:

    redis+sentinel://[user:password@]host1:26379,host2:26379/SERVICE[/DB]
    rediss+sentinel://...   (TLS to the primary)

The credentials are those of the primary; the sentinels are asked without them.
Clients built for Sentinel find the primary on every new connection and drop their
connections when a demoted server replies READONLY, so a failover needs no restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse a Sentinel URL; raise ValueError naming what is wrong."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"expected a URL starting with {' or '.join(s + '://' for s in SENTINEL_SCHEMES)}")
    credentials, at, location = rest.rpartition("@")
    if not at:
        credentials, location = "", rest
    hosts_part, _, path = location.partition("/")
    username = password = None
    if credentials:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for host_port in filter(None, hosts_part.split(",")):
        host, colon, port_text = host_port.rpartition(":")
        if not colon:
            host, port_text = host_port, str(DEFAULT_SENTINEL_PORT)
        host = host.strip("[]")
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"invalid sentinel address {host_port!r}: expected HOST:PORT")
        sentinels.append((host, int(port_text)))
    if not sentinels:
        raise ValueError("no sentinel address: expected HOST:PORT[,HOST:PORT...] after the scheme")
    service, _, db_text = path.partition("/")
    if not service:
        raise ValueError("no service name: expected /SERVICE after the sentinel addresses, such as /mymaster")
    if db_text and not db_text.isdigit():
        raise ValueError(f"invalid database {db_text!r}: expected a number after the service name")
    return SentinelTarget(sentinels, unquote(service), int(db_text or 0), username, password,
                          scheme == "rediss+sentinel")


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0] in SENTINEL_SCHEMES


def async_client(url: str, **options: Any) -> aioredis.Redis:
    """Build an asyncio client for `url`; options are redis-py connection settings."""
    if not is_sentinel_url(url):
        return aioredis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    sentinel_options = {key: options[key] for key in ("socket_timeout", "socket_connect_timeout") if key in options}
    sentinel = AsyncSentinel(target.sentinels, sentinel_kwargs=sentinel_options, **sentinel_options)
    return sentinel.master_for(target.service, **_primary_options(target, options))


def sync_client(url: str, **options: Any) -> redis.Redis:
    """Build a blocking client for `url`, for the command-line tools."""
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    sentinel_options = {key: options[key] for key in ("socket_timeout", "socket_connect_timeout") if key in options}
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=sentinel_options, **sentinel_options)
    return sentinel.master_for(target.service, **_primary_options(target, options))


def _primary_options(target: SentinelTarget, options: dict[str, Any]) -> dict[str, Any]:
    primary = {**options, "db": target.db, "username": target.username, "password": target.password}
    if target.tls:
        primary["ssl"] = True
    return primary
