"""The Sandbox: a local stand-in for the Jirafe Event API v2, run in-process or as a process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from forwarder.logs import get_logger
from forwarder.sandbox.app import ApiHandlers, ApiSettings
from forwarder.sandbox.auth import TokenTable
from forwarder.sandbox.control import ControlHandlers
from forwarder.sandbox.faults import Fault, FaultSet
from forwarder.sandbox.state import RecordMode, SandboxState
from forwarder.schemas import EVENT_TYPES, validator

log = get_logger(__name__)

DEFAULT_MAX_BODY_BYTES = 10_000_000
# Seconds that stop() gives open requests before cancelling them.
_SHUTDOWN_TIMEOUT_S = 5.0


class Sandbox:
    """A local Event API server with the live server's behaviour, recording and faults.

    Use it as an async context manager, which starts it on `host:port` (port 0 picks a
    free port) and stops it on exit:

        async with Sandbox(tokens={"tok-a": {"1001", "1002"}}) as sb:
            ...  # send to sb.base_url + "/1001/batch"
            await sb.wait_for(lambda state: state.total_accepted >= 10)

    Args:
        tokens: bearer tokens mapped to the site ids each may write to. The site "*"
            allows every site. Without tokens every API request gets 403 invalid_token.
        host: address to listen on.
        port: TCP port, or 0 for a free one.
        validate: check events against the schemas. False is the counting mode for
            benchmarks: every well-formed batch event is accepted without a look.
        record: `full` keeps every accepted event, `digest` only what duplicate
            detection needs, `count` only counters (see SandboxState).
        max_body_bytes: largest accepted request body. One byte more gets 413.
        close_on_oversize: respond with 413 and close the connection without reading the
            rest of an oversized body, as reverse proxies do. By default the sandbox
            reads and discards the body and keeps the connection open.
        faults: faults active from the start.
        seed: seed from which faults without their own seed derive their random generator.
        request_log_limit: number of latest requests kept in the request log, or None
            for all of them. Request counters always cover every request.
    """

    def __init__(
        self,
        tokens: Mapping[str, Iterable[str]] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        validate: bool = True,
        record: RecordMode = "full",
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        close_on_oversize: bool = False,
        faults: Iterable[Fault] = (),
        seed: int = 0,
        request_log_limit: int | None = 100_000,
    ) -> None:
        if max_body_bytes < 0:
            raise ValueError(f"invalid max_body_bytes {max_body_bytes}: must be 0 or more")
        self.host = host
        self.port = port
        self.tokens = TokenTable(tokens)
        self.settings = ApiSettings(
            validate=validate, max_body_bytes=max_body_bytes, close_on_oversize=close_on_oversize
        )
        self.state = SandboxState(record=record, request_log_limit=request_log_limit)
        self._waiters: list[tuple[Callable[[SandboxState], bool], asyncio.Future[None]]] = []
        self.faults = FaultSet(seed=seed, on_change=self._notify)
        for fault in faults:
            self.faults.add(fault)
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Root URL, such as http://127.0.0.1:8080. Available once started."""
        if self._runner is None:
            raise RuntimeError("the sandbox is not running: call start() or use 'async with'")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """API base URL (`url` + "/v2"), the value for the daemon's `api.base_url`."""
        return self.url + "/v2"

    def token_label(self, token: str) -> str:
        """Return the label that the request log and the logs use for `token`."""
        return self.tokens.label(token)

    def make_app(self) -> web.Application:
        app = web.Application()
        ApiHandlers(
            self.settings, self.tokens, self.state, self.faults, self._notify, self._stopping
        ).add_routes(app)
        ControlHandlers(self.state, self.faults, self.reset).add_routes(app)
        return app

    async def start(self) -> None:
        """Start listening. Raises OSError when the address cannot be bound."""
        if self._runner is not None:
            raise RuntimeError("the sandbox is already running")
        self._stopping.clear()
        if self.settings.validate:
            # Compile the validators now, so that the first request is not slowed down.
            for event_type in EVENT_TYPES:
                validator(event_type)
        # lingering_time=0: after responding to a request whose body was not read (413 with
        # close_on_oversize), close the connection instead of reading the rest.
        runner = web.AppRunner(
            self.make_app(),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
            lingering_time=0,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        if not self.tokens:
            log.warning("sandbox has no tokens: every API request will get 403 invalid_token")
        log.info(
            "sandbox listening",
            url=self.url,
            tokens=len(self.tokens),
            validate=self.settings.validate,
            record=self.state.record,
            max_body_bytes=self.settings.max_body_bytes,
            close_on_oversize=self.settings.close_on_oversize,
            faults=len(self.faults),
        )

    async def stop(self) -> None:
        """Stop listening and end open requests. Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        # Releases hanging requests so that the runner's shutdown does not wait for them.
        self._stopping.set()
        await runner.cleanup()
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(
                    RuntimeError("the sandbox stopped before the condition was met")
                )
        log.info(
            "sandbox stopped",
            requests=self.state.total_requests,
            accepted=self.state.total_accepted,
        )

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    def reset(self) -> None:
        """Clear the recorded state and remove every fault."""
        self.faults.clear()
        self.state.clear()
        log.info("sandbox reset")
        self._notify()

    async def wait_for(
        self,
        predicate: Callable[[SandboxState], bool],
        timeout: float = 10.0,
    ) -> SandboxState:
        """Wait until `predicate(state)` is true and return the state.

        The predicate is checked now and after every change: each request start and
        end, each fault change and each reset. So a condition that holds only briefly,
        such as `state.in_flight == 1`, is not missed. Raises TimeoutError, with a
        summary of the state, when `timeout` seconds pass first.
        """
        if predicate(self.state):
            return self.state
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (predicate, future)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            raise TimeoutError(
                f"sandbox condition not met within {timeout} s: {self.state.summary()}"
            ) from None
        finally:
            self._waiters.remove(waiter)
        return self.state

    async def wait_for_requests(self, count: int, timeout: float = 10.0) -> SandboxState:
        """Wait until the sandbox has finished `count` API requests in total."""
        return await self.wait_for(lambda state: state.total_requests >= count, timeout)

    def _notify(self) -> None:
        for predicate, future in self._waiters:
            if future.done():
                continue
            try:
                met = predicate(self.state)
            except Exception as exc:
                future.set_exception(exc)
                continue
            if met:
                future.set_result(None)
