"""Logging setup shared by the daemon, the CLI and the sandbox.

Every record goes through structlog: JSON lines when stderr is not a terminal
(journald, files, test capture), coloured console output when it is. Standard
library records (aiohttp, redis-py) are routed through the same processor chain
so that one format and one redaction step cover everything.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any, Literal

import structlog

LogFormat = Literal["auto", "json", "console"]

_REDACTED = "[REDACTED]"


class SecretRedactor:
    """Processor that replaces every registered secret in every string value of a log event.

    Tokens are registered when configuration is loaded, so a token that leaks into an
    exception message or a URL is still masked before the line is written.
    """

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def set_secrets(self, secrets: Iterable[str]) -> None:
        # Longest first, so a token that contains another one is masked whole.
        unique = {s for s in secrets if s and len(s) >= 4}
        with self._lock:
            self._secrets = tuple(sorted(unique, key=len, reverse=True))

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, _REDACTED)
        return text

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {k: self._scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._scrub(v) for v in value]
        return value

    def __call__(self, logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        if not self._secrets:
            return event_dict
        return {key: self._scrub(value) for key, value in event_dict.items()}


class RepeatLimiter:
    """Processor that drops repeats of an identical warning or error within a window.

    Records are identical when every field but the timestamp is equal, so dead letters
    and other records that carry ids are never merged. The first record of a key in a
    window is written. Later ones are counted, and the count is attached to the next
    record written for that key as `repeated`.
    """

    def __init__(self, window_s: float = 10.0, clock: Any = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._seen: dict[tuple[str, str], list[float | int]] = {}
        self._lock = threading.Lock()

    def __call__(self, logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        if method_name not in ("warning", "error", "exception"):
            return event_dict
        key = (str(event_dict.get("event")), repr(sorted((k, repr(v)) for k, v in event_dict.items()
                                                         if k not in ("timestamp", "event"))))
        now = self._clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.window_s:
                entry[1] += 1
                raise structlog.DropEvent
            if entry is not None and entry[1]:
                event_dict["repeated"] = entry[1]
            if len(self._seen) > 1000:
                # Bound memory when error texts vary (for example, they carry ids).
                self._seen.clear()
            self._seen[key] = [now, 0]
        return event_dict


redactor = SecretRedactor()
repeat_limiter = RepeatLimiter()


def configure_logging(level: str = "info", fmt: LogFormat = "auto", stream: Any = None) -> None:
    """Configure structlog and the standard library logging to write to `stream` (stderr)."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"invalid log level {level!r}: use debug, info, warning or error")

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        repeat_limiter,
        redactor,
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # aiohttp's access log duplicates the sandbox's own request log.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
