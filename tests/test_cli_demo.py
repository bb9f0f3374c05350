"""`jirafe-forwarder demo` through the console script that `scripts/demo` runs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path


async def test_demo_hint_names_installed_cli(tmp_path: Path) -> None:
    # pip installs the console script next to the interpreter, as in .venv/bin.
    script = Path(sys.executable).with_name("jirafe-forwarder")
    assert script.exists(), f"{script} is missing: run scripts/bootstrap"
    process = await asyncio.create_subprocess_exec(
        str(script), "demo", "--events", "40", "--sites", "2", cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    output = stdout.decode()
    assert "dead-lettered: 7" in output
    assert "(against the same Redis)" not in output
    assert "these dead letters cannot be inspected afterwards" in output
    for command in ("check-config", "run", "dead list"):
        assert f"\n  {script} {command} --config forwarder.toml" in output
