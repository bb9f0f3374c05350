"""Processes of a benchmark run: Redis, the sink, the process under test, and their accounting.

CPU time comes from the kernel's accounting of each process (psutil's cpu_times(),
user plus system, children excluded), sampled before the work is released and after
the sink received the last event. Peak RSS is the kernel's high-water mark (VmHWM).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import psutil

from forwarder.localredis import RedisServer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
VENV_PYTHON = Path(sys.executable)
ARQ_VENV = RESULTS / "venv-arq"
# Directories that shadow uvloop and hiredis with modules whose import fails, put first
# on PYTHONPATH to run the product as if those packages were not installed.
SHADOW = RESULTS / "shadow"

TOKEN = "bench-token"
WRITE_KEY = "bench-write-key"


class Sampled:
    """CPU time and memory of one process, read from the kernel."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.process = psutil.Process(pid)

    def cpu_s(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def _status_kb(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1])
        raise RuntimeError(f"{field} not found in /proc/{self.pid}/status")

    def peak_rss_mb(self) -> float:
        return self._status_kb("VmHWM:") / 1024

    def rss_mb(self) -> float:
        return self._status_kb("VmRSS:") / 1024

    def remote_addresses(self) -> set[str]:
        """Return the remote IP addresses of the process's open TCP connections."""
        addresses = set()
        for connection in self.process.net_connections(kind="inet"):
            if connection.raddr:
                addresses.add(connection.raddr.ip)
        return addresses


def busy_cpu_s() -> float:
    """Return the CPU time all processes on the machine have used, in seconds (all cores)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def check_loopback(sampled: Sampled, name: str) -> None:
    """Raise when the process has a TCP connection to anything but a loopback address."""
    for address in sampled.remote_addresses():
        if not ipaddress.ip_address(address).is_loopback:
            raise RuntimeError(f"{name} (pid {sampled.pid}) is connected to {address}, not loopback")


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 30.0) -> int:
    """Send SIGTERM, wait up to `timeout_s`, then SIGKILL; return the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


class Sink:
    """The `bench.sink` process."""

    def __init__(self, latency: bool = False) -> None:
        self.latency = latency
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.sampled: Sampled | None = None

    def start(self) -> None:
        args = [str(VENV_PYTHON), "-m", "bench.sink", "--port", "0", "--token", TOKEN,
                "--write-key", WRITE_KEY]
        if self.latency:
            args.append("--latency")
        self.process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, env=_clean_env())
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        if not line.startswith("sink listening on "):
            stop_process(self.process)
            raise RuntimeError(f"sink did not start: {line!r}")
        self.url = line.split()[-1]
        self.sampled = Sampled(self.process.pid)

    @property
    def base_url(self) -> str:
        return self.url + "/v2"

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else orjson.dumps(body)
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return orjson.loads(response.read())

    def stats(self) -> dict[str, Any]:
        return self._request("GET", "/_bench/stats")

    def latencies(self) -> dict[str, list[float]]:
        return self._request("GET", "/_bench/latency")

    def reset(self) -> None:
        self._request("POST", "/_sandbox/reset")

    def start_outage(self) -> None:
        self._request("POST", "/_sandbox/faults", {"kind": "error", "status": 503})

    def end_outage(self) -> None:
        self._request("DELETE", "/_sandbox/faults")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


def start_redis(name: str) -> RedisServer:
    server = RedisServer(RESULTS / "redis" / name, durable=False)
    server.start()
    return server


def _clean_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("JIRAFE_FORWARDER_")}
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = str(ROOT)
    return env


def daemon_env(redis_url: str, sink: Sink, settings: Mapping[str, Any], shadow: str | None) -> dict[str, str]:
    """Environment of `jirafe-forwarder run`: settings are `section_key` names and values."""
    env = _clean_env()
    if shadow:
        env["PYTHONPATH"] = f"{SHADOW / shadow}{os.pathsep}{ROOT}"
    env["JIRAFE_FORWARDER_REDIS_URL"] = redis_url
    env["JIRAFE_FORWARDER_API_BASE_URL"] = sink.base_url
    env["JIRAFE_FORWARDER_API_TOKEN"] = TOKEN
    env["JIRAFE_FORWARDER_METRICS_LISTEN"] = ""
    env["JIRAFE_FORWARDER_LOG_LEVEL"] = "warning"
    env["JIRAFE_FORWARDER_LOG_FORMAT"] = "json"
    for key, value in settings.items():
        env[f"JIRAFE_FORWARDER_{key.upper()}"] = str(value)
    return env


def prepare_shadows() -> None:
    """Write the modules that hide uvloop and hiredis from the product (see SHADOW)."""
    for name, modules in {"no-uvloop": ["uvloop"], "no-hiredis": ["hiredis"],
                          "no-uvloop-no-hiredis": ["uvloop", "hiredis"]}.items():
        folder = SHADOW / name
        folder.mkdir(parents=True, exist_ok=True)
        for module in modules:
            (folder / f"{module}.py").write_text(
                f'raise ImportError("{module} is hidden by the benchmark harness")\n'
            )


def shadow_check(shadow: str) -> dict[str, bool]:
    """Return whether uvloop and hiredis are usable for a product run with this shadow."""
    env = _clean_env()
    env["PYTHONPATH"] = f"{SHADOW / shadow}{os.pathsep}{ROOT}"
    code = (
        "import json, importlib.util\n"
        "from redis.utils import HIREDIS_AVAILABLE\n"
        "try:\n    import uvloop; u = True\nexcept ImportError:\n    u = False\n"
        "print(json.dumps({'uvloop': u, 'hiredis': HIREDIS_AVAILABLE}))\n"
    )
    output = subprocess.run([str(VENV_PYTHON), "-c", code], env=env, cwd=ROOT, capture_output=True,
                            check=True, timeout=60)
    return orjson.loads(output.stdout)


def spawn(args: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a process under test with stdout and stderr in `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(args, cwd=ROOT, env=dict(env) if env else _clean_env(),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def peer_env() -> dict[str, str]:
    return _clean_env()


def wait_until(predicate: Any, timeout_s: float, interval_s: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not met within {timeout_s} s")
