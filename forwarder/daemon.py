"""The daemon: wires the intake, the lane scheduler, lease renewal, observability and
shutdown together, and supervises every background task.

Events wait in Redis between steps (producer list, lanes), and only in-flight request
bodies and one intake chunk are in memory. So memory does not grow with the backlog, the
number of sites, or the length of an outage.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from forwarder.backoff import backoff_delay_s
from forwarder.client import ApiClient
from forwarder.config import Config, load_config
from forwarder.envelope import split_lane
from forwarder.intake import Intake
from forwarder.lanes import LaneSender, LaneState
from forwarder.logs import get_logger, redactor
from forwarder.metrics import Metrics
from forwarder.redis_connect import async_client
from forwarder.redis_store import RedisStore
from forwarder.sdnotify import Notifier

log = get_logger(__name__)

T = TypeVar("T")

# Errors after which a Redis call is retried on a fresh connection: connection loss,
# socket timeouts (a blackholed link), a replica that replies READONLY after a failover,
# a server still loading its data after a restart, and a server at maxmemory that
# rejects writes until lanes drain or an operator frees memory.
REDIS_TRANSIENT = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.BusyLoadingError,
    redis_errors.TryAgainError,
    redis_errors.OutOfMemoryError,
    ConnectionResetError,
    OSError,
)

# Error replies that mean "this server cannot serve you right now", not "your command is
# wrong": a blocked read released by a failover (UNBLOCKED), a replica that lost its
# primary (MASTERDOWN), a cluster reconfiguring (CLUSTERDOWN, TRYAGAIN).
TRANSIENT_REPLY_PREFIXES = ("UNBLOCKED", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "LOADING", "READONLY")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, REDIS_TRANSIENT):
        return True
    return isinstance(exc, redis_errors.ResponseError) and str(exc).startswith(TRANSIENT_REPLY_PREFIXES)


# How often the scheduler looks for lanes made due by other instances.
SCHEDULER_POLL_S = 0.2
STATUS_INTERVAL_S = 2.0


class ShutdownForced(Exception):
    """A second signal or the hard deadline ended a wait for Redis."""


class Daemon:
    def __init__(self, config: Config, instance_id: str | None = None, notifier: Notifier | None = None) -> None:
        self.config = config
        self.hostname = socket.gethostname()
        self.instance_id = instance_id or f"{self.hostname}:{os.getpid()}:{secrets.token_hex(3)}"
        self.notifier = notifier or Notifier()
        self.metrics = Metrics()
        self.lane_states: dict[str, LaneState] = {}
        self.byte_ceiling = config.api.max_batch_bytes
        # Monotonic time of the last 2xx from the API, by any lane of this process.
        self.last_success = 0.0
        self.delivered_total = 0
        self.routed_total = 0
        self.dead_full = False
        self.stopping = asyncio.Event()
        self.forced = asyncio.Event()
        self.failed = False
        self.cancelled_work = False
        self.ready = False
        self.redis: aioredis.Redis = self._redis_client(config)
        self.store = RedisStore(self.redis, config.redis.key_prefix)
        self.api = ApiClient(
            config.api.base_url, config.api.timeout_s, config.api.connect_timeout_s,
            config.api.read_timeout_s, config.api.max_concurrency,
        )
        self.request_slots = asyncio.Semaphore(config.api.max_concurrency)
        self.intake = Intake(self)
        self._wake = asyncio.Event()
        self._lane_tasks: dict[str, asyncio.Task[None]] = {}
        # Held while leasing lanes and while renewing: the renewal releases leases that
        # have no lane task, so it must not run between a lease and its task's start.
        self._lease_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._progress: dict[str, float] = {}
        self._metrics_runner: Any = None
        self._reported_backlogs: set[str] = set()
        self.metrics_port: int | None = None

    @property
    def lease_ttl_ms(self) -> int:
        return int(self.config.lease.ttl_s * 1000)

    @staticmethod
    def _redis_client(config: Config) -> aioredis.Redis:
        return async_client(
            config.redis.url,
            socket_timeout=config.redis.socket_timeout_s,
            socket_connect_timeout=config.redis.connect_timeout_s,
            socket_keepalive=True,
            health_check_interval=config.redis.health_check_interval_s,
            # Our own loop retries with backoff and logging; redis-py's silent retry
            # would hide a dead connection for longer than the socket timeout.
            retry_on_timeout=False,
            client_name="jirafe-forwarder",
        )

    # ----------------------------------------------------------------- helpers

    async def bring_forward_retries(self, now_ms: int) -> None:
        """Make lanes that back off after failed requests due within a jittered window.

        Called when a request succeeds after a quiet spell: the API is back, so lanes
        whose backoff grew during an outage need not wait it out. The window grows with
        the number of lanes (about 50 a second, at least 1 s, at most `retry.cap_s`) so
        that their return is not a storm.
        Paused lanes (rejected credentials) keep their probe schedule, and throttled lanes
        the wait that the API asked for.
        """
        keys = self.store.keys
        lanes = await self.redis_call(self.redis.hkeys, keys.attempts)
        if not lanes:
            return
        states = await self.redis_call(self.redis.hmget, keys.lane_state, lanes)
        retrying = []
        for lane, state in zip(lanes, states, strict=True):
            try:
                record = orjson.loads(state) if state is not None else {}
                if record.get("state") == "retrying" and not record.get("throttled"):
                    retrying.append(lane.decode())
            except (orjson.JSONDecodeError, AttributeError):
                continue
        if not retrying:
            return
        window_ms = min(self.config.retry.cap_s, max(1.0, len(retrying) / 50)) * 1000
        due = {lane: now_ms + random.uniform(0, window_ms) for lane in retrying}
        # XX: lanes leased meanwhile are not in the due set and stay out of it.
        # LT: a lane already due sooner keeps its time.
        await self.redis_call(self.store.make_due_by, due)
        log.info("API responded after a quiet spell, retrying backed-off lanes sooner", lanes=len(retrying),
                 window_s=round(window_ms / 1000, 3))
        self.wake_scheduler()

    def wake_scheduler(self) -> None:
        self._wake.set()

    def set_dead_full(self, full: bool) -> None:
        if full != self.dead_full:
            self.dead_full = full
            self.metrics.dead_full.set(1 if full else 0)
            if not full:
                log.info("dead-letter store has room again, intake resumed")

    def progress(self, name: str) -> None:
        self._progress[name] = time.monotonic()

    async def wait_stopping(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout_s)
        except TimeoutError:
            pass

    async def redis_call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Call a Redis operation, retrying transient failures with backoff until forced to stop.

        Every operation is safe to repeat: reads change nothing, and route and ack carry
        ids that make a second application a no-op, so a reply lost with the connection
        never pops events twice.
        """
        failures = 0
        redis_config = self.config.redis
        # A guard over redis-py's own socket timeouts: whatever goes wrong inside the
        # client, no call may wait longer than a connect, a blocking read and a reply.
        deadline_s = redis_config.connect_timeout_s + redis_config.block_timeout_s + 2 * redis_config.socket_timeout_s
        while True:
            try:
                async with asyncio.timeout(deadline_s):
                    result = await fn(*args)
            except (redis_errors.RedisError, OSError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError) and not isinstance(exc, redis_errors.RedisError):
                    exc = redis_errors.TimeoutError(f"no reply within {deadline_s:.1f} s")
                if not is_transient(exc):
                    raise
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # Python 3.11's asyncio.timeout can turn a cancellation that arrives
                    # together with its own timeout into TimeoutError; do not retry then.
                    raise asyncio.CancelledError from exc
                failures += 1
                name = getattr(fn, "__name__", "call")
                delay = backoff_delay_s(failures, 0.05, 2.0)
                log.warning("redis call failed, retrying", operation=name, error=f"{type(exc).__name__}: {exc}",
                            attempt=failures, delay_s=round(delay, 3))
                self.progress("redis_retry")
                if self.forced.is_set():
                    raise ShutdownForced from exc
                try:
                    await asyncio.wait_for(self.forced.wait(), delay)
                except TimeoutError:
                    continue
                raise ShutdownForced from exc
            if failures:
                log.info("redis call succeeded after retries", operation=getattr(fn, "__name__", "call"),
                         attempts=failures + 1)
            return result

    # ------------------------------------------------------------------- run

    async def run(self) -> int:
        """Run until stop() is called; return the process exit code."""
        redactor.set_secrets(self.config.all_tokens())
        log.info("starting", instance=self.instance_id, pid=os.getpid(), redis=_safe_url(self.config.redis.url),
                 api=self.config.api.base_url, key_prefix=self.config.redis.key_prefix)
        await self.api.start()
        try:
            await self._wait_for_redis()
            if self.stopping.is_set():
                return self._exit_code()
            await self._start_metrics_server()
            await self.reap_instances()
            # A start may come with new credentials (systemd copies them only at
            # start), so sites paused by an earlier process are probed at once.
            await self._probe_paused_lanes()
            await self.redis_call(self.store.renew, self.instance_id, self.lease_ttl_ms, self._instance_info(), [])
            for name, coro in (
                ("intake", self.intake.run()),
                ("scheduler", self._scheduler()),
                ("renewer", self._renewer()),
                ("status", self._status_loop()),
            ):
                self._tasks.append(asyncio.create_task(self._supervise(name, coro), name=name))
            self.ready = True
            self.metrics.up.set(1)
            self.notifier.ready(await self._status_text())
            log.info("ready", instance=self.instance_id)
            await self.stopping.wait()
            await self._shutdown()
        finally:
            await self._close()
        return self._exit_code()

    def _exit_code(self) -> int:
        if self.failed:
            return 1
        if self.forced.is_set() or self.cancelled_work:
            return 2
        return 0

    def stop(self, force: bool = False) -> None:
        """Begin a graceful stop; a second call (or force) makes it fast."""
        if self.stopping.is_set() or force:
            if not self.forced.is_set():
                log.warning("forced stop: cancelling in-flight work, events stay in Redis")
            self.forced.set()
        self.stopping.set()

    async def _wait_for_redis(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            try:
                await self.redis.ping()
                return
            except REDIS_TRANSIENT as exc:
                failures += 1
                delay = backoff_delay_s(failures, 0.2, 5.0)
                log.warning("redis not reachable, retrying", error=str(exc), attempt=failures,
                            delay_s=round(delay, 2))
                await self.wait_stopping(delay)

    async def _supervise(self, name: str, coro: Awaitable[None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except ShutdownForced:
            pass
        except Exception:
            log.exception("background task failed, shutting down", task=name)
            self.failed = True
            self.stop()

    # -------------------------------------------------------------- scheduler

    async def _scheduler(self) -> None:
        config = self.config
        while not self.stopping.is_set():
            self.progress("scheduler")
            self._wake.clear()
            free = config.api.max_concurrency - len(self._lane_tasks)
            delay = SCHEDULER_POLL_S
            if free > 0:
                async with self._lease_lock:
                    schedule = await self.redis_call(self.store.schedule, self.instance_id, self.lease_ttl_ms, free)
                    for lane, token in schedule.lanes:
                        self._start_lane(lane, token, flush_only=False)
                if schedule.next_due_ms is not None:
                    delay = min(delay, max(0.0, (schedule.next_due_ms - schedule.now_ms) / 1000))
                if schedule.lanes and len(schedule.lanes) == free:
                    delay = SCHEDULER_POLL_S
            if self.stopping.is_set():
                return
            try:
                await asyncio.wait_for(self._wake.wait(), max(delay, 0.001))
            except TimeoutError:
                pass

    def _start_lane(self, lane: str, token: str, flush_only: bool) -> None:
        task = asyncio.create_task(self._run_lane(lane, token, flush_only), name=f"lane {lane}")
        self._lane_tasks[lane] = task

    async def _run_lane(self, lane: str, token: str, flush_only: bool) -> None:
        try:
            await LaneSender(self, lane, token, flush_only).run()
        except ShutdownForced:
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("lane task failed, shutting down", lane=lane)
            self.failed = True
            self.stop()
        finally:
            self._lane_tasks.pop(lane, None)
            self._wake.set()

    # ---------------------------------------------------------- leases, reaper

    async def _renewer(self) -> None:
        # Runs until cancelled, after the shutdown's grace period: requests that finish
        # during it must still hold their leases when they are acknowledged.
        while True:
            interval = self.config.lease.renew_interval_s
            self.progress("renewer")
            async with self._lease_lock:
                lost = await self.redis_call(
                    self.store.renew, self.instance_id, self.lease_ttl_ms, self._instance_info(),
                    list(self._lane_tasks),
                )
            for lane in lost:
                log.warning("lane lease lost to another instance", lane=lane)
            await self.reap_instances()
            if self.intake.leader:
                # One instance sweeps: lanes whose lease expired unreleased get due again.
                stranded = await self.redis_call(self.store.sweep_stranded_lanes)
                if stranded:
                    log.warning("lanes with events but no owner made due again", lanes=stranded)
                    self.wake_scheduler()
            await asyncio.sleep(interval)

    def _instance_info(self) -> bytes:
        return orjson.dumps({"host": self.hostname, "pid": os.getpid(), "delivered": self.delivered_total})

    async def reap_instances(self) -> None:
        """Release what dead instances hold: at once for a dead pid on this host, else after their lease."""
        instances = await self.redis_call(self.redis.hgetall, self.store.keys.instances)
        for raw_id, raw_info in instances.items():
            other = raw_id.decode()
            if other == self.instance_id:
                continue
            try:
                info = orjson.loads(raw_info)
            except orjson.JSONDecodeError:
                info = {}
            dead_here = info.get("host") == self.hostname and not _pid_alive(info.get("pid"))
            alive = await self.redis_call(self.redis.exists, self.store.keys.heartbeat(other))
            if dead_here or not alive:
                released = await self.redis_call(self.store.release_instance, other)
                log.warning("released claims of a stopped instance", instance=other, lanes=released,
                            reason="process gone" if dead_here else "heartbeat expired")
                self.wake_scheduler()

    # ------------------------------------------------------------- status

    async def _status_loop(self) -> None:
        notifier = self.notifier
        watchdog_s = notifier.watchdog_interval_s
        interval = min(STATUS_INTERVAL_S, watchdog_s) if watchdog_s else STATUS_INTERVAL_S
        last_delivered = self.delivered_total
        last_time = time.monotonic()
        while not self.stopping.is_set():
            now = time.monotonic()
            rate = (self.delivered_total - last_delivered) / max(now - last_time, 1e-6)
            last_delivered, last_time = self.delivered_total, now
            text = await self._status_text(rate)
            notifier.status(text)
            # WATCHDOG=1 only while the pipeline's loops iterate: a wedged task stops
            # the pings and systemd restarts the service.
            stale = [name for name in ("intake", "scheduler", "renewer")
                     if now - self._progress.get(name, now) > max(30.0, self.config.lease.ttl_s * 2)]
            if not stale:
                notifier.watchdog()
            else:
                log.error("pipeline stalled, withholding watchdog ping", tasks=stale)
            await self.wait_stopping(interval)

    async def _status_text(self, rate: float = 0.0) -> str:
        keys = self.store.keys
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.llen(keys.events)
                pipe.llen(keys.claimed)
                pipe.zcard(keys.dead_index)
                pipe.get(keys.dead_bytes)
                backlog, claimed, dead, dead_bytes = await pipe.execute()
        except REDIS_TRANSIENT as exc:
            return f"redis unreachable: {type(exc).__name__}"
        self.progress("intake_status")
        await self._update_lane_backlogs()
        dead_bytes = int(dead_bytes or 0)
        self.metrics.backlog.set(backlog)
        self.metrics.claimed.set(claimed)
        self.metrics.dead_entries.set(dead)
        config = self.config.dead_letter
        self.metrics.dead_fill.set(max(dead / config.max_entries, dead_bytes / config.max_bytes))
        paused = sum(1 for state in self.lane_states.values() if state.state == "paused")
        return (f"{rate:.0f} events/s, backlog {backlog}, sites paused {paused}, dead letters {dead}"
                + (" (FULL)" if self.dead_full else ""))

    async def _update_lane_backlogs(self) -> None:
        """Set the backlog gauge of every lane that is paused or retrying here (0 once it recovers)."""
        lanes = [lane for lane, state in self.lane_states.items() if state.state != "ok"]
        reset = self._reported_backlogs.difference(lanes)
        if lanes:
            async with self.redis.pipeline(transaction=False) as pipe:
                for lane in lanes:
                    pipe.hget(self.store.keys.lane_count, lane)
                lengths = await pipe.execute()
            for lane, length in zip(lanes, lengths, strict=True):
                site, kind = split_lane(lane)
                self.metrics.lane_backlog.labels(site, kind).set(int(length or 0))
        for lane in reset:
            site, kind = split_lane(lane)
            self.metrics.lane_backlog.labels(site, kind).set(0)
        self._reported_backlogs = set(lanes)

    # ----------------------------------------------------------- metrics HTTP

    async def _start_metrics_server(self) -> None:
        listen = self.config.metrics.listen
        if not listen:
            return
        from forwarder.health import start_metrics_server

        self._metrics_runner, self.metrics_port = await start_metrics_server(self, listen)
        log.info("metrics listening", address=f"http://{listen.rsplit(':', 1)[0]}:{self.metrics_port}/metrics")

    # ---------------------------------------------------------------- reload

    async def reload(self, path: str | None) -> None:
        """Re-read tokens and tunables from the configuration file (SIGHUP)."""
        self.notifier.reloading(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        try:
            new = load_config(path)
        except Exception as exc:
            log.error("reload failed, keeping the running configuration", error=str(exc))
            self.notifier.reloaded(await self._status_text())
            return
        old = self.config
        if (new.redis.url, new.redis.key_prefix) != (old.redis.url, old.redis.key_prefix):
            log.warning("redis.url and redis.key_prefix changes need a restart; keeping the old values")
        if new.metrics.listen != old.metrics.listen:
            log.warning("metrics.listen changes need a restart; keeping the old value")
        redactor.set_secrets([*old.all_tokens(), *new.all_tokens()])
        self.config = new
        if new.api.max_batch_bytes != old.api.max_batch_bytes:
            # A ceiling learned from a 413 is kept until the limit itself changes.
            self.byte_ceiling = new.api.max_batch_bytes
        paused = await self._probe_paused_lanes()
        log.info("configuration reloaded", sites=len(new.sites), paused_lanes_probed=len(paused))
        self.notifier.reloaded(await self._status_text())

    async def _probe_paused_lanes(self) -> list[str]:
        """Make every paused lane due now, and return those lanes.

        Paused states in Redis add the lanes paused by an earlier process or another
        instance to those this process paused.
        """
        # Lanes this process paused, including one whose state is not in Redis yet.
        paused = [lane for lane, state in self.lane_states.items() if state.state == "paused"]
        states = await self.redis_call(self.redis.hgetall, self.store.keys.lane_state)
        for raw_lane, raw_state in states.items():
            try:
                state = orjson.loads(raw_state)
            except orjson.JSONDecodeError:
                continue
            lane = raw_lane.decode()
            if isinstance(state, dict) and state.get("state") == "paused" and lane not in paused:
                paused.append(lane)
        for lane in paused:
            if lane in self.lane_states:
                self.lane_states[lane].failures = 0
        if paused:
            # New tokens may have fixed a paused site: probe it now, not after its backoff.
            await self.redis_call(self.store.make_due_now, paused)
            self.wake_scheduler()
        return paused

    # -------------------------------------------------------------- shutdown

    async def _shutdown(self) -> None:
        config = self.config.shutdown
        started = time.monotonic()
        hard_deadline = started + config.hard_deadline_s
        self.notifier.stopping("stopping: flushing partial batches")
        log.info("stopping: intake stopped, flushing partial batches")
        self.ready = False
        self.metrics.up.set(0)

        # Stage 1: stop reading the queue. The intake may be blocked in BLMOVE; cancelling
        # it is safe because that BLMOVE moves an entry within the queue itself.
        renewer = [task for task in self._tasks if task.get_name() == "renewer"]
        others = [task for task in self._tasks if task not in renewer]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

        # Stage 2: flush lingering lanes at once, skipping lanes that are backing off.
        if not self.forced.is_set():
            try:
                schedule = await asyncio.wait_for(
                    self.redis_call(self.store.schedule, self.instance_id, self.lease_ttl_ms,
                                    max(1, self.config.api.max_concurrency - len(self._lane_tasks)),
                                    self.config.batch.linger_ms + 1000, True),
                    timeout=max(0.1, hard_deadline - time.monotonic()),
                )
                for lane, token in schedule.lanes:
                    self._start_lane(lane, token, flush_only=True)
            except (TimeoutError, ShutdownForced) as exc:
                log.warning("flush skipped", error=type(exc).__name__)

        # Stage 3: give in-flight requests the grace period, then cancel the rest. A
        # cancelled batch was never acknowledged, so its events are still in the lane.
        pending = list(self._lane_tasks.values())
        if pending and not self.forced.is_set():
            grace_end = min(started + config.grace_s, hard_deadline)
            forced_wait = asyncio.create_task(self.forced.wait())
            await asyncio.wait(
                [asyncio.gather(*pending, return_exceptions=True), forced_wait],
                timeout=max(0.0, grace_end - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            forced_wait.cancel()
        pending = [task for task in self._lane_tasks.values() if not task.done()]
        if pending:
            log.warning("grace period over, cancelling in-flight requests", lanes=len(pending))
            self.cancelled_work = True
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        for task in renewer:
            task.cancel()
        if renewer:
            # Bounded: a task that does not end on cancellation must not hold the exit.
            await asyncio.wait(renewer, timeout=max(0.5, hard_deadline - time.monotonic()))

        # Stage 4: hand everything back: claimed entries to the queue, leases released.
        remaining = max(0.5, hard_deadline - time.monotonic())
        if self.forced.is_set():
            remaining = min(remaining, 2.0)
        try:
            async with asyncio.timeout(remaining):
                returned = await self._redis_once(self.store.return_claimed, self.instance_id)
                if returned and returned > 0:
                    log.info("claimed entries handed back to the queue", events=returned)
                await self._redis_once(self.store.release_instance, self.instance_id)
        except (TimeoutError, *REDIS_TRANSIENT) as exc:
            # Leases expire by themselves; another instance recovers the claims then.
            log.warning("could not release claims before exit; they expire after the lease",
                        error=type(exc).__name__, lease_s=self.config.lease.ttl_s)
            self.cancelled_work = True
        log.info("stopped", delivered=self.delivered_total, elapsed_s=round(time.monotonic() - started, 3),
                 exit_code=self._exit_code())

    async def _redis_once(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T | None:
        # During the last stage a Redis failure is retried until the stage's timeout.
        while True:
            try:
                return await fn(*args)
            except REDIS_TRANSIENT:
                await asyncio.sleep(0.1)

    async def _close(self) -> None:
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        await self.api.close()
        try:
            await self.redis.aclose()
        except REDIS_TRANSIENT:
            pass
        self.notifier.close()


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _safe_url(url: str) -> str:
    # Drop a password from redis://user:password@host URLs before logging.
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
