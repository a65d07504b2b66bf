"""Running a test script in a fresh Python with N virtual CPU devices.

The device count is an XLA flag read once, when jax starts, so tests that need several
devices run a script in a subprocess; the script prints one ``RESULT:`` JSON line.
"""

import json
import os
import subprocess
import sys
from pathlib import Path


def device_env(devices: int) -> dict:
    """This environment with ``devices`` virtual CPU devices and no inherited JAX cluster."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def parse_result(stdout: str) -> dict:
    """The one ``RESULT:`` line a script printed, decoded."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT:")]
    assert len(lines) == 1, stdout[-4000:]
    return json.loads(lines[0][len("RESULT:") :])


def run_script(script: Path, devices: int = 8, timeout: int = 300) -> dict:
    """Runs ``script`` with ``devices`` CPU devices (bounded by ``timeout``): its result."""
    proc = subprocess.run(
        [sys.executable, str(script)],
        env=device_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"script failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return parse_result(proc.stdout)
