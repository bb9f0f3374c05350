"""The Event API routes of the sandbox: site paths, batch, tracker paths and pixels.

Each API request goes through these steps in order, and the first step that fails
sends the response:
1. The path. A path under /v2 that is no Event API path, or whose site id is not a
   string of ASCII digits, gets 404 not_found once its body has been read and
   discarded. No fault acts on it.
2. A `reset` fault reads part of the body and aborts the connection.
3. The size limit, which a `max_body` fault may lower. A Content-Length over it gets
   413, and so does a chunked body once it grows over the limit while being read.
4. The `hang`, `latency` and `error` faults of the request's site.
5. The bearer token (403 invalid_token) and its access to the site (403 authorization).
6. The path type (400 invalid_type), decoding (400 bad_json), batch keys (400
   invalid_type), `poison` faults and schema validation (400 validation).
Faults act before authentication, as an outage or a proxy would. Tracker paths carry
their site in the body, so their body is decoded before step 4, and steps 2 and 3 apply
only the faults that are set for every site.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson
from aiohttp import web

from forwarder.logs import get_logger
from forwarder.sandbox.auth import TokenTable, bearer_token, is_site_id
from forwarder.sandbox.faults import ActiveFault, Fault, FaultSet
from forwarder.sandbox.responses import (
    PIXEL_GIF,
    SUCCESS,
    dumps,
    failure,
    json_response,
    validation_failure,
)
from forwarder.sandbox.state import Outcome, RequestRecord, SandboxState
from forwarder.sandbox.validation import PATH_TYPES, first_error
from forwarder.schemas import BATCH_TYPES

log = get_logger(__name__)

_BATCH_KEYS = frozenset(BATCH_TYPES)
# Parses a batch down to its keys and arrays and leaves each event as undecoded JSON,
# which is an order of magnitude faster than decoding every event.
_COUNTING_DECODER = msgspec.json.Decoder(dict[str, list[msgspec.Raw]])
# How often a hanging request checks whether its client is still connected.
_DISCONNECT_POLL_S = 0.05


class _BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class _ConnectionGone(Exception):
    """The sandbox aborted the connection or the client closed it, so nothing can be sent."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome)
        self.outcome = outcome


@dataclass(slots=True)
class _Exchange:
    """Details of one request, collected for the request log."""

    site: str | None
    token: str | None = None
    body_bytes: int = 0
    events: int = 0
    accepted: int = 0
    error_type: str | None = None


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """Sandbox options that the API handlers read (see Sandbox for their meaning)."""

    validate: bool
    max_body_bytes: int
    close_on_oversize: bool


class ApiHandlers:
    """Request handlers of the Event API paths, sharing the sandbox's state and faults."""

    def __init__(
        self,
        settings: ApiSettings,
        tokens: TokenTable,
        state: SandboxState,
        faults: FaultSet,
        notify: Callable[[], None],
        stopping: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.tokens = tokens
        self.state = state
        self.faults = faults
        self._notify = notify
        self._stopping = stopping
        self._unknown_path_resources: list[web.AbstractResource] = []

    def add_routes(self, app: web.Application) -> None:
        # The tracker routes come first so that /v2/tracker/... is not read as a site id.
        for method in ("POST", "PUT"):
            app.router.add_route(method, "/v2/tracker/{type:pageview|visit}", self.handle_tracker)
        for name in ("pageview", "visit"):
            app.router.add_get(f"/v2/tracker/{name}.gif", self.handle_pixel)
        for method in ("POST", "PUT"):
            app.router.add_route(method, "/v2/{site}/{type}", self.handle_site)
        # Added last, so these catch only the /v2 requests that no route above matches
        # and cost nothing on the paths that one does match. A route added later with a
        # variable right after /v2/ would be hidden behind them.
        for pattern in ("/v2", "/v2/{path:.*}"):
            route = app.router.add_route("*", pattern, self.handle_unknown_path)
            self._unknown_path_resources.append(route.resource)

    async def handle_site(self, request: web.Request) -> web.StreamResponse:
        site = request.match_info["site"]
        path_type = request.match_info["type"]
        if site == "tracker":
            # /v2/tracker/<anything but pageview or visit> gets invalid_type, as a site path would.
            return await self._serve(
                request, None, lambda exchange: self._process(request, exchange, path_type)
            )
        if not is_site_id(site):
            message = (
                f"invalid site id {site!r} in the path {request.path}: "
                "a site id is a string of digits, such as 1001"
            )
            return await self._serve(
                request, site, lambda exchange: self._not_found(request, exchange, message)
            )
        return await self._serve(
            request, site, lambda exchange: self._process(request, exchange, path_type)
        )

    async def handle_tracker(self, request: web.Request) -> web.StreamResponse:
        path_type = request.match_info["type"]
        return await self._serve(
            request,
            None,
            lambda exchange: self._process(request, exchange, path_type, tracker=True),
        )

    async def handle_unknown_path(self, request: web.Request) -> web.StreamResponse:
        """Send 404 not_found for a /v2 path that no API route matches, and log it.

        Raises HTTPMethodNotAllowed, as aiohttp's router does, when the path is an API
        path that takes other methods, such as GET /v2/1001/batch.
        """
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource not in self._unknown_path_resources:
                _, methods = await resource.resolve(request)
                allowed |= methods
        if allowed:
            raise web.HTTPMethodNotAllowed(request.method, allowed)
        message = (
            f"path {request.path} not found: the Event API paths are /v2/{{site}}/{{type}}, "
            "/v2/{site}/batch and /v2/tracker/{pageview,visit}. "
            "Check that the client's base URL ends in /v2."
        )
        return await self._serve(
            request, None, lambda exchange: self._not_found(request, exchange, message)
        )

    async def handle_pixel(self, request: web.Request) -> web.StreamResponse:
        started = time.time()
        self._finish(request, started, _Exchange(site=None, token=None), 200, "response")
        return web.Response(
            body=PIXEL_GIF, content_type="image/gif", headers={"Cache-Control": "no-store"}
        )

    async def _serve(
        self,
        request: web.Request,
        site: str | None,
        process: Callable[[_Exchange], Awaitable[web.Response]],
    ) -> web.StreamResponse:
        """Run `process` for an API request, then log the request and count it."""
        started = time.time()
        exchange = _Exchange(site=site, token=bearer_token(request.headers.get("Authorization")))
        self.state.in_flight += 1
        self._notify()
        outcome: Outcome = "response"
        response: web.Response | None = None
        try:
            response = await process(exchange)
        except _ConnectionGone as gone:
            outcome = gone.outcome
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as exc:
            log.exception("sandbox request failed", path=request.path, site=exchange.site)
            response = self._fail(
                exchange, 500, failure("unknown", f"internal error in the sandbox: {exc!r}")
            )
        finally:
            # Also runs when the handler is cancelled at shutdown, so in_flight stays right.
            self.state.in_flight -= 1
            status = response.status if response is not None else None
            self._finish(request, started, exchange, status, outcome)
        if response is None:
            # The connection is gone, so aiohttp fails to send this and drops it.
            return web.Response(status=500)
        return response

    def _finish(
        self,
        request: web.Request,
        started: float,
        exchange: _Exchange,
        status: int | None,
        outcome: Outcome,
    ) -> None:
        duration_s = time.time() - started
        record = RequestRecord(
            time=started,
            method=request.method,
            path=request.path,
            site=exchange.site,
            token=self.tokens.label(exchange.token),
            body_bytes=exchange.body_bytes,
            content_length=request.content_length,
            status=status,
            outcome=outcome,
            error_type=exchange.error_type,
            events=exchange.events,
            accepted=exchange.accepted,
            duration_s=duration_s,
        )
        self.state.record_request(record)
        log.info(
            "sandbox request",
            method=record.method,
            path=record.path,
            site=record.site,
            status=status if status is not None else outcome,
            error_type=record.error_type,
            body_bytes=record.body_bytes,
            events=record.events,
            accepted=record.accepted,
            token=record.token,
            duration_ms=round(duration_s * 1000, 1),
        )
        self._notify()

    async def _not_found(
        self, request: web.Request, exchange: _Exchange, message: str
    ) -> web.Response:
        # Reading the body to its end lets the client reuse the connection.
        await self._drain(request, exchange)
        return self._fail(exchange, 404, failure("not_found", message))

    async def _process(
        self, request: web.Request, exchange: _Exchange, path_type: str, tracker: bool = False
    ) -> web.Response:
        limit = self.settings.max_body_bytes
        limiter = self.faults.fire("max_body", exchange.site)
        if limiter is not None and limiter.fault.max_body_bytes is not None:
            limit = min(limit, limiter.fault.max_body_bytes)

        try:
            reset = self.faults.fire("reset", exchange.site)
            if reset is not None:
                await self._reset_connection(request, exchange, reset.fault)
            body = await self._read_body(request, exchange, limit)
        except _BodyTooLarge as too_large:
            message = f"request body is larger than the limit of {too_large.limit} bytes"
            response = self._fail(exchange, 413, failure("too_large", message))
            if self.settings.close_on_oversize:
                # Close without reading the rest, as a reverse proxy does. With
                # lingering_time=0 on the server, aiohttp closes instead of draining.
                response.force_close()
            return response

        payload: Any = None
        decode_error: str | None = None
        if tracker:
            payload, decode_error = _decode(body)
            if isinstance(payload, dict) and isinstance(payload.get("site"), str):
                exchange.site = payload["site"]

        fault_response = await self._apply_request_faults(request, exchange)
        if fault_response is not None:
            return fault_response

        if not self.tokens.is_known(exchange.token):
            return self._fail(
                exchange, 403, failure("invalid_token", "the bearer token is not valid")
            )
        if tracker:
            if decode_error is not None:
                return self._bad_json(exchange, decode_error)
            if exchange.site is None:
                # The site is in the body, and without it there is nothing to authorise.
                return self._fail(exchange, 400, validation_failure(_site_error(payload)))
        elif exchange.site is None:
            return self._invalid_path_type(exchange, f"tracker/{path_type}")
        if not self.tokens.allows(exchange.token, exchange.site):
            message = f"the token may not write to site {exchange.site}"
            return self._fail(exchange, 403, failure("authorization", message))

        if tracker:
            return self._single_event(exchange, path_type, payload)
        event_type = PATH_TYPES.get(path_type)
        if path_type != "batch" and event_type is None:
            return self._invalid_path_type(exchange, path_type)
        if event_type is None and self._counts_only(exchange.site):
            counted = self._count_batch(exchange, body)
            if counted is not None:
                return counted
        payload, decode_error = _decode(body)
        if decode_error is not None:
            return self._bad_json(exchange, decode_error)
        if event_type is None:
            return self._batch(exchange, payload)
        return self._single_event(exchange, event_type, payload)

    def _counts_only(self, site: str) -> bool:
        """Return True when a batch needs no event decoded: no validation, record, or poison."""
        return (
            not self.settings.validate
            and self.state.record == "count"
            and not self.faults.applicable("poison", site)
        )

    def _count_batch(self, exchange: _Exchange, body: bytes) -> web.Response | None:
        """Accept a well-formed batch by counting its events without decoding them.

        Returns None for a body that the full path must handle and reject.
        """
        site = exchange.site
        assert site is not None
        try:
            # The decoder checks JSON syntax but does not check UTF-8 inside strings.
            body.decode("utf-8")
            batch = _COUNTING_DECODER.decode(body)
        except (UnicodeDecodeError, msgspec.DecodeError):
            return None
        if not _BATCH_KEYS.issuperset(batch):
            return None
        results = {}
        for key, events in batch.items():
            results[key] = [SUCCESS] * len(events)
            self.state.record_accepted(site, key, events)
            exchange.events += len(events)
        exchange.accepted = exchange.events
        return web.Response(status=200, body=dumps(results), content_type="application/json")

    def _bad_json(self, exchange: _Exchange, error: str) -> web.Response:
        return self._fail(
            exchange, 400, failure("bad_json", f"request body is not valid JSON: {error}")
        )

    def _invalid_path_type(self, exchange: _Exchange, path_type: str) -> web.Response:
        message = f"unknown event type {path_type!r} in the path: expected batch or {', '.join(PATH_TYPES)}"
        return self._fail(exchange, 400, failure("invalid_type", message))

    async def _read_body(self, request: web.Request, exchange: _Exchange, limit: int) -> bytes:
        declared = request.content_length
        if declared is not None and declared > limit:
            if not self.settings.close_on_oversize:
                await self._drain(request, exchange)
            raise _BodyTooLarge(limit)
        chunks: list[bytes] = []
        try:
            while chunk := await request.content.readany():
                exchange.body_bytes += len(chunk)
                if exchange.body_bytes > limit:
                    if not self.settings.close_on_oversize:
                        await self._drain(request, exchange)
                    raise _BodyTooLarge(limit)
                chunks.append(chunk)
        except ConnectionError:
            raise _ConnectionGone("client_closed") from None
        return b"".join(chunks)

    async def _drain(self, request: web.Request, exchange: _Exchange) -> None:
        """Read and discard the rest of the body, so the connection stays usable."""
        try:
            while chunk := await request.content.readany():
                exchange.body_bytes += len(chunk)
        except ConnectionError:
            raise _ConnectionGone("client_closed") from None

    async def _reset_connection(
        self, request: web.Request, exchange: _Exchange, fault: Fault
    ) -> None:
        """Read part of the body, then abort the connection so that the client sees a reset."""
        goal = fault.reset_after_bytes
        if goal is None:
            # Half the declared body, or the first chunk of a chunked one.
            goal = max(1, (request.content_length or 0) // 2)
        try:
            while exchange.body_bytes < goal:
                chunk = await request.content.readany()
                if not chunk:
                    break
                exchange.body_bytes += len(chunk)
        except ConnectionError:
            raise _ConnectionGone("client_closed") from None
        transport = request.transport
        if transport is not None:
            # abort() closes at once without flushing, and the unread request bytes make
            # the kernel send a TCP reset.
            transport.abort()
        raise _ConnectionGone("reset")

    async def _apply_request_faults(
        self, request: web.Request, exchange: _Exchange
    ) -> web.Response | None:
        site = exchange.site
        hang = self.faults.fire("hang", site)
        if hang is not None:
            await self._hang(request, hang)
        delay = self.faults.fire("latency", site)
        if delay is not None:
            await asyncio.sleep(delay.fault.latency_s)
        error = self.faults.fire("error", site)
        if error is not None:
            return self._fault_failure(exchange, error.fault)
        return None

    async def _hang(self, request: web.Request, active: ActiveFault) -> None:
        """Wait until the fault is removed or the sandbox stops. Raise if the client leaves."""
        released = asyncio.ensure_future(active.removed.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        self.state.hanging += 1
        self._notify()
        try:
            while not (released.done() or stopping.done()):
                # aiohttp keeps running a handler whose client left, so poll for it.
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise _ConnectionGone("client_closed")
                await asyncio.wait({released, stopping}, timeout=_DISCONNECT_POLL_S)
        finally:
            self.state.hanging -= 1
            released.cancel()
            stopping.cancel()

    def _fault_failure(
        self, exchange: _Exchange, fault: Fault, errors: dict[str, str] | None = None
    ) -> web.Response:
        status = fault.response_status
        error_type = fault.response_error_type
        message = fault.message
        if error_type == "validation":
            body = validation_failure(errors or {"": message or "invalid request (injected fault)"})
        else:
            if message is None and errors:
                message = "; ".join(f"{field}: {text}" for field, text in errors.items())
            body = failure(error_type, message or f"injected {status} {error_type} fault")
        headers = {}
        retry_after = fault.retry_after_header()
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        return self._fail(exchange, status, body, headers)

    def _fail(
        self,
        exchange: _Exchange,
        status: int,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        exchange.error_type = body.get("error_type")
        return json_response(status, body, headers)

    def _poison(self, site: str, scope: str) -> list[ActiveFault]:
        return [a for a in self.faults.applicable("poison", site) if a.fault.poison_scope == scope]

    def _request_poison(
        self, exchange: _Exchange, batch: dict[str, list[Any]]
    ) -> web.Response | None:
        """Fail the whole request when one of its events carries a request-scope poison marker."""
        assert exchange.site is not None
        for active in self._poison(exchange.site, "request"):
            for key, events in batch.items():
                for index, data in enumerate(events):
                    if active.fault.marks(data) and active.roll():
                        field = (
                            f"{key}.{index}.{active.fault.marker_field}"
                            if key
                            else active.fault.marker_field
                        )
                        errors = {field: _poison_message(active.fault)}
                        return self._fault_failure(exchange, active.fault, errors)
        return None

    def _event_error(
        self, event_type: str, data: Any, poison: list[ActiveFault]
    ) -> dict[str, str] | None:
        if self.settings.validate:
            errors = first_error(event_type, data)
            if errors is not None:
                return errors
        for active in poison:
            if active.fault.marks(data) and active.roll():
                return {active.fault.marker_field: _poison_message(active.fault)}
        return None

    def _single_event(self, exchange: _Exchange, event_type: str, data: Any) -> web.Response:
        site = exchange.site
        assert site is not None
        exchange.events = 1
        # The empty key marks a single event, whose error field gets no "key.index." prefix.
        poisoned = self._request_poison(exchange, {"": [data]})
        if poisoned is not None:
            return poisoned
        errors = self._event_error(event_type, data, self._poison(site, "event"))
        if errors is not None:
            self.state.record_rejected(site, event_type)
            return self._fail(exchange, 400, validation_failure(errors))
        self.state.record_accepted(site, event_type, [data])
        exchange.accepted = 1
        return json_response(200, SUCCESS)

    def _batch(self, exchange: _Exchange, payload: Any) -> web.Response:
        site = exchange.site
        assert site is not None
        if not isinstance(payload, dict):
            message = "batch body must be a JSON object of arrays keyed by event type"
            return self._fail(exchange, 400, failure("bad_json", message))
        unknown = sorted(key for key in payload if key not in _BATCH_KEYS)
        if unknown:
            message = f"unknown batch key(s) {', '.join(map(repr, unknown))}: expected {', '.join(BATCH_TYPES)}"
            return self._fail(exchange, 400, failure("invalid_type", message))
        not_arrays = sorted(key for key, value in payload.items() if not isinstance(value, list))
        if not_arrays:
            message = f"batch value(s) of {', '.join(map(repr, not_arrays))} must be JSON arrays of events"
            return self._fail(exchange, 400, failure("bad_json", message))

        exchange.events = sum(len(events) for events in payload.values())
        poisoned = self._request_poison(exchange, payload)
        if poisoned is not None:
            return poisoned

        poison = self._poison(site, "event")
        checked = self.settings.validate or bool(poison)
        results: dict[str, list[dict[str, Any]]] = {}
        for key, events in payload.items():
            if not checked:
                results[key] = [SUCCESS] * len(events)
                accepted = events
            else:
                results[key], accepted = self._check_events(key, events, poison)
                rejected = len(events) - len(accepted)
                if rejected:
                    self.state.record_rejected(site, key, rejected)
            self.state.record_accepted(site, key, accepted)
            exchange.accepted += len(accepted)
        # dumps() sorts the keys, as the live server did.
        return web.Response(status=200, body=dumps(results), content_type="application/json")

    def _check_events(
        self, event_type: str, events: list[Any], poison: list[ActiveFault]
    ) -> tuple[list[dict[str, Any]], list[Any]]:
        results: list[dict[str, Any]] = []
        accepted: list[Any] = []
        for data in events:
            errors = self._event_error(event_type, data, poison)
            if errors is None:
                results.append(SUCCESS)
                accepted.append(data)
            else:
                results.append(validation_failure(errors))
        return results, accepted


def _decode(body: bytes) -> tuple[Any, str | None]:
    """Decode a JSON body into (value, None), or (None, error text) when it is invalid."""
    try:
        return orjson.loads(body), None
    except orjson.JSONDecodeError as exc:
        return None, str(exc)


def _poison_message(fault: Fault) -> str:
    # The marker value as JSON (true, "P2"), the way the client wrote it.
    value = orjson.dumps(fault.marker_value).decode()
    return f"event carries the poison marker {fault.marker_field}={value} (injected fault)"


def _site_error(payload: Any) -> dict[str, str]:
    if not isinstance(payload, dict):
        return {"": f"{payload!r:.200} is not of type 'object'"}
    if "site" not in payload:
        return {"site": "'site' is a required property"}
    return {"site": f"{payload['site']!r:.200} is not of type 'string'"}
