"""Configuration: one TOML file, overridden by `JIRAFE_FORWARDER_*` environment variables.

`load_config` reads the file, applies the environment, reads token files and validates
everything. It raises `ConfigError` with every problem it found, so that one run of
`check-config` shows them all. Token values never appear in a problem message, a repr
or `Config.to_public_dict()`.

Every setting `<section>.<key>` can also be set as `JIRAFE_FORWARDER_<SECTION>_<KEY>`,
for example `JIRAFE_FORWARDER_BATCH_LINGER_MS=200`. Site tokens use
`JIRAFE_FORWARDER_SITES_<ID>_TOKEN` and `JIRAFE_FORWARDER_SITES_<ID>_TOKEN_FILE`.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import unquote, urlsplit

from forwarder.redis_connect import is_sentinel_url, parse_sentinel_url

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "ApiConfig",
    "BatchConfig",
    "Config",
    "ConfigError",
    "DeadLetterConfig",
    "LeaseConfig",
    "LogConfig",
    "MetricsConfig",
    "RedisConfig",
    "RetryConfig",
    "ShutdownConfig",
    "SiteConfig",
    "check_config",
    "load_config",
]

DEFAULT_CONFIG_PATH = "/etc/jirafe-forwarder/forwarder.toml"
ENV_PREFIX = "JIRAFE_FORWARDER_"

# NOTE: this must match TimeoutStopSec in the systemd unit. systemd does not pass the
# stop timeout to the service, so the value cannot be read at run time.
SYSTEMD_TIMEOUT_STOP_S = 30.0

# Tokens are short, so the cap only stops a wrong path (a log file, /dev/zero) from
# being read into memory.
MAX_TOKEN_FILE_BYTES = 65536

_MASK = "***"
_SITE_ID = re.compile(r"[0-9]+")
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_URL_PASSWORD = re.compile(r"(://[^/@]*?:)[^/@]*@")


class ConfigError(Exception):
    """Invalid configuration. `problems` lists every problem found, one message each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(*problems)
        self.problems = list(problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


class _Invalid(ValueError):
    """A value that has the right type but fails its check.

    A non-empty message replaces the spec's expected text because it is more precise.
    """


@dataclass(frozen=True, slots=True)
class _Spec:
    """Parsing and validation rules of one setting.

    `kind` is the Python type read from TOML and parsed from the environment.
    `expected` completes the message "invalid value X: expected ...". `check`
    returns the normalised value or raises `_Invalid`. A secret value is never shown.
    """

    kind: type
    expected: str
    check: Callable[[Any], Any]
    secret: bool = False


def _setting(default: Any, spec: _Spec) -> Any:
    return field(default=default, metadata={"spec": spec})


def _int(low: int, high: int | None = None) -> _Spec:
    if high is None:
        expected = f"an integer >= {low}"
    else:
        expected = f"an integer from {low} to {high}"

    def check(value: int) -> int:
        if value < low or (high is not None and value > high):
            raise _Invalid
        return value

    return _Spec(int, expected, check)


def _seconds(low: float = 0.0, *, inclusive: bool = False) -> _Spec:
    """Spec for a finite number of seconds above `low` (or equal to it when inclusive)."""
    expected = f"a number of seconds {'>=' if inclusive else '>'} {low:g}"

    def check(value: float) -> float:
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise _Invalid
        return value

    return _Spec(float, expected, check)


def _choice(*options: str) -> _Spec:
    expected = "one of " + ", ".join(options)

    def check(value: str) -> str:
        normalised = value.strip().lower()
        if normalised not in options:
            raise _Invalid
        return normalised

    return _Spec(str, expected, check)


_BOOL = _Spec(bool, "a boolean (true or false)", lambda value: value)


def _check_redis_url(value: str) -> str:
    if is_sentinel_url(value):
        try:
            parse_sentinel_url(value)
        except ValueError as error:
            raise _Invalid(f"a redis+sentinel://HOST:PORT[,HOST:PORT]/SERVICE[/DB] URL ({error})") from None
        return value
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as error:
        raise _Invalid(f"a redis://, rediss://, unix:// or redis+sentinel:// URL ({error})") from None
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise _Invalid("a redis:// or rediss:// URL with a host")
        if port == 0:
            raise _Invalid("a port from 1 to 65535")
        database = parts.path.lstrip("/")
        if database and not database.isdigit():
            raise _Invalid("a database number as the URL path, such as /0")
        return value
    if parts.scheme == "unix":
        if not parts.path:
            raise _Invalid("a unix:// URL with a socket path, such as unix:///run/redis.sock")
        return value
    raise _Invalid


def _check_key_prefix(value: str) -> str:
    if not value or any(char.isspace() or not char.isprintable() for char in value):
        raise _Invalid
    return value


def _check_base_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as error:
        raise _Invalid(f"an http:// or https:// URL ({error})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Invalid
    if parts.username is not None or parts.password is not None:
        raise _Invalid("a URL without user or password (set api.token instead)")
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise _Invalid("a URL without query or fragment")
    if port == 0:
        raise _Invalid("a port from 1 to 65535")
    return value.rstrip("/")


def _check_token(value: str) -> str:
    # Tokens travel in the Authorization header: visible ASCII only.
    if not value or any(not ("!" <= char <= "~") for char in value):
        raise _Invalid
    return value


def _check_path(value: str) -> str:
    if not value or "\0" in value:
        raise _Invalid
    return value


def _check_listen(value: str) -> str | None:
    if value == "":
        return None
    _split_listen(value)
    return value


def _split_listen(value: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 in brackets) into host and port. Raise `_Invalid` if malformed."""
    if value.startswith("["):
        host, bracket, port_text = value[1:].partition("]:")
        if not bracket:
            raise _Invalid("HOST:PORT with the IPv6 address in brackets, such as [::1]:9187")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(f"a valid IPv6 address in brackets, not {host!r}") from None
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon or not host:
            raise _Invalid
        if ":" in host:
            raise _Invalid("HOST:PORT with the IPv6 address in brackets, such as [::1]:9187")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise _Invalid(f"a valid IPv4 address, not {host!r}") from None
        elif not _HOSTNAME.fullmatch(host) or len(host) > 253:
            raise _Invalid(f"a valid host name or IP address, not {host!r}")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise _Invalid(f"a port from 0 to 65535, not {port_text!r}")
    return host, int(port_text)


_TOKEN = _Spec(str, "a non-empty string of visible ASCII characters", _check_token, secret=True)
_TOKEN_FILE = _Spec(str, "a non-empty file path", _check_path)


def _repr_masked(self: Any) -> str:
    """Render a dataclass like the generated repr, with secret values masked."""
    parts = []
    for item in fields(self):
        value = getattr(self, item.name)
        spec = item.metadata.get("spec")
        if spec is not None and spec.secret and value is not None:
            parts.append(f"{item.name}={_MASK!r}")
        elif item.name == "url" and isinstance(value, str):
            parts.append(f"{item.name}={_mask_url_password(value)!r}")
        else:
            parts.append(f"{item.name}={value!r}")
    return f"{type(self).__name__}({', '.join(parts)})"


@dataclass(frozen=True, slots=True, repr=False)
class RedisConfig:
    """Connection to the Redis server that contains the event list and the daemon's state."""

    url: str = _setting(
        "redis://127.0.0.1:6379/0",
        _Spec(str, "a redis://, rediss://, unix:// or redis+sentinel:// URL", _check_redis_url),
    )
    key_prefix: str = _setting(
        "jirafe", _Spec(str, "a non-empty string without whitespace", _check_key_prefix)
    )
    socket_timeout_s: float = _setting(5.0, _seconds())
    connect_timeout_s: float = _setting(5.0, _seconds())
    # 0 turns off the PING that redis-py (8.2) sends on a connection idle for longer.
    health_check_interval_s: float = _setting(10.0, _seconds(inclusive=True))
    # Must stay below socket_timeout_s, or a blocking read that waits for events
    # would look like a dead connection.
    block_timeout_s: float = _setting(1.0, _seconds())

    __repr__ = _repr_masked


@dataclass(frozen=True, slots=True, repr=False)
class ApiConfig:
    """The Jirafe Event API endpoint and the default token used for sites without their own.

    `token` is the resolved token, read from `token_file` when that is set. `token_file`
    is kept as the absolute path that was read, for reports.
    """

    base_url: str = _setting(
        "https://event.jirafe.com/v2",
        _Spec(str, "an http:// or https:// URL with a host", _check_base_url),
    )
    token: str | None = _setting(None, _TOKEN)
    token_file: str | None = _setting(None, _TOKEN_FILE)
    # The API documents a limit of 10 MB of events per batch request.
    max_batch_bytes: int = _setting(10_000_000, _int(1024, 100_000_000))
    # The whole request: connecting, sending the body and reading the response.
    timeout_s: float = _setting(30.0, _seconds())
    connect_timeout_s: float = _setting(5.0, _seconds())
    # Maximum wait between two reads of the response.
    read_timeout_s: float = _setting(15.0, _seconds())
    # Requests in flight at once, over all sites.
    max_concurrency: int = _setting(8, _int(1, 1024))

    __repr__ = _repr_masked


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """Grouping of events into batch requests."""

    linger_ms: int = _setting(500, _int(0, 60_000))
    max_events: int = _setting(1000, _int(1, 1_000_000))
    # Events read from the Redis list at a time (at most 5000, and about 16 MB).
    intake_chunk_events: int = _setting(5000, _int(1, 100_000))
    # Check each event's data against the bundled JSON schemas before sending.
    validate_events: bool = _setting(False, _BOOL)


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """Backoff for failed requests and for sites paused on a rejected token."""

    base_s: float = _setting(0.5, _seconds())
    cap_s: float = _setting(300.0, _seconds())
    max_attempts: int = _setting(5, _int(1, 1000))
    max_outage_s: float = _setting(259_200.0, _seconds())
    max_retry_after_s: float = _setting(3600.0, _seconds())
    pause_base_s: float = _setting(30.0, _seconds())
    pause_cap_s: float = _setting(900.0, _seconds())


@dataclass(frozen=True, slots=True)
class DeadLetterConfig:
    """Bounds of the dead-letter store."""

    max_entries: int = _setting(100_000, _int(1))
    max_bytes: int = _setting(1_073_741_824, _int(1024))
    excerpt_bytes: int = _setting(2000, _int(0, 1_048_576))


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    """Leases on claimed events, so that the claims of a dead process are recovered."""

    # Claims of a process that is gone are recovered after this time.
    ttl_s: float = _setting(15.0, _seconds(1.0, inclusive=True))
    # At most a third of ttl_s.
    renew_interval_s: float = _setting(5.0, _seconds())


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    """Deadlines of a graceful stop."""

    # Time that requests in flight get to finish after a stop request.
    grace_s: float = _setting(10.0, _seconds(inclusive=True))
    # Time by which everything unacknowledged is handed back, counted from the stop
    # request. Greater than grace_s and less than SYSTEMD_TIMEOUT_STOP_S.
    hard_deadline_s: float = _setting(25.0, _seconds())


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Address of the HTTP server for /metrics, /healthz and /readyz. None turns it off."""

    listen: str | None = _setting(
        "127.0.0.1:9187",
        _Spec(str, "HOST:PORT, or an empty string to turn metrics off", _check_listen),
    )

    @property
    def address(self) -> tuple[str, int] | None:
        """Host (IPv6 without brackets) and port to bind, or None when metrics are off."""
        if self.listen is None:
            return None
        return _split_listen(self.listen)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Log level and output format. `auto` writes JSON lines unless stderr is a terminal."""

    level: str = _setting("info", _choice("debug", "info", "warning", "error"))
    format: str = _setting("auto", _choice("auto", "json", "console"))


@dataclass(frozen=True, slots=True, repr=False)
class SiteConfig:
    """Token of one site, which replaces `api.token` for that site."""

    token: str | None = _setting(None, _TOKEN)
    token_file: str | None = _setting(None, _TOKEN_FILE)

    __repr__ = _repr_masked


@dataclass(frozen=True, slots=True)
class Config:
    """The effective configuration: file, environment and token files combined."""

    redis: RedisConfig = field(default_factory=RedisConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    dead_letter: DeadLetterConfig = field(default_factory=DeadLetterConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sites: dict[str, SiteConfig] = field(default_factory=dict)
    source_path: str | None = None

    def token_for(self, site_id: str) -> str | None:
        """Return the site's own token, else the default token, else None."""
        site = self.sites.get(site_id)
        if site is not None and site.token is not None:
            return site.token
        return self.api.token

    def all_tokens(self) -> list[str]:
        """Return every secret for log redaction: API tokens and the Redis URL password."""
        secrets = [self.api.token, *(site.token for site in self.sites.values())]
        password = urlsplit(self.redis.url).password
        if password:
            secrets += [password, unquote(password)]
        return list(dict.fromkeys(secret for secret in secrets if secret))

    def to_public_dict(self) -> dict[str, Any]:
        """Return the effective configuration as JSON-compatible data with secrets masked."""
        result: dict[str, Any] = {"source_path": self.source_path}
        for name in _SECTIONS:
            result[name] = _public_section(getattr(self, name))
        result["sites"] = {
            site_id: _public_section(site) for site_id, site in sorted(self.sites.items())
        }
        return result


_SECTIONS: dict[str, type] = {
    item.name: item.default_factory
    for item in fields(Config)
    if item.name not in ("sites", "source_path")
}


def _public_section(section: Any) -> dict[str, Any]:
    result = {}
    for item in fields(section):
        value = getattr(section, item.name)
        if item.metadata["spec"].secret and value is not None:
            value = _MASK
        elif item.name == "url":
            value = _mask_url_password(value)
        result[item.name] = value
    return result


def _mask_url_password(url: str) -> str:
    return _URL_PASSWORD.sub(rf"\1{_MASK}@", url)


def _specs(section_type: type) -> dict[str, _Spec]:
    return {item.name: item.metadata["spec"] for item in fields(section_type)}


@dataclass(slots=True)
class _Value:
    """A checked value and the name it came from: `api.timeout_s` or an environment variable."""

    value: Any
    label: str


@dataclass(slots=True)
class _Layer:
    """Settings from one source, the file or the environment."""

    sections: dict[str, dict[str, _Value]] = field(default_factory=dict)
    sites: dict[str, dict[str, _Value]] = field(default_factory=dict)


class _Rejected(Exception):
    """A rejected value. The message is the problem to report."""


def _show(value: Any) -> str:
    """Render a rejected value for a message, TOML style, shortened when long."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = repr(_mask_url_password(value))
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    names.update({list: "an array", dict: "a table"})
    return names.get(type(value), "a date or time")


def _rejection(label: str, spec: _Spec, raw: Any, error: _Invalid | None = None) -> _Rejected:
    expected = str(error) if error is not None and str(error) else spec.expected
    if spec.secret:
        return _Rejected(f"{label}: invalid value (not shown): expected {expected}")
    return _Rejected(f"{label}: invalid value {_show(raw)}: expected {expected}")


def _apply_check(label: str, spec: _Spec, value: Any, raw: Any) -> Any:
    """Return `spec.check(value)`. A rejection shows `raw`, the value as the user wrote it."""
    try:
        return spec.check(value)
    except _Invalid as error:
        raise _rejection(label, spec, raw, error) from None


def _parse_toml_value(label: str, spec: _Spec, value: Any) -> Any:
    """Type-check and check one TOML value. Raise `_Rejected` if it is invalid."""
    if spec.kind is float and type(value) is int:
        value = float(value)
    if type(value) is not spec.kind:
        raise _rejection(label, spec, value)
    return _apply_check(label, spec, value, value)


_ENV_TRUE = ("true", "1", "yes")
_ENV_FALSE = ("false", "0", "no")


def _parse_env_value(label: str, spec: _Spec, raw: str) -> Any:
    """Parse and check one environment value. Raise `_Rejected` if it is invalid."""
    value: Any = raw
    if spec.kind is bool:
        word = raw.strip().lower()
        if word not in _ENV_TRUE + _ENV_FALSE:
            expected = "true, false, 1, 0, yes or no"
            raise _Rejected(f"{label}: invalid value {_show(raw)}: expected {expected}")
        value = word in _ENV_TRUE
    elif spec.kind in (int, float):
        try:
            value = spec.kind(raw)
        except ValueError:
            raise _rejection(label, spec, raw) from None
    return _apply_check(label, spec, value, raw)


def _unknown(
    label: str,
    category: str,
    word: str,
    candidates: list[str],
    display_names: list[str],
    expected: str | None = None,
) -> str:
    """Describe an unknown `word` and suggest the closest of `candidates`.

    `display_names[i]` is how `candidates[i]` appears in the message. Without a close
    match the message lists `display_names`, or gives `expected` when set.
    """
    matches = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if matches:
        suggestion = display_names[candidates.index(matches[0])]
        return f"{label}: unknown {category}: did you mean {suggestion}?"
    listed = expected or "one of " + ", ".join(display_names)
    return f"{label}: unknown {category}: expected {listed}"


def _site_label(site_id: str) -> str:
    return f"sites.{site_id}" if re.fullmatch(r"[A-Za-z0-9_-]+", site_id) else f"sites.{site_id!r}"


def _env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section}_{key}".upper()


def _parse_site_variable(name: str) -> tuple[str, str] | None:
    """Split JIRAFE_FORWARDER_SITES_<ID>_TOKEN[_FILE] into (id, key), or return None."""
    prefix = f"{ENV_PREFIX}SITES_"
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix) :]
    # TOKEN_FILE first, so that <ID>_TOKEN_FILE is not read as site "<ID>_TOKEN".
    for key in ("token_file", "token"):
        suffix = f"_{key.upper()}"
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return rest[: -len(suffix)], key
    return None


_SITE_KEYS = ("token", "token_file")
_ALL_KEYS = [(section, key) for section, cls in _SECTIONS.items() for key in _specs(cls)]
_ENV_NAMES = {_env_name(section, key): (section, key) for section, key in _ALL_KEYS}


class _Loader:
    """Collects settings from the file and the environment, and every problem found."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        # (section, key) of every rejected value. The section of a site is "sites.<id>".
        self.rejected: set[tuple[str, str]] = set()

    def read_toml(self, path: str) -> dict[str, Any]:
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as error:
            self.problems.append(f"{path}: cannot read config file: {error.strerror or error}")
            return {}
        try:
            return tomllib.loads(data.decode("utf-8"))
        except UnicodeDecodeError as error:
            self.problems.append(f"{path}: invalid TOML: not UTF-8 at byte {error.start}")
        except tomllib.TOMLDecodeError as error:
            # The message ends with the position, such as "(at line 3, column 7)".
            self.problems.append(f"{path}: invalid TOML: {error}")
        return {}

    def _accept(
        self,
        into: dict[str, _Value],
        section: str,
        key: str,
        label: str,
        parse: Callable[[str, _Spec, Any], Any],
        raw: Any,
    ) -> None:
        """Parse `raw` with `parse` into `into[key]`, or record the problem."""
        specs = _specs(SiteConfig if section.startswith("sites.") else _SECTIONS[section])
        try:
            into[key] = _Value(parse(label, specs[key], raw), label)
        except _Rejected as rejected:
            self.rejected.add((section, key))
            self.problems.append(str(rejected))

    def _read_table(
        self, label: str, section: str, table: dict[str, Any], specs: dict[str, _Spec]
    ) -> dict[str, _Value]:
        values: dict[str, _Value] = {}
        for key, raw in table.items():
            key_label = f"{label}.{key}"
            if key not in specs:
                self.problems.append(_unknown(key_label, "key", key, list(specs), list(specs)))
                continue
            self._accept(values, section, key, key_label, _parse_toml_value, raw)
        return values

    def read_file_layer(self, data: dict[str, Any]) -> _Layer:
        layer = _Layer()
        section_names = [*_SECTIONS, "sites"]
        for name, content in data.items():
            if name not in section_names:
                if isinstance(content, dict):
                    self.problems.append(
                        _unknown(name, "section", name, section_names, section_names)
                    )
                else:
                    # A key outside any table: suggest the section it belongs in.
                    keys = [key for _, key in _ALL_KEYS]
                    dotted = [f"{section}.{key}" for section, key in _ALL_KEYS]
                    expected = "every key inside a [section] table"
                    self.problems.append(_unknown(name, "key", name, keys, dotted, expected))
            elif not isinstance(content, dict):
                self.problems.append(
                    f"{name}: expected a table [{name}], found {_toml_type(content)}"
                )
            elif name == "sites":
                self._read_file_sites(content, layer)
            else:
                layer.sections[name] = self._read_table(
                    name, name, content, _specs(_SECTIONS[name])
                )
        return layer

    def _read_file_sites(self, content: dict[str, Any], layer: _Layer) -> None:
        for site_id, site in content.items():
            label = _site_label(site_id)
            if not _SITE_ID.fullmatch(site_id):
                self.problems.append(
                    f'{label}: invalid site id {site_id!r}: expected digits, such as "1234"'
                )
            elif not isinstance(site, dict):
                # The value may be a misplaced token, so only its type is shown.
                self.problems.append(
                    f"{label}: expected a table with token or token_file, found {_toml_type(site)}"
                )
            else:
                layer.sites[site_id] = self._read_table(
                    label, f"sites.{site_id}", site, _specs(SiteConfig)
                )

    def read_env_layer(self, env: Mapping[str, str]) -> _Layer:
        layer = _Layer()
        for name in sorted(env):
            if not name.startswith(ENV_PREFIX):
                continue
            raw = env[name]
            if name in _ENV_NAMES:
                section, key = _ENV_NAMES[name]
                values = layer.sections.setdefault(section, {})
                self._accept(values, section, key, name, _parse_env_value, raw)
                continue
            site = _parse_site_variable(name)
            if site is None:
                # Compare without the prefix, which every candidate shares.
                suffixes = [known.removeprefix(ENV_PREFIX) for known in _ENV_NAMES]
                word = name.removeprefix(ENV_PREFIX)
                expected = (
                    f"{ENV_PREFIX}<SECTION>_<KEY> for a key of the config file, "
                    f"or {ENV_PREFIX}SITES_<ID>_TOKEN or _TOKEN_FILE"
                )
                self.problems.append(
                    _unknown(
                        name, "environment variable", word, suffixes, list(_ENV_NAMES), expected
                    )
                )
                continue
            site_id, key = site
            if not _SITE_ID.fullmatch(site_id):
                self.problems.append(
                    f"{name}: invalid site id {site_id!r}: expected digits, "
                    f"such as {ENV_PREFIX}SITES_1234_{key.upper()}"
                )
                continue
            values = layer.sites.setdefault(site_id, {})
            self._accept(values, f"sites.{site_id}", key, name, _parse_env_value, raw)
        return layer

    def merge_token_source(
        self, file_values: dict[str, _Value], env_values: dict[str, _Value]
    ) -> dict[str, _Value]:
        """Combine the token settings of the API or of one site from the two sources.

        A token or token file set in the environment replaces both token settings of
        the file, so an override never conflicts with the file. Both set in one source
        is a problem.
        """
        for values in (file_values, env_values):
            if "token" in values and "token_file" in values:
                names = f"{values['token'].label} and {values['token_file'].label}"
                self.problems.append(f"{names} are both set: set only one of them")
        source = env_values if any(key in env_values for key in _SITE_KEYS) else file_values
        return {key: value for key, value in source.items() if key in _SITE_KEYS}

    def resolve_tokens(self, values: dict[str, _Value], base_dir: str) -> dict[str, Any]:
        """Return token and token_file for the API or a site, reading the token file if set."""
        token = values["token"].value if "token" in values else None
        token_file = None
        if "token_file" in values:
            entry = values["token_file"]
            token_file = os.path.abspath(os.path.join(base_dir, entry.value))
            token = self._read_token_file(entry.label, token_file)
        return {"token": token, "token_file": token_file}

    def _read_token_file(self, label: str, path: str) -> str | None:
        """Read a token. Problems name the path and never the contents."""
        try:
            with open(path, "rb") as file:
                data = file.read(MAX_TOKEN_FILE_BYTES + 1)
        except OSError as error:
            self.problems.append(
                f"{label}: cannot read token file {path}: {error.strerror or error}"
            )
            return None
        if len(data) > MAX_TOKEN_FILE_BYTES:
            self.problems.append(
                f"{label}: token file {path} is larger than {MAX_TOKEN_FILE_BYTES} bytes: "
                "expected a file that contains only the token"
            )
            return None
        try:
            token = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            self.problems.append(f"{label}: token file {path} is not UTF-8 text")
            return None
        if not token:
            self.problems.append(f"{label}: token file {path} is empty: expected the token")
            return None
        try:
            return _check_token(token)
        except _Invalid:
            self.problems.append(
                f"{label}: token in file {path} is invalid: expected {_TOKEN.expected}"
            )
            return None

    def check_relations(self, sections: dict[str, dict[str, _Value]]) -> None:
        """Check settings that constrain each other.

        A relation that involves a rejected value is skipped, because that value is
        already reported and its default would stand in for it.
        """

        def get(section: str, key: str) -> _Value:
            default = getattr(_SECTIONS[section](), key)
            return sections[section].get(key, _Value(default, f"{section}.{key}"))

        def require(
            section: str, key: str, other: str, holds: Callable[[Any, Any], bool], text: str
        ) -> None:
            if (section, key) in self.rejected or (section, other) in self.rejected:
                return
            value, other_value = get(section, key), get(section, other)
            if not holds(value.value, other_value.value):
                self.problems.append(
                    f"{value.label}: invalid value {_show(value.value)}: expected {text} "
                    f"{other_value.label} ({_show(other_value.value)})"
                )

        require("redis", "block_timeout_s", "socket_timeout_s", lambda a, b: a < b, "less than")
        require("api", "connect_timeout_s", "timeout_s", lambda a, b: a <= b, "at most")
        require("api", "read_timeout_s", "timeout_s", lambda a, b: a <= b, "at most")
        require("retry", "cap_s", "base_s", lambda a, b: a >= b, "at least")
        require("retry", "pause_cap_s", "pause_base_s", lambda a, b: a >= b, "at least")
        # A lease must survive two missed renewals before other processes take its claims.
        require("lease", "renew_interval_s", "ttl_s", lambda a, b: 3 * a <= b, "at most a third of")
        require("shutdown", "hard_deadline_s", "grace_s", lambda a, b: a > b, "greater than")
        deadline = get("shutdown", "hard_deadline_s")
        if ("shutdown", "hard_deadline_s") not in self.rejected and (
            deadline.value >= SYSTEMD_TIMEOUT_STOP_S
        ):
            self.problems.append(
                f"{deadline.label}: invalid value {_show(deadline.value)}: expected less than "
                f"{SYSTEMD_TIMEOUT_STOP_S:g}, the TimeoutStopSec of the systemd unit"
            )


def load_config(
    path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> Config:
    """Load, combine and validate the configuration.

    `path` is the TOML file, or None for defaults plus environment. `env` defaults to
    `os.environ`. Its `JIRAFE_FORWARDER_*` variables override the file, and its
    `CREDENTIALS_DIRECTORY` (set by systemd for LoadCredential=) is the base of
    relative token files. Without it, relative token files are resolved against the
    config file's directory, or the working directory when there is no file.

    Raises ConfigError listing every problem.
    """
    environment: Mapping[str, str] = os.environ if env is None else env
    loader = _Loader()
    source_path = None
    data: dict[str, Any] = {}
    if path is not None:
        source_path = os.path.abspath(os.fspath(path))
        data = loader.read_toml(source_path)

    file_layer = loader.read_file_layer(data)
    env_layer = loader.read_env_layer(environment)
    sections = {
        name: {**file_layer.sections.get(name, {}), **env_layer.sections.get(name, {})}
        for name in _SECTIONS
    }
    loader.check_relations(sections)

    if environment.get("CREDENTIALS_DIRECTORY"):
        base_dir = environment["CREDENTIALS_DIRECTORY"]
    elif source_path is not None:
        base_dir = os.path.dirname(source_path)
    else:
        base_dir = os.getcwd()

    api_values = loader.merge_token_source(
        file_layer.sections.get("api", {}), env_layer.sections.get("api", {})
    )
    api_tokens = loader.resolve_tokens(api_values, base_dir)

    sites: dict[str, SiteConfig] = {}
    for site_id in sorted(
        {*file_layer.sites, *env_layer.sites}, key=lambda text: (len(text), text)
    ):
        values = loader.merge_token_source(
            file_layer.sites.get(site_id, {}), env_layer.sites.get(site_id, {})
        )
        if values:
            sites[site_id] = SiteConfig(**loader.resolve_tokens(values, base_dir))
        elif not any(section == f"sites.{site_id}" for section, _ in loader.rejected):
            loader.problems.append(
                f"{_site_label(site_id)}: missing token: set token or token_file"
            )

    if loader.problems:
        raise ConfigError(loader.problems)
    built: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        kwargs = {key: entry.value for key, entry in sections[name].items()}
        if name == "api":
            kwargs.update(api_tokens)
        built[name] = cls(**kwargs)
    return Config(**built, sites=sites, source_path=source_path)


def check_config(
    path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> list[str]:
    """Return every problem of the configuration, or an empty list when it is valid."""
    try:
        load_config(path, env)
    except ConfigError as error:
        return error.problems
    return []
