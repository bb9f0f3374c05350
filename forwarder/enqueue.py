"""`jirafe-forwarder enqueue`: bulk load of JSON-lines envelopes onto the producer list.

The file is streamed line by line, so memory stays flat for files of any size:
at most one chunk of valid lines (CHUNK_LINES lines or CHUNK_BYTES bytes) and one
line being read are held at a time. Each chunk is one `LPUSH key line1 line2 ...`:
LPUSH inserts its values one after the other at the head, and the daemon consumes
from the tail, so the first line of the file is delivered first.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, TextIO

import orjson
import redis

from forwarder.batch import single_event_size
from forwarder.config import Config
from forwarder.envelope import TRACKER_TYPES, EnvelopeError, parse_envelope
from forwarder.intake import ENVELOPE_SLACK_BYTES, tracker_site_problem
from forwarder.redis_store import Keys

EXIT_ALL_PUSHED = 0
EXIT_SOME_REJECTED = 1
EXIT_ERROR = 2

CHUNK_LINES = 1000
# Bounds one round trip and the memory of one chunk when lines are large.
CHUNK_BYTES = 8 * 1024 * 1024
# Line numbers kept per rejection reason for the summary.
EXAMPLE_LINES = 5
# Lines longer than this are read in pieces of this size and never held whole.
READ_PIECE_BYTES = 1024 * 1024


class EnqueueError(Exception):
    """The load stopped early: Redis failed, the input could not be read, or Ctrl-C.

    `summary.pushed_through` is the last line known to be in Redis. When Redis failed
    during an LPUSH, the chunk after it may or may not have been pushed.
    """

    def __init__(self, summary: EnqueueSummary, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.summary = summary


@dataclass(slots=True)
class EnqueueSummary:
    lines: int = 0
    pushed: int = 0
    blank: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int]] = field(default_factory=dict)
    # Number of the last line whose chunk Redis acknowledged (0 before the first).
    pushed_through: int = 0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def reject(self, line_number: int, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLE_LINES:
            examples.append(line_number)


def max_line_bytes(config: Config) -> int:
    """Return the largest queue entry the daemon accepts; longer ones it dead-letters at once."""
    return config.api.max_batch_bytes + ENVELOPE_SLACK_BYTES


class LineReader:
    """Iterates over the lines of a binary stream without their line endings.

    A line over `limit` bytes comes out as None. It is skipped in pieces, never
    held whole, and its bytes are copied to `overflow` when one is given.
    `bytes_read` counts every byte consumed so far, for the progress report.
    """

    def __init__(self, stream: IO[bytes], limit: int, overflow: IO[bytes] | None = None) -> None:
        self.stream = stream
        self.limit = limit
        self.overflow = overflow
        self.bytes_read = 0

    def __iter__(self) -> Iterator[bytes | None]:
        limit = self.limit
        while True:
            # limit + 2 leaves room for a line of `limit` bytes plus "\r\n".
            line = self.stream.readline(limit + 2)
            if not line:
                return
            self.bytes_read += len(line)
            if line.endswith(b"\n") or len(line) <= limit + 1:
                stripped = line.removesuffix(b"\n").removesuffix(b"\r")
                if len(stripped) <= limit:
                    yield stripped
                    continue
            self._skip_rest(line)
            yield None

    def _skip_rest(self, line: bytes) -> None:
        overflow = self.overflow
        if overflow is not None:
            overflow.write(line)
        while not line.endswith(b"\n"):
            line = self.stream.readline(READ_PIECE_BYTES)
            if not line:
                # The file's last line has no line ending; the copy gets one.
                if overflow is not None:
                    overflow.write(b"\n")
                return
            self.bytes_read += len(line)
            if overflow is not None:
                overflow.write(line)


def check_line(line: bytes, config: Config, validators: dict[str, Callable[[Any], Any]]) -> str | None:
    """Return the dead-letter reason the daemon would give this entry, or None when it is valid."""
    try:
        envelope = parse_envelope(line)
    except EnvelopeError as exc:
        return exc.reason
    if envelope.type in TRACKER_TYPES:
        if tracker_site_problem(line, envelope) is not None:
            return "site_mismatch"
        size = envelope.data_length
    else:
        size = single_event_size(envelope.type, envelope.data_length)
    if size > config.api.max_batch_bytes:
        return "event_too_large"
    if config.batch.validate_events:
        validator = validators.get(envelope.type)
        if validator is None:
            from forwarder.schemas import validator as load_validator

            validator = validators[envelope.type] = load_validator(envelope.type)
        data = line[envelope.data_offset : envelope.data_offset + envelope.data_length]
        try:
            validator(orjson.loads(data))
        except Exception:  # fastjsonschema.JsonSchemaException and its subclasses
            return "schema_validation"
    return None


class Progress:
    """A one-line progress report on a terminal, at most ten updates a second; silent elsewhere."""

    def __init__(self, total_bytes: int | None, stream: TextIO = sys.stderr) -> None:
        self.total_bytes = total_bytes
        self.stream = stream
        self.enabled = stream.isatty()
        self._last = 0.0

    def update(self, summary: EnqueueSummary, read_bytes: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self._last < 0.1:
            return
        self._last = now
        text = f"\renqueue: {summary.lines} lines read, {summary.pushed} pushed, {summary.rejected_total} rejected"
        if self.total_bytes:
            text += f", {min(read_bytes / self.total_bytes, 1.0):.0%}"
        self.stream.write(text + ("\n" if final else ""))
        self.stream.flush()


def enqueue(
    stream: IO[bytes], config: Config, client: redis.Redis | None, reject_file: IO[bytes] | None = None,
    progress: Progress | None = None,
) -> EnqueueSummary:
    """Validate every line of `stream` and push the valid ones in file order.

    `client` None is a dry run: lines are checked and counted, nothing is pushed.
    Raises EnqueueError when the load stops early; its `summary` covers the lines
    read until then.
    """
    loader = _Loader(config, client, reject_file, progress)
    try:
        loader.load(LineReader(stream, max_line_bytes(config), reject_file))
    except (redis.RedisError, OSError, KeyboardInterrupt) as exc:
        raise EnqueueError(loader.summary, exc) from exc
    return loader.summary


class _Loader:
    def __init__(
        self, config: Config, client: redis.Redis | None, reject_file: IO[bytes] | None,
        progress: Progress | None,
    ) -> None:
        self.config = config
        self.client = client
        self.key = Keys(config.redis.key_prefix).events
        self.reject_file = reject_file
        self.progress = progress
        self.summary = EnqueueSummary()
        self.validators: dict[str, Callable[[Any], Any]] = {}
        self.chunk: list[bytes] = []
        self.chunk_bytes = 0

    def load(self, reader: LineReader) -> None:
        summary = self.summary
        progress = self.progress
        for line in reader:
            summary.lines += 1
            if progress is not None:
                progress.update(summary, reader.bytes_read)
            if line is None:
                summary.reject(summary.lines, "event_too_large")
                continue
            if not line.strip():
                summary.blank += 1
                continue
            reason = check_line(line, self.config, self.validators)
            if reason is not None:
                summary.reject(summary.lines, reason)
                if self.reject_file is not None:
                    self.reject_file.write(line + b"\n")
                continue
            self.chunk.append(line)
            self.chunk_bytes += len(line)
            if len(self.chunk) >= CHUNK_LINES or self.chunk_bytes >= CHUNK_BYTES:
                self.flush()
        self.flush()
        if progress is not None:
            progress.update(summary, reader.bytes_read, final=True)

    def flush(self) -> None:
        if self.chunk and self.client is not None:
            # One LPUSH per chunk keeps the file's order inside the chunk too.
            self.client.lpush(self.key, *self.chunk)
        self.summary.pushed += len(self.chunk)
        self.summary.pushed_through = self.summary.lines
        self.chunk.clear()
        self.chunk_bytes = 0


def format_summary(summary: EnqueueSummary, key: str, dry_run: bool) -> str:
    verb = "would push" if dry_run else "pushed"
    lines = [
        f"{verb} {_count(summary.pushed, 'event')} onto {key}; {_count(summary.rejected_total, 'line')}"
        f" rejected, {_count(summary.blank, 'blank line')} skipped, {_count(summary.lines, 'line')} read"
    ]
    for reason, count in sorted(summary.rejected.items(), key=lambda item: (-item[1], item[0])):
        examples = summary.examples[reason]
        numbers = ", ".join(str(number) for number in examples)
        more = ", ..." if count > len(examples) else ""
        word = "line" if len(examples) == 1 and not more else "lines"
        lines.append(f"  rejected {reason}: {count} ({word} {numbers}{more})")
    return "\n".join(lines) + "\n"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
