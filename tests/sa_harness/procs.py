"""Ports, waiting, and child processes."""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .paths import ROOT


class HarnessError(RuntimeError):
    """A process did not start or did not reach the expected state."""


# --------------------------------------------------------------------------------------
# Ports.

_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port, never the same twice in one process."""
    for _ in range(200):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def port_bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def join_address(ip: str, port: int) -> str:
    """`ip:port` as Envoy prints it (IPv6 in brackets)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# --------------------------------------------------------------------------------------
# Waiting for a state, never for luck.


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    """Polls `condition` until true; returns the seconds it took. Raises HarnessError
    naming `what` after `timeout` (a generous bound that only a real failure reaches)."""
    start = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_port(host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    def listening() -> bool:
        if proc is not None and proc.poll() is not None:
            raise HarnessError(f"process exited with {proc.returncode} before listening on {host}:{port}")
        return port_open(port, host)

    wait_for(listening, timeout, f"something to listen on {host}:{port}", interval=0.02)


# --------------------------------------------------------------------------------------
# Processes.

_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    # Runs in the child between fork and exec: if the harness dies, so does the child.
    # (The signal follows the *thread* that started the child: start processes from the
    # main thread.)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:
        pass


def kill_hard(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


class Process:
    """One child process with its output in a log file, in its own session (a Ctrl-C in
    the terminal reaches only the harness, which stops its children in order)."""

    def __init__(self, name: str, args: list[str], log_path: Path, cwd: Path = ROOT, env: dict | None = None):
        self.name, self.args, self.log_path, self.cwd, self.env = name, args, log_path, cwd, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Process":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=str(self.cwd),
                env=self.env, start_new_session=True,
                preexec_fn=_child_setup if sys.platform.startswith("linux") else None,
            )
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def kill(self) -> None:
        """SIGKILL, as a crash would, and reap."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`."""
        if not self.alive():
            if self.proc is not None:
                self.proc.wait(timeout=10)
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def check_alive(self, what: str) -> None:
        if not self.alive():
            raise HarnessError(f"{self.name} exited with {self.returncode()} while {what}:\n{self.log_tail()}")
