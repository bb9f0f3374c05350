"""Fault injection: the fault specification, its parsers and the set of active faults.

A fault applies to one site or, with `site=None`, to every site. On each request it
applies to, a fault fires with probability `rate` (drawn from its own seeded random
generator, so runs repeat), and `count` limits how many times it fires in total. An
exhausted fault stays listed, with `remaining` 0, until it is removed or cleared.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

FaultKind = Literal["error", "latency", "hang", "reset", "max_body", "poison"]
FAULT_KINDS: tuple[str, ...] = ("error", "latency", "hang", "reset", "max_body", "poison")

# error_type sent with an injected status when the fault does not name one.
_DEFAULT_ERROR_TYPES = {400: "validation", 403: "authorization", 413: "too_large"}


@dataclass(frozen=True)
class Fault:
    """Specification of one injected fault.

    Fields common to every kind:
        kind: what happens to a request the fault fires on.
            `error`: respond with `status` and a failure body, optionally with Retry-After.
            `latency`: wait `latency_s` after reading the body, then go on as normal.
            `hang`: send nothing until the fault is removed (then go on as normal), the
            client disconnects or the sandbox stops.
            `reset`: read `reset_after_bytes` of the body, then abort the connection.
            `max_body`: apply the lower size limit `max_body_bytes` to the request, so a
            larger body gets 413.
            `poison`: fail requests with an event whose data has `marker_field` equal to
            `marker_value`, responding with `status` (default 400 validation).
        site: the site id the fault applies to, or None for every site. Tracker requests
            carry their site in the body, so `reset` and `max_body` faults, which act
            before the body is read, apply to them only when `site` is None.
        rate: probability in 0..1 that the fault fires on a request it applies to.
        count: maximum number of times the fault fires, or None for no limit.
        seed: seed of the fault's random generator. None derives it from the sandbox
            seed and the fault id.

    Fields for `error` and `poison`:
        status: HTTP status from 400 to 599 (default 503 for error, 400 for poison).
        error_type: `error_type` of the failure body. The default is `validation` for
            400, `authorization` for 403, `too_large` for 413 and `unknown` otherwise.
        message: `message` of the failure body.
        retry_after_s: Retry-After value in seconds, or None to send no header.
        retry_after_format: `seconds` sends the number, `date` sends the HTTP date
            `retry_after_s` seconds after the response.

    Kind-specific fields:
        latency_s: added delay in seconds (latency).
        reset_after_bytes: body bytes read before the abort. None reads half of the
            Content-Length, or the first chunk of a chunked body (reset).
        max_body_bytes: the lower size limit in bytes (max_body). The fault fires, and
            counts, on every request it applies to, whatever the body size.
        marker_field, marker_value: the top-level data property and the JSON value that
            mark a poison event. The value must match in type too (poison).
        poison_scope: `request` fails the whole request. `event` fails only the marked
            events with a validation error, so the other events of a batch succeed (poison).
    """

    kind: FaultKind
    site: str | None = None
    rate: float = 1.0
    count: int | None = None
    seed: int | None = None
    status: int | None = None
    error_type: str | None = None
    message: str | None = None
    retry_after_s: int | None = None
    retry_after_format: Literal["seconds", "date"] = "seconds"
    latency_s: float = 0.0
    reset_after_bytes: int | None = None
    max_body_bytes: int | None = None
    marker_field: str = "poison"
    marker_value: Any = True
    poison_scope: Literal["request", "event"] = "request"

    def __post_init__(self) -> None:
        if isinstance(self.site, int) and not isinstance(self.site, bool):
            object.__setattr__(self, "site", str(self.site))
        problem = next(_problems(self), None)
        if problem is not None:
            raise ValueError(f"invalid {self.kind!r} fault: {problem}")

    @property
    def response_status(self) -> int:
        if self.status is not None:
            return self.status
        return 400 if self.kind == "poison" else 503

    @property
    def response_error_type(self) -> str:
        if self.error_type is not None:
            return self.error_type
        return _DEFAULT_ERROR_TYPES.get(self.response_status, "unknown")

    def retry_after_header(self, now: float | None = None) -> str | None:
        """Return the Retry-After header value, or None when the fault sets none."""
        if self.retry_after_s is None:
            return None
        if self.retry_after_format == "date":
            at = (time.time() if now is None else now) + self.retry_after_s
            return email.utils.formatdate(at, usegmt=True)
        return str(self.retry_after_s)

    def marks(self, data: Any) -> bool:
        """Return True when `data` carries this poison fault's marker."""
        if not isinstance(data, dict) or self.marker_field not in data:
            return False
        value = data[self.marker_field]
        return type(value) is type(self.marker_value) and value == self.marker_value

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Fault:
        """Build a fault from a JSON object. Raises ValueError naming a bad field."""
        unknown = sorted(set(data) - _FIELD_NAMES)
        if unknown:
            raise ValueError(
                f"unknown fault field(s) {', '.join(unknown)}: expected {', '.join(sorted(_FIELD_NAMES))}"
            )
        if "kind" not in data:
            raise ValueError(
                f"missing fault field 'kind': expected one of {', '.join(FAULT_KINDS)}"
            )
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"invalid fault: {exc}") from None

    @classmethod
    def parse(cls, text: str) -> Fault:
        """Parse a fault from a JSON object or from `key=value` pairs separated by commas.

        Example: `kind=error,status=503,rate=0.5,retry_after_s=2`. Values are converted
        to the field's type. `marker_value` is read as JSON when it parses (`true`, `1`),
        otherwise as a string. Raises ValueError on a malformed specification.
        """
        text = text.strip()
        if text.startswith("{"):
            try:
                data = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"invalid fault JSON {text!r}: {exc}") from None
            return cls.from_mapping(data)
        fields: dict[str, Any] = {}
        for pair in filter(None, (part.strip() for part in text.split(","))):
            name, sep, raw = pair.partition("=")
            name = name.strip()
            if not sep:
                raise ValueError(f"invalid fault setting {pair!r}: expected key=value")
            if name not in _FIELD_NAMES:
                raise ValueError(
                    f"unknown fault field {name!r}: expected one of {', '.join(sorted(_FIELD_NAMES))}"
                )
            fields[name] = _convert(name, raw.strip())
        return cls.from_mapping(fields)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Fault))
_INT_FIELDS = {"count", "seed", "status", "retry_after_s", "reset_after_bytes", "max_body_bytes"}
_FLOAT_FIELDS = {"rate", "latency_s"}


def _convert(name: str, raw: str) -> Any:
    if name in _INT_FIELDS or name in _FLOAT_FIELDS:
        if raw.lower() in ("", "none", "null"):
            return None
        try:
            return int(raw) if name in _INT_FIELDS else float(raw)
        except ValueError:
            kind = "an integer" if name in _INT_FIELDS else "a number"
            raise ValueError(f"invalid fault setting {name}={raw!r}: expected {kind}") from None
    if name == "marker_value":
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
    return raw


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _problems(fault: Fault) -> Iterator[str]:
    if fault.kind not in FAULT_KINDS:
        yield f"kind must be one of {', '.join(FAULT_KINDS)}"
    if fault.site is not None and not isinstance(fault.site, str):
        yield f"site must be a string or null, got {fault.site!r}"
    if not _is_number(fault.rate) or not 0 <= fault.rate <= 1:
        yield f"rate must be a number from 0 to 1, got {fault.rate!r}"
    if fault.count is not None and (not _is_int(fault.count) or fault.count < 1):
        yield f"count must be a positive integer or null, got {fault.count!r}"

    if fault.seed is not None and not _is_int(fault.seed):
        yield f"seed must be an integer or null, got {fault.seed!r}"
    if fault.status is not None and (not _is_int(fault.status) or not 100 <= fault.status <= 599):
        yield f"status must be an HTTP status from 100 to 599, got {fault.status!r}"
    elif fault.kind in ("error", "poison") and fault.status is not None and fault.status < 400:
        yield (
            f"status must be from 400 to 599, got {fault.status}: the fault sends a failure "
            f"body, and a status below 400 would not report an error"
        )
    for name in ("error_type", "message"):
        value = getattr(fault, name)
        if value is not None and not isinstance(value, str):
            yield f"{name} must be a string or null, got {value!r}"

    if fault.retry_after_s is not None and (
        not _is_int(fault.retry_after_s) or fault.retry_after_s < 0
    ):
        yield f"retry_after_s must be a non-negative integer or null, got {fault.retry_after_s!r}"
    if fault.retry_after_format not in ("seconds", "date"):
        yield f"retry_after_format must be 'seconds' or 'date', got {fault.retry_after_format!r}"
    if not _is_number(fault.latency_s) or fault.latency_s < 0:
        yield f"latency_s must be a non-negative number, got {fault.latency_s!r}"
    if fault.kind == "latency" and not fault.latency_s:
        yield "latency_s must be set to a positive number of seconds"

    if fault.reset_after_bytes is not None and (
        not _is_int(fault.reset_after_bytes) or fault.reset_after_bytes < 0
    ):
        yield f"reset_after_bytes must be a non-negative integer or null, got {fault.reset_after_bytes!r}"
    if fault.max_body_bytes is not None and (
        not _is_int(fault.max_body_bytes) or fault.max_body_bytes < 0
    ):
        yield f"max_body_bytes must be a non-negative integer, got {fault.max_body_bytes!r}"
    if fault.kind == "max_body" and fault.max_body_bytes is None:
        yield "max_body_bytes must be set"

    if not isinstance(fault.marker_field, str) or not fault.marker_field:
        yield f"marker_field must be a non-empty string, got {fault.marker_field!r}"
    try:
        orjson.dumps(fault.marker_value)
    except orjson.JSONEncodeError:
        yield f"marker_value must be a JSON value, got {fault.marker_value!r:.100}"
    if fault.poison_scope not in ("request", "event"):
        yield f"poison_scope must be 'request' or 'event', got {fault.poison_scope!r}"


@dataclass(eq=False)
class ActiveFault:
    """A fault added to a sandbox, with its id and how often it fired."""

    id: int
    fault: Fault
    rng: random.Random
    fired: int = 0
    # Set when the fault is removed, which ends the requests it keeps hanging.
    removed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def remaining(self) -> int | None:
        if self.fault.count is None:
            return None
        return max(0, self.fault.count - self.fired)

    def applies_to(self, site: str | None) -> bool:
        if self.remaining == 0:
            return False
        return self.fault.site is None or self.fault.site == site

    def roll(self) -> bool:
        """Decide whether the fault fires on this request, and count it if it does."""
        if self.remaining == 0:
            return False
        if self.fault.rate < 1 and self.rng.random() >= self.fault.rate:
            return False
        self.fired += 1
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            **self.fault.to_dict(),
            "fired": self.fired,
            "remaining": self.remaining,
        }


class FaultSet:
    """The faults active in a sandbox, in the order they were added.

    When several faults of one kind apply to a request, the first one that fires wins.
    """

    def __init__(self, seed: int = 0, on_change: Callable[[], None] | None = None) -> None:
        self._seed = seed
        self._on_change = on_change
        self._faults: list[ActiveFault] = []
        self._next_id = 1

    def add(self, fault: Fault | str, /, **fields: Any) -> ActiveFault:
        """Add a fault and return it with its id.

        Pass a Fault, or its kind followed by its fields:
        `faults.add("error", status=503, count=2)`.
        """
        if isinstance(fault, str):
            fault = Fault.from_mapping({"kind": fault, **fields})
        elif fields:
            fault = dataclasses.replace(fault, **fields)
        fault_id = self._next_id
        self._next_id += 1
        seed = fault.seed if fault.seed is not None else self._seed * 1_000_003 + fault_id
        active = ActiveFault(id=fault_id, fault=fault, rng=random.Random(seed))
        self._faults.append(active)
        self._changed()
        return active

    def remove(self, fault_id: int) -> bool:
        """Remove one fault and end the requests it keeps hanging. Returns False if absent."""
        for active in self._faults:
            if active.id == fault_id:
                self._faults.remove(active)
                active.removed.set()
                self._changed()
                return True
        return False

    def clear(self) -> None:
        """Remove every fault and end every hanging request."""
        faults, self._faults = self._faults, []
        for active in faults:
            active.removed.set()
        self._changed()

    def snapshot(self) -> list[dict[str, Any]]:
        return [active.to_dict() for active in self._faults]

    def fire(self, kind: str, site: str | None) -> ActiveFault | None:
        """Return the first fault of `kind` that applies to `site` and fires, if any."""
        for active in self._faults:
            if active.fault.kind == kind and active.applies_to(site) and active.roll():
                return active
        return None

    def applicable(self, kind: str, site: str | None) -> list[ActiveFault]:
        """Return the faults of `kind` that apply to `site`, without rolling them."""
        return [a for a in self._faults if a.fault.kind == kind and a.applies_to(site)]

    def __iter__(self) -> Iterator[ActiveFault]:
        return iter(list(self._faults))

    def __len__(self) -> int:
        return len(self._faults)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
