"""What a benchmark or soak report says about the machine and the build it ran on."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

from .paths import ENVOY_BIN, ROOT


def command_output(cmd: list[str]) -> str:
    """stdout + stderr of a short command run in the repository, or "unavailable"."""
    try:
        r = subprocess.run(cmd, text=True, capture_output=True, cwd=ROOT)
        return (r.stdout + r.stderr).strip()
    except OSError:
        return "unavailable"


def machine_facts(dirty_paths: list[str], dirty_mark: str = " (modified)") -> dict:
    """CPU model and count, kernel, Envoy's version, the commit (marked when any of
    `dirty_paths` has uncommitted changes), Python's version and the date."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    envoy_v = command_output([str(ENVOY_BIN), "--version"])
    m = re.search(r"version: (\S+)", envoy_v)
    dirty = command_output(["git", "status", "--porcelain", "--", *dirty_paths])
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "envoy": m[1] if m else envoy_v,
        "git": command_output(["git", "rev-parse", "--short", "HEAD"]) + (dirty_mark if dirty else ""),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
