"""A Redis Cluster of real redis-server processes on loopback, and a minimal RESP
client for the harness's own checks (roles, slots, failover)."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path
from typing import Iterable

from .paths import require_redis
from .procs import HarnessError, Process, wait_for


def redis_cluster_flags(node_timeout_ms: int = 2000) -> list[str]:
    """The redis-server flags of every cluster node, after `--port`; envoy/docker-compose.yml
    gives the same (tests/e2e/test_compose.py checks it)."""
    return [
        "--bind", "127.0.0.1", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", str(node_timeout_ms),
        # Data survives a restart of the harness (AOF, flushed on SIGTERM).
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        # A new replica syncs at once (the default waits 5 s for more replicas), and a
        # replica that never synced cannot take over a dead master.
        "--repl-diskless-sync-delay", "0",
    ]


class RedisNode(Process):
    def __init__(self, port: int, bus_port: int, directory: Path, node_timeout_ms: int = 2000):
        server, _ = require_redis()
        self.port, self.bus_port, self.dir = port, bus_port, directory
        directory.mkdir(parents=True, exist_ok=True)
        args = [server, "--port", str(port), *redis_cluster_flags(node_timeout_ms), "--cluster-port", str(bus_port),
                "--dir", str(directory), "--daemonize", "no", "--loglevel", "notice"]
        super().__init__(f"redis-{port}", args, directory / "redis.log")

    def command(self, *args: str, timeout: float = 2.0):
        """One command over RESP; an error reply raises HarnessError."""
        return resp_command(self.port, *args, timeout=timeout)

    def info(self, section: str) -> dict[str, str]:
        return _colon_pairs(self.command("INFO", section))

    def cluster_info(self) -> dict[str, str]:
        return _colon_pairs(self.command("CLUSTER", "INFO"))

    def cluster_nodes(self) -> list[list[str]]:
        return [line.split() for line in self.command("CLUSTER", "NODES").splitlines() if line.strip()]

    def role(self) -> str:
        return self.info("replication").get("role", "")


class RedisCluster:
    """A Redis Cluster of `len(ports) // 2` masters with one replica each, on loopback,
    with its data (AOF and nodes.conf) under `workdir`."""

    def __init__(self, ports: list[int], bus_ports: list[int], workdir: Path, node_timeout_ms: int = 2000):
        if len(ports) < 6 or len(ports) % 2:
            raise ValueError("a cluster of masters with one replica each needs an even number >= 6 of ports")
        self.workdir = workdir
        self.nodes = [RedisNode(p, b, workdir / str(p), node_timeout_ms) for p, b in zip(ports, bus_ports)]

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def node(self, port: int) -> RedisNode:
        return next(n for n in self.nodes if n.port == port)

    def start(self, timeout: float = 60.0) -> "RedisCluster":
        """Starts every node; creates the cluster unless the data directories already hold
        one (a restart), then waits for `cluster_state:ok` on every node."""
        existing = all((n.dir / "nodes.conf").is_file() and "myself" in (n.dir / "nodes.conf").read_text()
                       for n in self.nodes)
        for n in self.nodes:
            n.start()
        for n in self.nodes:
            wait_for(lambda n=n: self._pong(n), 15, f"redis-server on {n.port} to answer PING")
        if not existing or not self._assigned():
            self._create()
        self.wait_ok(timeout)
        return self

    def _pong(self, n: RedisNode) -> bool:
        n.check_alive("starting")
        try:
            return n.command("PING") == "PONG"
        except (HarnessError, OSError):
            return False

    def _assigned(self) -> bool:
        try:
            return self.nodes[0].cluster_info().get("cluster_slots_assigned") == "16384"
        except (HarnessError, OSError):
            return False

    def _create(self) -> None:
        _, cli = require_redis()
        addresses = [f"127.0.0.1:{p}" for p in self.ports]
        out = subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )
        if out.returncode != 0 or "[OK] All 16384 slots covered" not in out.stdout:
            raise HarnessError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")

    def ok(self, nodes: Iterable[RedisNode] | None = None) -> bool:
        """Every (live) node says the cluster is ok and sees all slots served."""
        for n in nodes if nodes is not None else self.nodes:
            if not n.alive():
                continue
            try:
                info = n.cluster_info()
            except (HarnessError, OSError):
                return False
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
        return True

    def replicas_synced(self) -> bool:
        """Every live replica has a live link to its master (only then can it take over
        when the master dies)."""
        for n in self.nodes:
            if not n.alive():
                continue
            try:
                repl = n.info("replication")
            except (HarnessError, OSError):
                return False
            if repl.get("role") == "slave" and (repl.get("master_link_status") != "up"
                                                or repl.get("master_sync_in_progress") != "0"):
                return False
        return True

    def wait_ok(self, timeout: float = 60.0) -> float:
        """Waits for `cluster_state:ok` on every live node and for every replica to be in
        sync with its master."""
        def check() -> bool:
            for n in self.nodes:
                if n.proc is not None:
                    n.check_alive("waiting for cluster_state:ok")
            return self.ok() and self.replicas_synced()

        return wait_for(check, timeout, "cluster_state:ok and replicas in sync on every Redis node", interval=0.1)

    def _view(self, exclude: int | None = None) -> list[list[str]]:
        """CLUSTER NODES as a live node sees it."""
        for n in self.nodes:
            if n.alive() and n.port != exclude:
                try:
                    return n.cluster_nodes()
                except (HarnessError, OSError):
                    continue
        raise HarnessError("no live Redis node answers CLUSTER NODES")

    def masters(self) -> list[int]:
        """Ports of the masters that serve slots and are not marked failed."""
        return sorted(_port(p[1]) for p in self._view()
                      if "master" in p[2] and "fail" not in p[2] and len(p) > 8)

    def replica_of(self, master_port: int) -> int | None:
        view = self._view(exclude=master_port)
        master_id = next((p[0] for p in view if _port(p[1]) == master_port), None)
        return next((_port(p[1]) for p in view if p[3] == master_id), None)

    def master_for(self, key: str) -> int:
        """The port of the master that serves `key`'s slot."""
        live = next(n for n in self.nodes if n.alive())
        slot = int(live.command("CLUSTER", "KEYSLOT", key))
        for p in self._view():
            if "master" not in p[2] or "fail" in p[2]:
                continue
            for r in p[8:]:
                if r.startswith("["):  # a slot being migrated
                    continue
                a, _, b = r.partition("-")
                if int(a) <= slot <= int(b or a):
                    return _port(p[1])
        raise HarnessError(f"no master serves slot {slot}")

    def stop(self, timeout: float = 15.0) -> None:
        for n in self.nodes:
            n.signal(signal.SIGTERM)
        for n in self.nodes:
            n.stop(timeout)


def _port(address: str) -> int:
    """The port of a CLUSTER NODES address, `ip:port@bus`."""
    return int(address.split("@")[0].rsplit(":", 1)[1])


def _colon_pairs(text: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def resp_command(port: int, *args: str, host: str = "127.0.0.1", timeout: float = 2.0):
    """Sends one command in RESP2 and returns the reply: str for simple and bulk strings,
    int, None, or a list. An error reply raises HarnessError."""
    out = f"*{len(args)}\r\n".encode()
    for a in args:
        b = a.encode()
        out += f"${len(b)}\r\n".encode() + b + b"\r\n"
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(out)
        f = s.makefile("rb")
        return _resp_read(f)


def _resp_read(f):
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("connection closed mid-reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise HarnessError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_resp_read(f) for _ in range(n)]
    raise OSError(f"unexpected RESP reply {line!r}")
