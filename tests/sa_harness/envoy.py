"""Envoy: the one wrapper every harness user starts Envoy with (tests, `make run`, the
soak and the benchmarks), the reference configuration moved onto other ports, and reading
Envoy's admin API (stats, cluster hosts, the filter's log lines)."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterable

import yaml

from .paths import REFERENCE_YAML, ROOT, TOKEN_KEY_B64, require_envoy, require_wasm
from .procs import HarnessError, Process, join_address, port_open, wait_for

# Prefix of the filter's metrics in Envoy's /stats.
STAT_PREFIX = "wasmcustom.session_affinity."

# Flags Envoy's admin /clusters sets on hosts that are not healthy (DESIGN section 6).
UNHEALTHY_FLAGS = ("failed_active_health_check", "failed_outlier_check", "pending_dynamic_removal",
                   "excluded_via_immediate_hc_fail")


def parse_stats(text: str, prefix: str = "") -> dict[str, int]:
    """Integer stats of an admin `/stats` text body whose names start with `prefix`,
    with the prefix removed (histograms and text values are left out)."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith(prefix):
            try:
                out[name[len(prefix):]] = int(value)
            except ValueError:
                pass
    return out


def host_is_healthy(host: dict, drain_ok: bool = False) -> bool:
    """The filter's health rule for one host of admin `/clusters?format=json`."""
    hs = host.get("health_status", {})
    ok = ("HEALTHY", "DEGRADED", "DRAINING") if drain_ok else ("HEALTHY", "DEGRADED")
    return hs.get("eds_health_status", "HEALTHY") in ok and not any(hs.get(f) for f in UNHEALTHY_FLAGS)


def host_address(host: dict) -> str:
    sa = host["address"]["socket_address"]
    return join_address(sa["address"], sa["port_value"])


class Envoy(Process):
    """An Envoy process with a config (a dict, written to `<workdir>/<name>.yaml`, or the
    path of a file), run from the repository root. `pin` prefixes the command (e.g.
    `taskset -c 0`)."""

    def __init__(self, cfg: dict | Path, workdir: Path, concurrency: int = 2, name: str = "envoy",
                 log_level: str = "info", pin: list[str] | None = None):
        binary = require_envoy()
        self.workdir, self.concurrency = workdir, concurrency
        if isinstance(cfg, dict):
            self.cfg = cfg
            self.config_path = workdir / f"{name}.yaml"
        else:
            self.config_path = Path(cfg)
            self.cfg = yaml.safe_load(self.config_path.read_text())
        self.admin_port = self.cfg["admin"]["address"]["socket_address"]["port_value"]
        listeners = self.cfg["static_resources"]["listeners"]
        listener = next((l for l in listeners if l.get("name") == "chat"), listeners[0])
        self.port = listener["address"]["socket_address"]["port_value"]
        args = [*(pin or []), str(binary), "-c", str(self.config_path), "--concurrency", str(concurrency),
                "--disable-hot-restart", "--log-level", log_level]
        super().__init__(name, args, workdir / f"{name}.log")

    # -- lifecycle --------------------------------------------------------------------

    def start(self, wait: bool = True, timeout: float = 60.0) -> "Envoy":
        if isinstance(self.cfg, dict) and self.config_path.parent == self.workdir:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.config_path.write_text(yaml.safe_dump(self.cfg, sort_keys=False))
        super().start()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Admin `/ready` answers LIVE and the listener accepts connections."""
        def ready() -> bool:
            self.check_alive("starting")
            try:
                return self.admin("/ready", timeout=1).strip() == "LIVE"
            except OSError:
                return False

        wait_for(ready, timeout, f"Envoy {self.name} admin /ready", interval=0.05)
        wait_for(lambda: port_open(self.port), timeout, f"Envoy {self.name} listener {self.port}", interval=0.02)

    def cpu_ticks(self) -> int:
        """utime + stime of the process (clock ticks)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    # -- admin ------------------------------------------------------------------------

    def admin(self, path: str, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=timeout) as r:
            return r.read().decode()

    def stats(self, prefix: str = STAT_PREFIX) -> dict[str, int]:
        """Integer stats under `prefix` (default: the filter's), prefix removed."""
        return parse_stats(self.admin("/stats?filter=^" + re.escape(prefix)), prefix)

    def counters(self, regex: str) -> dict[str, int]:
        """Integer stats whose full name matches the admin filter `regex`."""
        return parse_stats(self.admin(f"/stats?filter={regex}"))

    def healthy_hosts(self) -> int | None:
        """The filter's `hosts.healthy` gauge (the last VM to write it wins)."""
        try:
            return self.stats().get("hosts.healthy")
        except OSError:
            return None

    def cluster_hosts(self, cluster: str = "chat_nodes") -> list[dict] | None:
        """The host statuses of `cluster` in admin `/clusters?format=json`; None when the
        admin does not answer or has no such cluster."""
        try:
            doc = json.loads(self.admin("/clusters?format=json"))
        except (OSError, ValueError):
            return None
        for c in doc.get("cluster_statuses", []):
            if c.get("name") == cluster:
                return c.get("host_statuses", [])
        return None

    def healthy_addresses(self, cluster: str = "chat_nodes") -> set[str] | None:
        """Addresses of the hosts of `cluster` that Envoy counts healthy, by the filter's
        rule (DESIGN section 6)."""
        hosts = self.cluster_hosts(cluster)
        if hosts is None:
            return None
        return {host_address(h) for h in hosts if host_is_healthy(h)}

    def wait_stats(self, want: dict[str, int], timeout: float = 15.0) -> dict[str, int]:
        """Waits until every filter stat in `want` has its value (counters are flushed on
        a short timer), then returns all of them. Fails with the difference."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.stats()
            if all(got.get(k, 0) == v for k, v in want.items()):
                return got
            if time.monotonic() > deadline:
                diff = {k: (got.get(k, 0), v) for k, v in want.items() if got.get(k, 0) != v}
                raise HarnessError(f"stats did not reach the expected values within {timeout}s (got, want): {diff}")
            time.sleep(0.05)

    def wait_healthy_hosts(self, n: int, timeout: float = 30.0) -> None:
        wait_for(lambda: self.healthy_hosts() == n, timeout,
                 f"hosts.healthy to reach {n} (now {self.healthy_hosts()})")

    # -- the filter's log lines -------------------------------------------------------
    # The filter logs from every VM (one per worker, plus the main thread's); Envoy's log
    # lines carry the thread id, so a test can wait until EVERY VM has seen a change.
    # The `hosts.healthy` gauge cannot tell: each VM sets it, last writer wins.

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
        return [(m.group(1), m.group(2)) for m in map(_WASM_LOG.match, text.splitlines()) if m]

    def vm_threads(self) -> set[str]:
        """Threads whose filter VM was configured (each of them polls discovery)."""
        return {t for t, msg in self.wasm_log() if msg == "session-affinity: configured"}

    @property
    def vm_count(self) -> int:
        """Filter VMs of this Envoy: one per worker, plus one on the main thread."""
        return self.concurrency + 1

    def wait_vms(self, what: str, matches: Callable[[str], bool], since: int, count: int = 1,
                 timeout: float = 30.0, vms: int | None = None) -> None:
        """Waits until every VM thread has logged `count` messages for which
        `matches(message)` is true after `since`, and at least `vms` (default: all of
        them, `vm_count`) VMs were configured. Fails saying which VMs lag."""
        vms = self.vm_count if vms is None else vms
        deadline = time.monotonic() + timeout
        while True:
            threads = self.vm_threads()
            seen = {t: 0 for t in threads}
            for t, msg in self.wasm_log(since):
                if t in seen and matches(msg):
                    seen[t] += 1
            if len(threads) >= vms and all(n >= count for n in seen.values()):
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"not every filter VM logged {what} (x{count}) within {timeout}s: {seen} "
                                   f"(want {vms} VMs)\n{self.log_tail(15)}")
            time.sleep(0.05)

    def wait_host_set(self, n: int, since: int = 0, timeout: float = 30.0) -> None:
        """Waits until every filter VM has installed a host set of `n` hosts after `since`
        (and the gauge shows it)."""
        want = f"session-affinity: {n} healthy hosts in cluster "
        self.wait_vms(f"{n} healthy hosts", lambda m: m.startswith(want), since, timeout=timeout)
        self.wait_healthy_hosts(n, timeout=timeout)

    def vm_host_counts(self) -> dict[str, int | None]:
        """{VM thread: size of the host set it logged last (None: none yet)} for every
        configured filter VM. The filter logs every change of a VM's set, so the last
        line is the set the VM routes over now."""
        counts: dict[str, int | None] = {t: None for t in self.vm_threads()}
        for t, msg in self.wasm_log():
            m = _HOST_SET.match(msg)
            if m and t in counts:
                counts[t] = int(m.group(1))
        return counts

    def wait_vm_hosts(self, n: int, timeout: float = 30.0, vms: int | None = None) -> None:
        """Waits until every filter VM (at least `vms`, default all: `vm_count`) routes
        over `n` hosts."""
        vms = self.vm_count if vms is None else vms

        def done() -> bool:
            self.check_alive("waiting for the filter's host sets")
            counts = self.vm_host_counts()
            return len(counts) >= vms and all(c == n for c in counts.values())

        try:
            wait_for(done, timeout, f"every filter VM to route over {n} hosts")
        except HarnessError as e:
            raise HarnessError(f"{e}: {self.vm_host_counts()}\n{self.log_tail(15)}") from None

    def request(self, method: str = "GET", path: str = "/", headers: dict | list | None = None,
                body: bytes | None = None):
        from .client import request

        return request(self.port, method, path, headers, body)


_HOST_SET = re.compile(r"^session-affinity: (\d+) healthy hosts in cluster ")
_WASM_LOG = re.compile(r"^\[[^\]]*\]\[(\d+)\]\[\w+\]\[wasm\] .*? wasm log [^:]*: (.*)$")


# --------------------------------------------------------------------------------------
# What a failed filter VM looks like in Envoy's log.

# What Envoy 1.40 (V8) writes when the filter's VM fails, as seen in test_failure_policy.py
# (which checks that a real trap does print them, so their absence elsewhere means
# something): the SDK's panic hook logs the Rust panic at critical level
#   [critical][wasm] ... wasm log session_affinity session_affinity: panicked at src/...
# and V8 reports the trap
#   [error][wasm] ... Function: proxy_on_request_headers failed: Uncaught RuntimeError: unreachable
# The other patterns cover other ways a VM can fail (start-up, other traps). Not a bare
# "unreachable": the filter's own discovery warning says "unreachable or timed out".
WASM_FAILURE_PATTERNS = re.compile(
    r"panicked at|Uncaught RuntimeError|Function: proxy_on_\w+ failed|wasm trap|Wasm VM failed|VM (?:has )?failed|"
    r"Plugin configured to fail closed|Plugin configured to fail|failed to (?:start|initialize|load) (?:the )?(?:wasm|VM)",
    re.IGNORECASE,
)


def wasm_failures(log_text: str, any_wasm_error: bool = False) -> list[str]:
    """Lines of an Envoy log that show a filter VM failure (panic, trap, VM failed);
    with `any_wasm_error`, also every error or critical line of Envoy's wasm logger."""
    hits = []
    for line in log_text.splitlines():
        wasm_error = any_wasm_error and "][wasm]" in line and ("][error]" in line or "][critical]" in line)
        if wasm_error or WASM_FAILURE_PATTERNS.search(line):
            hits.append(line[:300])
    return hits


# --------------------------------------------------------------------------------------
# Configurations: the reference envoy/envoy.yaml, moved and edited.


def reference_config() -> dict:
    return yaml.safe_load(REFERENCE_YAML.read_text())


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def dump_yaml(doc: dict, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(doc, sort_keys=False))


def http_filters(cfg: dict) -> Iterable[dict]:
    for l in cfg["static_resources"]["listeners"]:
        for fc in l["filter_chains"]:
            for f in fc["filters"]:
                yield from f.get("typed_config", {}).get("http_filters", [])


def wasm_filter(cfg: dict) -> dict:
    """The session-affinity http filter entry of the (first) listener that has one."""
    for hf in http_filters(cfg):
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
    wasm: Path | None = None,
) -> dict:
    """The reference envoy/envoy.yaml, moved onto other ports.

    `hosts` become the chat_nodes endpoints (STATIC) or, with `eds_path`, the cluster reads
    a file-based EDS the caller rewrites at run time (`write_eds`). `plugin` replaces the
    filter JSON; `plugin_update` merges top-level keys into the reference filter JSON.
    Without `redis_listen`, the redis listener and cluster are dropped. `wasm` defaults to
    the built filter.
    """
    cfg = reference_config()
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin
    sr = cfg["static_resources"]
    chat_listener = next(l for l in sr["listeners"] if l["name"] == "chat")
    chat_listener["address"]["socket_address"]["port_value"] = listen
    vm = wasm_filter(cfg)["typed_config"]["config"]["vm_config"]
    vm["code"]["local"]["filename"] = str(wasm or require_wasm())
    cluster(cfg, "envoy_admin")["load_assignment"]["endpoints"] = [{"lb_endpoints": endpoints([("127.0.0.1", admin, 1)])}]
    chat = cluster(cfg, "chat_nodes")
    if eds_path is not None:
        chat["type"] = "EDS"
        del chat["load_assignment"]
        # Envoy refuses a path_config_source for EDS without a node identity.
        cfg.setdefault("node", {"id": f"session-affinity-test-{listen}", "cluster": "session-affinity-test"})
        chat["eds_cluster_config"] = {"eds_config": {"path_config_source": {"path": str(eds_path)},
                                                     "resource_api_version": "V3"}}
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
            seeds = endpoints([("127.0.0.1", p, 1) for p in redis_seeds])
            for e in seeds:
                e.pop("load_balancing_weight", None)
            cluster(cfg, "redis_cluster")["load_assignment"]["endpoints"] = [{"lb_endpoints": seeds}]
    return cfg


def without_placement(cfg: dict) -> dict:
    """Takes `placement` out of the filter configuration of `cfg` (in place; returns it):
    the filter then places every session by its ranking alone (DESIGN sections 2-5), so a
    test can assert exact rendezvous placement whatever the loads."""
    plugin = filter_json(cfg)
    plugin.pop("placement", None)
    set_filter_json(cfg, plugin)
    return cfg


def write_eds(path: Path, hosts: list[tuple[str, int, int]], cluster_name: str = "chat_nodes",
              health: dict[str, str] | None = None) -> None:
    """Atomically rewrites a file-based EDS resource (Envoy watches the path with inotify
    on moves, so write a temp file and rename it over). `health` maps `ip:port` to an
    `health_status` (e.g. `DRAINING`) for the hosts that have one."""
    eps = endpoints(hosts)
    for e, (ip, port, _) in zip(eps, hosts):
        status = (health or {}).get(join_address(ip, port))
        if status:
            e["health_status"] = status
    doc = {
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                "cluster_name": cluster_name,
                "endpoints": [{"lb_endpoints": eps}] if hosts else [],
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
            "sources": [{"header": "x-session-token"}, {"cookie": "session_token"},
                        {"header": "authorization", "prefix": "Bearer "}],
            "keys": [{"kid": "k1", "alg": "HS256", "secret_base64": TOKEN_KEY_B64}],
            "leeway_seconds": 30,
        },
        "on_missing": "mint",
        "on_invalid": "reject",
        "upstream": {"fallbacks": 2,
                     "hosts": [{"address": join_address(ip, port), "weight": w} for ip, port, w in hosts]},
        "metrics": {"flush_ms": 50},
    }
    plugin.update(overrides)
    return plugin


def absolute_wasm_paths(cfg: dict) -> dict:
    """Makes the .wasm paths of `cfg` absolute (the reference config names them relative
    to the repository root)."""
    for hf in http_filters(cfg):
        code = hf.get("typed_config", {}).get("config", {}).get("vm_config", {}).get("code", {})
        if "local" in code and not Path(code["local"]["filename"]).is_absolute():
            code["local"]["filename"] = str(ROOT / code["local"]["filename"])
    return cfg


def add_access_log(cfg: dict, path: Path, fmt: str, listener: str = "chat") -> dict:
    """Adds a file access log with the text format `fmt` (e.g. `"%RESPONSE_CODE%
    %RESPONSE_CODE_DETAILS%\\n"`) to the HTTP connection manager of `listener`."""
    for l in cfg["static_resources"].get("listeners", []):
        if l.get("name") != listener:
            continue
        for fc in l["filter_chains"]:
            for f in fc["filters"]:
                if f["name"] == "envoy.filters.network.http_connection_manager":
                    f["typed_config"]["access_log"] = [{
                        "name": "envoy.access_loggers.file",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                            "path": str(path),
                            "log_format": {"text_format_source": {"inline_string": fmt}},
                        },
                    }]
    return cfg


def access_log_lines(path: Path, n: int, timeout: float = 15.0) -> list[str]:
    """The lines of a file access log once it has at least `n` (Envoy flushes it on a
    timer); fails after `timeout`."""
    got: list[str] = []

    def enough() -> bool:
        nonlocal got
        got = path.read_text().splitlines() if path.exists() else []
        return len(got) >= n

    try:
        wait_for(enough, timeout, f"{n} lines in {path}")
    except HarnessError as e:
        raise HarnessError(f"{e}: {len(got)} lines") from None
    return got
