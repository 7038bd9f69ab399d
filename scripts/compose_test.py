#!/usr/bin/env python3
"""make compose-test: the docker-compose harness (envoy/docker-compose.yml, exactly as
shipped) run for real, with faults.

1. A Docker engine: the one that answers, or `dockerd --iptables=false` started here
   (and stopped at the end, by its pid; nothing else is stopped).
2. Images: scripts/compose-images.sh (present, pulled, or local stand-ins), then the
   chat node's image from chat-node/Dockerfile, tagged as the compose file names it.
3. Under `flock /tmp/sa-fixed-ports.lock` (the compose file publishes the fixed ports
   127.0.0.1:10000 and :9901, which `make run` uses too): `docker-compose up -d`, then
   conversations through 127.0.0.1:10000 while a chat-node container and then a Redis
   master container are killed with `docker kill`. Every reply's `turn` and
   `history_digest` is checked: 0 lost turns; every conversation on the killed node
   answers its next turn from the store (`context: "store"`) on another node, the
   others stay in memory where they were; the Redis master's replica takes over.
4. `docker-compose down -v`, then: no container, network or volume of the project is
   left and nothing listens on 10000 or 9901.

Exit 0 when all holds, 1 otherwise (the reason, and the services' logs in
.run/compose-test/, are printed). Not collected by `make test` (pytest tests/e2e).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "envoy" / "docker-compose.yml"
RUN_DIR = ROOT / ".run" / "compose-test"
LOCK = "/tmp/sa-fixed-ports.lock"
LISTEN, ADMIN = 10000, 9901

# The native harness's client (cookie jar, retries of unacknowledged turns with the same
# `turn`, its own digest), from the harness package.
import sa_harness as orchestration  # noqa: E402
from sa_harness import Conversation, HarnessError, run_turns, wait_for  # noqa: E402,F401


class Failed(Exception):
    pass


def say(msg: str) -> None:
    print(f"compose-test: {msg}", flush=True)


def run(cmd: list[str], timeout: float = 600, check: bool = True, quiet: bool = False) -> str:
    """Runs a command; its output (stdout and stderr together) is returned, and printed
    when it fails."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and p.returncode != 0:
        if not quiet:
            print(p.stdout, end="", file=sys.stderr)
        raise Failed(f"`{' '.join(cmd)}` exited {p.returncode}")
    return p.stdout


# --------------------------------------------------------------------------------------
# The engine.


def engine_answers() -> bool:
    return subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          timeout=60).returncode == 0


def start_engine() -> subprocess.Popen | None:
    """None when an engine answers already; else a dockerd started here."""
    if engine_answers():
        say("Docker engine: the one running")
        return None
    dockerd = shutil.which("dockerd")
    if not dockerd:
        raise Failed("no Docker engine answers and there is no dockerd: install Debian's docker.io "
                     "(`make compose-test` does) or start Docker")
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    log = open(RUN_DIR / "dockerd.log", "w")
    # No iptables: containers need no route out; published ports go through the
    # userland proxy (DESIGN section 9).
    proc = subprocess.Popen([dockerd, "--iptables=false"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    say(f"Docker engine: started dockerd --iptables=false (pid {proc.pid}, log {RUN_DIR / 'dockerd.log'})")

    def up() -> bool:
        if proc.poll() is not None:
            raise Failed(f"dockerd exited {proc.returncode}: see {RUN_DIR / 'dockerd.log'}")
        return engine_answers()

    wait_for(up, 120, "dockerd to answer", interval=0.5)
    return proc


def stop_engine(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    say(f"Docker engine: stopped the dockerd started here (pid {proc.pid})")


# --------------------------------------------------------------------------------------
# The project.


class Project:
    def __init__(self, name: str, compose: list[str]):
        self.name = name
        self.base = [*compose, "-p", name, "-f", str(COMPOSE_FILE)]
        self.doc = yaml.safe_load(COMPOSE_FILE.read_text())

    def compose(self, *args: str, timeout: float = 600) -> str:
        return run([*self.base, *args], timeout=timeout)

    def container(self, service: str) -> str:
        cid = self.compose("ps", "-q", service).strip()
        if not cid:
            raise Failed(f"no container for service {service}")
        return cid

    def exec(self, service_or_cid: str, *cmd: str) -> str:
        cid = service_or_cid if service_or_cid not in self.doc["services"] else self.container(service_or_cid)
        return run(["docker", "exec", cid, *cmd], timeout=60)

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.name}"
        out = {
            "containers": run(["docker", "ps", "-a", "-q", "--filter", label]).split(),
            "networks": run(["docker", "network", "ls", "-q", "--filter", label]).split(),
            "volumes": run(["docker", "volume", "ls", "-q", "--filter", label]).split(),
        }
        # And by name, in case a Compose version does not label something (v1 joins
        # the project name with "_", v2 with "-").
        prefixes = (f"{self.name}_", f"{self.name}-")
        out["containers"] += [n for n in run(["docker", "ps", "-a", "--format", "{{.Names}}"]).split()
                              if n.startswith(prefixes)]
        out["networks"] += [n for n in run(["docker", "network", "ls", "--format", "{{.Name}}"]).split()
                            if n.startswith(prefixes)]
        out["volumes"] += [n for n in run(["docker", "volume", "ls", "--format", "{{.Name}}"]).split()
                           if n.startswith(prefixes)]
        return {k: sorted(set(v)) for k, v in out.items() if v}

    def save_logs(self) -> Path:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        path = RUN_DIR / "services.log"
        p = subprocess.run([*self.base, "logs", "--no-color", "--timestamps"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=120)
        path.write_text(p.stdout)
        return path


def build_chat_node_image(project: Project) -> str:
    """The image the compose file names for the chat nodes, built from its `build`
    section.

    `--network host`: cargo fetches crates inside the build, and on a machine without NAT
    for containers only the host's network reaches the registry. The Dockerfile's build
    stage is tagged too (`<repo>:build-cache`), so that pruning what earlier builds left
    (only images labelled org.session-affinity.image=chat-node that no tag holds) keeps
    the cached dependencies of the current Cargo.lock."""
    svc = project.doc["services"]["chat-node-1"]
    context = (COMPOSE_FILE.parent / svc["build"]["context"]).resolve()
    dockerfile = context / svc["build"]["dockerfile"]
    image = svc["image"]
    cache = image.rsplit(":", 1)[0] + ":build-cache"
    t0 = time.monotonic()
    common = ["docker", "build", "--network", "host", "-q", "-f", str(dockerfile)]
    run([*common, "--target", "build", "-t", cache, str(context)], timeout=3600)
    run([*common, "-t", image, str(context)], timeout=3600)
    run(["docker", "image", "prune", "-f", "--filter", "label=org.session-affinity.image=chat-node"], timeout=600)
    say(f"image {image}: built from {dockerfile.relative_to(ROOT)} in {time.monotonic() - t0:.0f} s")
    return image


# --------------------------------------------------------------------------------------
# Envoy, through the published admin port.


def admin(path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}{path}", timeout=5) as r:
        return r.read()


def admin_or_none(path: str) -> bytes | None:
    try:
        return admin(path)
    except OSError:
        return None


def envoy_healthy(cluster: str) -> list[str]:
    body = admin_or_none("/clusters?format=json")
    if body is None:
        return []
    bad = ("failed_active_health_check", "failed_outlier_check", "pending_dynamic_removal",
           "excluded_via_immediate_hc_fail")
    for c in json.loads(body).get("cluster_statuses", []):
        if c.get("name") == cluster:
            return [f"{h['address']['socket_address']['address']}:{h['address']['socket_address']['port_value']}"
                    for h in c.get("host_statuses", [])
                    if h.get("health_status", {}).get("eds_health_status", "HEALTHY") in ("HEALTHY", "DEGRADED")
                    and not any(h.get("health_status", {}).get(f) for f in bad)]
    return []


def chat_node_hosts() -> dict[str, str]:
    """{hostname (the service name): ip:port} of the chat_nodes cluster, healthy or not:
    a STRICT_DNS cluster lists each host by its resolved address."""
    doc = json.loads(admin("/clusters?format=json"))
    for c in doc.get("cluster_statuses", []):
        if c.get("name") == "chat_nodes":
            return {h.get("hostname", ""): f"{h['address']['socket_address']['address']}:"
                                           f"{h['address']['socket_address']['port_value']}"
                    for h in c.get("host_statuses", [])}
    return {}


def stat(name: str) -> int | None:
    body = admin_or_none(f"/stats?filter=^{name}$")
    if not body:
        return None
    for line in body.decode().splitlines():
        k, _, v = line.partition(": ")
        if k == name:
            return int(v)
    return None


def prometheus() -> dict[str, float]:
    out = {}
    for line in admin("/stats/prometheus").decode().splitlines():
        if line.startswith("session_affinity_"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def wait_filter_routes_over(n: int, timeout: float = 120) -> None:
    """Envoy counts `n` healthy chat nodes, the filter's gauge says `n`, then one more
    discovery period so that every worker's VM has polled (docs/harness.md, Readiness)."""
    wait_for(lambda: len(envoy_healthy("chat_nodes")) == n, timeout,
             f"Envoy to count {n} healthy chat nodes (admin /clusters)", interval=0.2)
    settled = time.monotonic() + 1.1  # refresh_ms 500 + timeout_ms 250 + flush 250, + margin
    wait_for(lambda: stat("wasmcustom.session_affinity.hosts.healthy") == n, timeout,
             f"the filter to see {n} healthy hosts", interval=0.2)
    time.sleep(max(0.0, settled - time.monotonic()))


# --------------------------------------------------------------------------------------
# Redis, inside the containers.


def container_ip(cid: str) -> str:
    return run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", cid]).strip()


def redis_role(project: Project, cid: str) -> list[str]:
    return project.exec(cid, "redis-cli", "role").split()


# --------------------------------------------------------------------------------------
# The test.


def message(c: Conversation, n: int) -> str:
    # Every third message is the same word: a duplicated or lost turn cannot hide behind
    # distinct texts (the digest covers the order and the count).
    return "yes" if n % 3 == 0 else f"{c.name} says {n}"


def check_turns(convs: list[Conversation], expect: int) -> list[str]:
    problems = []
    for c in convs:
        problems += c.check()
        if len(c.turns) != expect:
            problems.append(f"{c.name}: {len(c.turns)} acknowledged turns, expected {expect}")
    return problems


def scenario(project: Project, conversations: int) -> dict:
    figures: dict = {}
    t0 = time.monotonic()
    wait_for(lambda: admin_or_none("/ready") == b"LIVE\n", 120, "Envoy admin /ready on 127.0.0.1:9901",
             interval=0.2)
    wait_filter_routes_over(3)
    hosts = chat_node_hosts()
    say(f"up: Envoy routes over {sorted(hosts.items())} ({time.monotonic() - t0:.1f} s after `up -d`)")
    if sorted(hosts) != ["chat-node-1", "chat-node-2", "chat-node-3"]:
        raise Failed(f"chat_nodes hosts are not the three services by DNS name: {hosts}")

    convs = [Conversation(port=LISTEN, name=f"c{i:02d}") for i in range(conversations)]

    # 1. Sticky conversations.
    run_turns(convs, message, 3)
    problems = check_turns(convs, 3)
    for c in convs:
        if [t.context for t in c.turns] != ["new", "memory", "memory"] or len({t.node for t in c.turns}) != 1:
            problems.append(f"{c.name}: not sticky: {[(t.node, t.context) for t in c.turns]}")
    if problems:
        raise Failed("before any fault: " + "; ".join(problems))
    say(f"{conversations} conversations x 3 turns: sticky, from memory after turn 1")

    # 2. Kill the chat node that holds the most conversations; go on at once.
    by_node: dict[str, list[Conversation]] = {}
    for c in convs:
        by_node.setdefault(c.turns[-1].node, []).append(c)
    victim = max(sorted(by_node), key=lambda n: len(by_node[n]))
    service = f"chat-node-{victim.removeprefix('node-')}"
    run(["docker", "kill", project.container(service)])
    say(f"docker kill {service} ({victim}, holding {len(by_node[victim])} conversations)")
    before = {c.name: c.turns[-1].node for c in convs}
    run_turns(convs, message, 2)
    problems = check_turns(convs, 5)
    moved = [c for c in convs if before[c.name] == victim]
    for c in convs:
        t4, t5 = c.turns[3], c.turns[4]
        if c in moved:
            if t4.node == victim or t4.context != "store":
                problems.append(f"{c.name} (was on {victim}): turn 4 on {t4.node} from {t4.context}, "
                                f"expected another node restoring it from the store")
            if t5.node != t4.node or t5.context != "memory":
                problems.append(f"{c.name}: turn 5 on {t5.node} from {t5.context}, expected {t4.node} from memory")
        elif (t4.node, t4.context, t5.node, t5.context) != (before[c.name], "memory", before[c.name], "memory"):
            problems.append(f"{c.name} (on {before[c.name]}): turns 4-5 {[(t4.node, t4.context), (t5.node, t5.context)]}, "
                            f"expected to stay in memory")
    if problems:
        raise Failed(f"after killing {service}: " + "; ".join(problems))
    figures["chat_node_killed"] = service
    figures["conversations_moved"] = len(moved)
    say(f"{len(moved)} conversations moved off {victim}, each restored from the store on its next turn; "
        f"the others stayed in memory")
    wait_filter_routes_over(2)

    # 3. Kill the Redis master that holds the most keys; go on at once.
    masters = {}
    for i in range(1, 7):
        cid = project.container(f"redis-{i}")
        if redis_role(project, cid)[0] == "master":
            masters[f"redis-{i}"] = (cid, int(project.exec(cid, "redis-cli", "dbsize").strip()))
    if len(masters) != 3:
        raise Failed(f"expected 3 Redis masters, found {sorted(masters)}")
    master = max(sorted(masters), key=lambda s: masters[s][1])
    mcid, keys = masters[master]
    role = redis_role(project, mcid)  # master <offset> <replica ip> <port> <offset> ...
    replica_ip = role[2] if len(role) >= 5 else None
    replica = next((f"redis-{i}" for i in range(1, 7)
                    if container_ip(project.container(f"redis-{i}")) == replica_ip), None)
    if replica is None:
        raise Failed(f"{master} has no replica in sync: role {role}")
    run(["docker", "kill", mcid])
    killed_at = time.monotonic()
    say(f"docker kill {master} (master of {keys} keys; its replica is {replica})")
    promoted: dict[str, float] = {}

    def watch_promotion() -> None:
        rcid = project.container(replica)

        def is_master() -> bool:
            try:
                return redis_role(project, rcid)[0] == "master"
            except Failed:
                return False

        wait_for(is_master, 120, f"{replica} to take over as master", interval=0.2)
        promoted["s"] = time.monotonic() - killed_at

    with ThreadPoolExecutor(1) as pool:
        watcher = pool.submit(watch_promotion)
        run_turns(convs, message, 3)
        watcher.result()
    problems = check_turns(convs, 8)
    if problems:
        raise Failed(f"after killing {master}: " + "; ".join(problems))
    survivor = next(s for s in masters if s != master)
    info = project.exec(survivor, "redis-cli", "cluster", "info")
    if "cluster_state:ok" not in info:
        raise Failed(f"cluster not ok after the failover: {info}")
    figures["redis_master_killed"] = master
    figures["replica_promoted_after_s"] = round(promoted["s"], 1)
    say(f"{replica} took over {promoted['s']:.1f} s after the kill; 3 more turns each, none lost")

    # 4. The figures, as Prometheus sees them.
    prom = prometheus()
    outcomes = {k: v for k, v in prom.items() if k.startswith("session_affinity_outcome{")}
    requests = prom.get("session_affinity_requests{}", 0)
    attempts = sum(len(c.turns) + len(c.errors) for c in convs)
    moves_seen = prom.get('session_affinity_outcome{outcome="moved"}', 0) + prom.get("session_affinity_served_fallback{}", 0)
    if requests != sum(outcomes.values()) or requests != attempts:
        # The filter flushes its counters on a tick: wait for one.
        time.sleep(1.0)
        prom = prometheus()
        outcomes = {k: v for k, v in prom.items() if k.startswith("session_affinity_outcome{")}
        requests = prom.get("session_affinity_requests{}", 0)
        moves_seen = prom.get('session_affinity_outcome{outcome="moved"}', 0) + prom.get("session_affinity_served_fallback{}", 0)
    if requests != attempts or requests != sum(outcomes.values()):
        raise Failed(f"/stats/prometheus: session_affinity_requests {requests}, outcomes {outcomes}, "
                     f"client attempts {attempts}")
    if moves_seen < len(moved):
        raise Failed(f"/stats/prometheus counts {moves_seen} moves (outcome moved + served_fallback), "
                     f"{len(moved)} conversations moved")
    figures.update(
        conversations=len(convs),
        turns_acknowledged=sum(len(c.turns) for c in convs),
        lost_turns=0,
        client_retries=sum(len(c.errors) for c in convs),
        # What the retried attempts were answered (e.g. a 503 from a reset connection).
        client_errors=sorted({e[:120] for c in convs for e in c.errors})[:5],
        filter_requests=int(requests),
        outcomes={k.split('"')[1]: int(v) for k, v in outcomes.items() if v},
        served_fallback=int(prom.get("session_affinity_served_fallback{}", 0)),
    )
    return figures


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default="sa-compose-test", help="Compose project name (default %(default)s)")
    ap.add_argument("--conversations", type=int, default=24)
    ap.add_argument("--compose", default="docker-compose",
                    help="the Compose command: docker-compose (v1.29, the default) or 'docker compose' (v2)")
    ap.add_argument("--images-only", action="store_true",
                    help="only make the images (make compose-images), starting an engine if needed")
    args = ap.parse_args(argv)
    compose = args.compose.split()
    for tool in ("docker", compose[0]):
        if not shutil.which(tool):
            print(f"compose-test: no `{tool}`: install Debian's docker.io and docker-compose "
                  "(`make compose-test` does)", file=sys.stderr)
            return 2

    # SIGTERM (a CI timeout, kill) cleans up as Ctrl-C does: down -v, stop our dockerd.
    signal.signal(signal.SIGTERM, _interrupt)
    start = time.monotonic()
    engine = None
    project = Project(args.project, compose)
    status = 1
    try:
        engine = start_engine()
        t = time.monotonic()
        run([str(ROOT / "scripts" / "compose-images.sh")], timeout=3600)
        say(f"registry images ready in {time.monotonic() - t:.0f} s")
        build_chat_node_image(project)
        status = 0 if args.images_only else run_locked(project, args)
    except (Failed, HarnessError, subprocess.TimeoutExpired) as e:
        print(f"compose-test: FAILED: {e}", file=sys.stderr)
    except KeyboardInterrupt as e:
        print(f"compose-test: interrupted ({e or 'SIGINT'}), cleaned up", file=sys.stderr)
        status = 130
    finally:
        stop_engine(engine)
    what = "images ready" if args.images_only else "passed"
    say(f"{what if status == 0 else 'FAILED'} in {time.monotonic() - start:.0f} s")
    return status


def run_locked(project: Project, args: argparse.Namespace) -> int:
    with open(LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for {LOCK} (another harness uses the fixed ports)")
            fcntl.flock(lock, fcntl.LOCK_EX)
        busy = [p for p in (LISTEN, ADMIN) if orchestration.port_open(p)]
        if busy:
            raise Failed(f"127.0.0.1:{busy} already in use (`ss -ltnp` shows by whom)")
        if project.leftovers():
            say(f"removing what an earlier run of project {project.name} left")
            project.compose("down", "-v", "--remove-orphans")
        up = time.monotonic()
        status = 1
        try:
            project.compose("up", "-d")
            figures = scenario(project, args.conversations)
            status = 0
        except (Failed, HarnessError) as e:
            print(f"compose-test: FAILED: {e}", file=sys.stderr)
            print(f"compose-test: services' logs in {project.save_logs()}", file=sys.stderr)
        finally:
            t = time.monotonic()
            project.compose("down", "-v", "--timeout", "10")
            say(f"down -v in {time.monotonic() - t:.1f} s")
        left = project.leftovers()
        listening = [p for p in (LISTEN, ADMIN) if orchestration.port_open(p)]
        if left or listening:
            print(f"compose-test: FAILED: after down -v: left {left}, still listening {listening}", file=sys.stderr)
            return 1
        say("down -v left no container, network or volume, and nothing listens on 10000 or 9901")
        if status == 0:
            figures["up_to_down_s"] = round(time.monotonic() - up, 1)
            say("figures: " + json.dumps(figures))
        return status


if __name__ == "__main__":
    sys.exit(main())
