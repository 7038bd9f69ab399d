"""Test backends as processes: an echo backend that reports who served and which headers
it saw (`backend_server`), and a fake Envoy admin for discovery faults
(`fake_admin_server`). Each runs as its own process so a test can kill it, as a crash
would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .procs import HarnessError, join_address, kill_hard


def _spawn(module: str, args: list[str], what: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", f"sa_harness.{module}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline() if proc.stdout else b""
    if line.strip() != b"ready":
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        kill_hard(proc)
        raise HarnessError(f"{what} failed to start: {err}")
    return proc


class Backend:
    """An echo backend process (sa_harness.backend_server): answers every request with
    who served it and which headers it saw; `GET /healthz` is 200 unless made unhealthy."""

    def __init__(self, name: str, port: int, hosts: list[str] | None = None, workdir: Path | None = None):
        self.name, self.port = name, port
        self.hosts = hosts or ["127.0.0.1"]
        self.proc: subprocess.Popen | None = None
        self.unhealthy_file = (workdir or Path("/tmp")) / f"unhealthy-{name}-{port}"
        self.load_file = (workdir or Path("/tmp")) / f"load-{name}-{port}"

    @property
    def address(self) -> str:
        return join_address(self.hosts[0], self.port)

    def start(self) -> "Backend":
        args = ["--port", str(self.port), "--name", self.name, "--unhealthy-file", str(self.unhealthy_file),
                "--load-file", str(self.load_file)]
        for h in self.hosts:
            args += ["--host", h]
        self.proc = _spawn("backend_server", args, f"backend {self.name} on {self.port}")
        return self

    def kill(self) -> None:
        kill_hard(self.proc)

    def set_load(self, kv_cache_usage: float | str | None) -> None:
        """What the backend reports when asked for an ORCA TEXT load report: a
        `kv_cache_usage_perc` value, `"raw:<text>"` sent verbatim, or None (no report)."""
        if kv_cache_usage is None:
            self.load_file.unlink(missing_ok=True)
            return
        tmp = self.load_file.with_suffix(".tmp")
        tmp.write_text(str(kv_cache_usage))
        os.replace(tmp, self.load_file)

    def set_healthy(self, healthy: bool) -> None:
        if healthy:
            self.unhealthy_file.unlink(missing_ok=True)
        else:
            self.unhealthy_file.write_text("x")


class FakeAdmin:
    """A fake Envoy admin process (sa_harness.fake_admin_server) for discovery fault
    tests: it proxies the real admin on `upstream_port` until `set_mode` tells it to
    misbehave; `kill` stops it (connection refused) and `start` brings it back on the
    same port."""

    def __init__(self, port: int, upstream_port: int, workdir: Path):
        self.port, self.upstream_port = port, upstream_port
        self.mode_file = workdir / f"fake-admin-{port}.mode"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "FakeAdmin":
        args = ["--port", str(self.port), "--upstream-port", str(self.upstream_port),
                "--mode-file", str(self.mode_file)]
        self.proc = _spawn("fake_admin_server", args, f"fake admin on {self.port}")
        return self

    def set_mode(self, mode: str) -> None:
        tmp = self.mode_file.with_suffix(".tmp")
        tmp.write_text(mode)
        os.replace(tmp, self.mode_file)

    def kill(self) -> None:
        kill_hard(self.proc)
