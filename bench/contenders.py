"""The processes under test: the product and its peers, each with its way to start and to fill.

A contender's backlog is written to a staging key before it starts. Once the process
is ready, the harness renames the staging key to the live one in one O(1) step, so
timing starts with the whole backlog in place and none of the start-up in it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench import procs
from bench.events import Template, envelopes, site_ids
from bench.peers import READY_KEY

EVENTS_KEY = "jirafe:events"
STAGING_KEY = "bench:staging"
ARQ_QUEUE = "arq:queue"
ARQ_STAGING = "arq:staging"
# Entries per LPUSH while filling; 1,000 carts make one 1.2 MB command.
FILL_CHUNK = 1000


def fill_list(client: redis.Redis, key: str, count: int, templates: list[tuple[int, Template]],
              sites: int) -> None:
    """LPUSH `count` envelopes onto `key`, pipelined in chunks."""
    pipe = client.pipeline(transaction=False)
    chunk: list[bytes] = []
    queued = 0
    for envelope in envelopes(count, site_ids(sites), templates):
        chunk.append(envelope)
        if len(chunk) == FILL_CHUNK:
            pipe.lpush(key, *chunk)
            chunk = []
            queued += 1
            if queued == 20:
                pipe.execute()
                queued = 0
    if chunk:
        pipe.lpush(key, *chunk)
    pipe.execute()


@dataclass
class Contender:
    """One process under test and the settings it runs with."""

    name: str
    # Settings shown in the results: product config keys or the peer's tuned options.
    settings: dict[str, Any] = field(default_factory=dict)
    # For the product only: the shadow directory that hides uvloop and/or hiredis.
    shadow: str | None = None

    @property
    def kind(self) -> str:
        return self.name.split(" ")[0]

    def describe(self) -> str:
        options = ", ".join(f"{key}={value}" for key, value in self.settings.items())
        return f"{self.name} ({options})" if options else self.name

    def fill(self, client: redis.Redis, redis_url: str, count: int, templates: list[tuple[int, Template]],
             sites: int, template_name: str) -> None:
        if self.kind == "arq":
            output = subprocess.run(
                [str(procs.ARQ_VENV / "bin" / "python"), "-m", "bench.peers.arq_peer", "enqueue",
                 "--redis", redis_url, "--queue", ARQ_STAGING, "--events", str(count),
                 "--sites", str(sites), "--template", template_name],
                cwd=procs.ROOT, env=procs.peer_env(), capture_output=True, check=False, timeout=1800,
            )
            if output.returncode != 0:
                raise RuntimeError(f"arq enqueue failed: {output.stderr.decode()[-2000:]}")
            return
        fill_list(client, STAGING_KEY, count, templates, sites)

    def release(self, client: redis.Redis) -> None:
        if self.kind == "arq":
            client.rename(ARQ_STAGING, ARQ_QUEUE)
        else:
            client.rename(STAGING_KEY, EVENTS_KEY)

    def ready(self, client: redis.Redis) -> bool:
        if self.kind == "product":
            # The intake leader key appears once the daemon is ready and claiming.
            return bool(client.exists("jirafe:intake:leader"))
        return client.get(READY_KEY) is not None

    def start(self, redis_url: str, sink: procs.Sink, count: int, log_path: Path,
              max_seconds: float) -> subprocess.Popen[bytes]:
        python = str(procs.VENV_PYTHON)
        if self.kind == "product":
            env = procs.daemon_env(redis_url, sink, self.settings, self.shadow)
            binary = str(procs.VENV_PYTHON.parent / "jirafe-forwarder")
            return procs.spawn([binary, "run"], log_path, env)
        if self.kind == "floor":
            args = [python, "-m", "bench.peers.floor", "--redis", redis_url, "--api", sink.base_url,
                    "--token", procs.TOKEN, "--events", str(count), "--max-seconds", str(max_seconds)]
        elif self.kind == "segment":
            args = [python, "-m", "bench.peers.segment_feed", "--redis", redis_url, "--host", sink.url,
                    "--write-key", procs.WRITE_KEY, "--events", str(count),
                    "--max-seconds", str(max_seconds)]
        elif self.kind == "arq":
            args = [str(procs.ARQ_VENV / "bin" / "python"), "-m", "bench.peers.arq_peer", "worker",
                    "--redis", redis_url, "--api", sink.base_url, "--token", procs.TOKEN,
                    "--events", str(count), "--max-seconds", str(max_seconds)]
        else:
            raise ValueError(f"unknown contender {self.name!r}")
        for key, value in self.settings.items():
            option = "--" + key.replace("_", "-")
            args += [option] if value is True else [option, str(value)]
        return procs.spawn(args, log_path, procs.peer_env())

    def backlog_left(self, client: redis.Redis) -> int:
        if self.kind == "arq":
            return int(client.zcard(ARQ_QUEUE))
        return int(client.llen(EVENTS_KEY))


def product(shadow: str | None = None, **settings: Any) -> Contender:
    label = {None: "product", "no-uvloop": "product without uvloop",
             "no-hiredis": "product without hiredis",
             "no-uvloop-no-hiredis": "product without uvloop and hiredis"}[shadow]
    return Contender(label, dict(settings), shadow)
