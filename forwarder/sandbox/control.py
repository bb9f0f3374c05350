"""Inspection and fault endpoints under /_sandbox/, for tests and operators.

These endpoints need no token. Errors are `{"error": message}` with status 400, 404
or 409.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from forwarder.logs import get_logger
from forwarder.sandbox.faults import Fault, FaultSet
from forwarder.sandbox.responses import json_response
from forwarder.sandbox.state import SandboxState
from forwarder.schemas import EVENT_TYPES

log = get_logger(__name__)


def _error(status: int, message: str) -> web.Response:
    return json_response(status, {"error": message})


class ControlHandlers:
    """Handlers of /_sandbox/received, stats, requests, reset and faults."""

    def __init__(self, state: SandboxState, faults: FaultSet, reset: Callable[[], None]) -> None:
        self.state = state
        self.faults = faults
        self._reset = reset

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/_sandbox/received", self.received)
        app.router.add_get("/_sandbox/stats", self.stats)
        app.router.add_get("/_sandbox/requests", self.requests)
        app.router.add_post("/_sandbox/reset", self.reset)
        app.router.add_get("/_sandbox/faults", self.list_faults)
        app.router.add_post("/_sandbox/faults", self.add_faults)
        app.router.add_delete("/_sandbox/faults", self.clear_faults)
        app.router.add_delete("/_sandbox/faults/{id}", self.remove_fault)

    async def received(self, request: web.Request) -> web.Response:
        """Return the accepted events of `?site=` as `[{"type": ..., "data": ...}]`.

        `?type=` keeps the events of one type, named as in a batch body or a tracker path.
        """
        site = request.query.get("site")
        if not site:
            return _error(400, "missing query parameter 'site': use /_sandbox/received?site=ID")
        event_type = request.query.get("type")
        if event_type is not None and event_type not in EVENT_TYPES:
            message = f"invalid type {event_type!r}: expected one of {', '.join(EVENT_TYPES)}"
            return _error(400, message)
        if self.state.record != "full":
            message = (
                f"events are not kept in record mode {self.state.record!r}: read /_sandbox/stats"
            )
            return _error(409, message)
        events = self.state.events(site, event_type)
        return json_response(200, [{"type": event.type, "data": event.data} for event in events])

    async def stats(self, request: web.Request) -> web.Response:
        return json_response(200, self.state.stats())

    async def requests(self, request: web.Request) -> web.Response:
        """Return the request log, oldest first. `?site=` filters it and `?limit=N` keeps the last N."""
        records = list(self.state.requests)
        site = request.query.get("site")
        if site:
            records = [record for record in records if record.site == site]
        limit_text = request.query.get("limit")
        if limit_text is not None:
            if not limit_text.isdigit():
                return _error(400, f"invalid limit {limit_text!r}: expected a non-negative integer")
            records = records[len(records) - min(int(limit_text), len(records)) :]
        return json_response(200, [record.to_dict() for record in records])

    async def reset(self, request: web.Request) -> web.Response:
        self._reset()
        return json_response(200, {"success": True})

    async def list_faults(self, request: web.Request) -> web.Response:
        return json_response(200, self.faults.snapshot())

    async def add_faults(self, request: web.Request) -> web.Response:
        """Add one fault (a JSON object) or several (an array) and return them with their ids."""
        try:
            body: Any = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return _error(400, f"request body is not valid JSON: {exc}")
        specs = body if isinstance(body, list) else [body]
        try:
            faults = [_fault_from_json(spec) for spec in specs]
        except ValueError as exc:
            return _error(400, str(exc))
        added = [self.faults.add(fault) for fault in faults]
        for active in added:
            log.info("sandbox fault added", fault_id=active.id, **active.fault.to_dict())
        return json_response(200, [active.to_dict() for active in added])

    async def clear_faults(self, request: web.Request) -> web.Response:
        removed = len(self.faults)
        self.faults.clear()
        log.info("sandbox faults cleared", removed=removed)
        return json_response(200, {"removed": removed})

    async def remove_fault(self, request: web.Request) -> web.Response:
        text = request.match_info["id"]
        if not text.isdigit() or not self.faults.remove(int(text)):
            return _error(404, f"fault {text} not found: list the faults with GET /_sandbox/faults")
        log.info("sandbox fault removed", fault_id=int(text))
        return json_response(200, {"removed": 1})


def _fault_from_json(spec: Any) -> Fault:
    if not isinstance(spec, dict):
        raise ValueError(f"invalid fault {spec!r:.100}: expected a JSON object")
    return Fault.from_mapping(spec)
