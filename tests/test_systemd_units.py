"""The systemd units: settings the daemon relies on, and scripts/check-systemd."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from forwarder.config import SYSTEMD_TIMEOUT_STOP_S, ShutdownConfig
from tests.daemon_proc import ROOT

UNITS = Path(ROOT) / "systemd"
SERVICE = UNITS / "jirafe-forwarder.service"
TEMPLATE = UNITS / "jirafe-forwarder@.service"
CHECK = Path(ROOT) / "scripts" / "check-systemd"
MAX_EXPOSURE = 1.5

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package systemd); scripts/check-systemd installs it in CI",
)


def settings(path: Path) -> dict[str, list[str]]:
    """Return every `Key=value` of a unit, in order; a key set twice has two values."""
    result: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith(("#", "[")):
            continue
        key, _, value = line.partition("=")
        result.setdefault(key, []).append(value)
    return result


@pytest.mark.parametrize("unit", [SERVICE, TEMPLATE], ids=["service", "template"])
def test_unit_lifecycle_settings(unit: Path) -> None:
    values = settings(unit)
    assert values["Type"] == ["notify"]
    assert values["NotifyAccess"] == ["main"]
    assert values["WatchdogSec"] == ["30"]
    assert values["Restart"] == ["on-failure"]
    assert values["RestartSec"] == ["2"]
    assert values["KillSignal"] == ["SIGTERM"]
    assert values["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert values["LoadCredential"] == ["jirafe-token:/etc/jirafe-forwarder/jirafe-token"]
    # The daemon's hard deadline must end before systemd's stop timeout kills it.
    assert float(values["TimeoutStopSec"][0]) == SYSTEMD_TIMEOUT_STOP_S
    assert ShutdownConfig().hard_deadline_s < SYSTEMD_TIMEOUT_STOP_S


@pytest.mark.parametrize("unit", [SERVICE, TEMPLATE], ids=["service", "template"])
def test_unit_keeps_notify_socket_reachable(unit: Path) -> None:
    values = settings(unit)
    families = values["RestrictAddressFamilies"][0].split()
    assert "AF_UNIX" in families
    assert {"AF_INET", "AF_INET6"} <= set(families)
    # PrivateNetwork= would cut the daemon off from Redis and the API.
    assert "PrivateNetwork" not in values


def test_unit_exec_start_paths() -> None:
    service = settings(SERVICE)["ExecStart"]
    template = settings(TEMPLATE)["ExecStart"]
    binary = "/opt/jirafe-forwarder/venv/bin/jirafe-forwarder"
    assert service == [f"{binary} run --config /etc/jirafe-forwarder/forwarder.toml"]
    assert template == [f"{binary} run --config /etc/jirafe-forwarder/%i.toml"]


def test_template_matches_service_settings() -> None:
    # The two units differ only where the instance name goes; a hardening line
    # added to one and forgotten in the other fails here.
    service = settings(SERVICE)
    template = settings(TEMPLATE)
    instance_keys = {"Description", "ExecStart"}
    assert set(service) == set(template)
    for key in set(service) - instance_keys:
        assert service[key] == template[key], key
    assert "%i" in template["Description"][0]


@needs_systemd_analyze
def test_check_systemd_passes_and_reports_exposure() -> None:
    result = subprocess.run([str(CHECK)], capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    exposures = dict(re.findall(r"^(\S+): exposure ([0-9.]+) ok", result.stdout, re.MULTILINE))
    assert set(exposures) == {SERVICE.name, TEMPLATE.name}
    for exposure in exposures.values():
        assert float(exposure) <= MAX_EXPOSURE
    assert f"{SERVICE.name}: verify ok" in result.stdout
    assert f"{TEMPLATE.name}: verify ok" in result.stdout


@needs_systemd_analyze
def test_check_systemd_rejects_weak_unit(tmp_path: Path) -> None:
    hardening = re.compile(r"^(SystemCallFilter|PrivateUsers|ProtectKernel\w*|RestrictNamespaces|IPAddress\w+)=")
    for unit in (SERVICE, TEMPLATE):
        lines = unit.read_text().splitlines(keepends=True)
        if unit is TEMPLATE:
            # An unknown key: verify only warns about it, and the check must fail.
            lines.append("ProtectEverything=yes\n")
        else:
            lines = [line for line in lines if not hardening.match(line)]
        (tmp_path / unit.name).write_text("".join(lines))

    result = subprocess.run([str(CHECK), str(tmp_path)], capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert result.returncode == 1
    exposure = re.search(rf"^{re.escape(SERVICE.name)}: exposure ([0-9.]+) FAILED", result.stdout, re.MULTILINE)
    assert exposure is not None, result.stdout
    assert float(exposure.group(1)) > MAX_EXPOSURE
    assert f"{TEMPLATE.name}: verify FAILED" in result.stdout
    assert "Unknown key 'ProtectEverything'" in result.stdout
