#!/usr/bin/env python3
"""`make soak`: steady conversation load through the whole harness while faults are
injected on a schedule; exits 1 if any turn was lost or the filter's VM failed.

    .venv/bin/python scripts/soak.py                 # 5 min of load, about 5 min 10 s in all
    .venv/bin/python scripts/soak.py --minutes 2     # shorter
    .venv/bin/python scripts/soak.py --help

The harness is the one `make run` starts (sa_harness.Stack: Redis Cluster 3 masters +
3 replicas, Envoy 1.40 with the reference envoy/envoy.yaml and the filter, chat nodes),
with two differences, both forced by the faults:

- Envoy's `chat_nodes` cluster reads a file-based EDS (`.run/soak/eds.json`) instead of
  the reference STATIC endpoints, so a 4th node can be added and removed while Envoy
  runs: the soak rewrites the file (temp file + rename; Envoy watches the path). Every
  other line of the reference config is kept (`sa_harness.harness_config`).
- Ports are DESIGN section 8's plus an offset (default: the first of 500, 600, ... whose
  every port is free), all below Linux's ephemeral range (32768+). A killed node's or
  Redis master's port stays free until its restart; an ephemeral port could meanwhile be
  taken as the source port of one of the thousands of outgoing connections, and the
  restart would fail. `make run` (offset 0) can run alongside.

Load: `--clients` (12) threads, each keeping `--open` (8) conversations of 3-12 turns
(`--turns`) going at once: it sends a turn of each in turn, `--think-ms` (20) apart, and
replaces a finished conversation with a new one, so about 100 conversations are open at
any moment and every fault catches some mid-way. Each conversation keeps its cookie jar
(session token, affinity ticket); the client computes `history_digest` itself and
checks every reply.

Client retry rule: a turn answered 5xx, or failing with a connection error or a timeout
(`--request-timeout`), is not acknowledged: the client sends the same message again
after 50 ms, 100 ms, ... (doubling, capped at 1 s), up to `--max-attempts` attempts in
all. Each attempt counts as a request, every failed attempt as a client-visible error.
Any other status (4xx) is an error that abandons the conversation. A reply is a LOST
TURN unless its `turn` is exactly the client's acknowledged turns + 1 and its
`history_digest` is the digest of exactly the client's acknowledged messages plus this
one: so a dropped, reordered or duplicated turn is a lost turn, and so is a retried
turn that the node applies a second time (the failed attempt had landed). Each request carries the
optional `"turn"` field (chat-node.md: a retry of an already applied turn is answered
from the store instead of being applied twice).

Faults (times from the start of the load; `--minutes` scales the last two):
- every `--kill-every` s (30): SIGKILL a chat node (node-1, node-2, node-3, node-1, ...)
  and restart it `--down-seconds` (5) later on the same port;
- at 25 % of the run: start node-4 and add it to the EDS; at 65 %: remove it from the EDS
  (Envoy keeps it as `pending_dynamic_removal` while its health checks pass, the filter
  stops routing to it), then SIGTERM it 5 s later;
- at 45 %: SIGKILL the first Redis master; its replica takes over; restart it
  `--redis-down-seconds` (30) later, and it rejoins as a replica.

Result: printed, and written to bench/SOAK.md and bench/soak.json (`--out`). Exit status:
0 pass, 1 fail (lost turns, wasm failures, inconsistent filter stats, abandoned turns, a
fault that could not be injected), 2 could not start (missing prerequisite, ports).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


import sa_harness as orch  # noqa: E402  (the harness package: processes, Envoy, stats)

RUN_DIR = ROOT / ".run" / "soak"
OFFSETS = (500, 600, 700, 800, 900, 100, 200, 300, 400)


# --------------------------------------------------------------------------------------
# Ports.


def offset_ports(o: int) -> tuple[orch.Ports, int]:
    """DESIGN ports + o, and the port of the 4th chat node."""
    d = orch.Ports()
    ports = orch.Ports(d.listen + o, d.admin + o, d.redis_proxy + o, tuple(p + o for p in d.redis),
                       tuple(p + 10000 + o for p in d.redis), tuple(p + o for p in d.nodes))
    return ports, d.nodes[-1] + 1 + o


def pick_ports(offset: int | None) -> tuple[orch.Ports, int, int]:
    for o in ([offset] if offset is not None else OFFSETS):
        ports, extra = offset_ports(o)
        if all(orch.port_bindable(p) for p in [*ports.all(), extra]):
            return ports, extra, o
        if offset is not None:
            busy = [p for p in [*ports.all(), extra] if not orch.port_bindable(p)]
            raise orch.HarnessError(f"port offset {o}: port(s) {busy} on 127.0.0.1 are in use")
    raise orch.HarnessError(f"no port offset among {OFFSETS} has all its ports free")


# --------------------------------------------------------------------------------------
# What the clients saw.


digest = orch.history_digest


@dataclass
class Ledger:
    """Every request and turn of every client; shared, guarded by `lock`."""

    t0: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    request_ms: list = field(default_factory=list)  # every attempt, any outcome
    ok_request_ms: list = field(default_factory=list)  # attempts answered 200
    turn_ms: list = field(default_factory=list)  # first attempt to acknowledged reply
    errors: list = field(default_factory=list)  # (t, kind)
    lost: list = field(default_factory=list)  # dicts
    abandoned: list = field(default_factory=list)  # dicts
    contexts: Counter = field(default_factory=Counter)
    nodes: Counter = field(default_factory=Counter)
    retried_turns: int = 0
    replayed: list = field(default_factory=list)  # retries the node answered as already applied
    moves: int = 0  # consecutive turns of one conversation on different nodes
    move_times: list = field(default_factory=list)  # when each of those happened
    moves_from_store: int = 0  # ... whose first turn on the new node said `store`
    conversations_started: int = 0
    conversations_completed: int = 0
    turns_ok: int = 0

    def now(self) -> float:
        return time.monotonic() - self.t0


def error_kind(status: int, body: bytes, exc: str | None) -> str:
    """A short, aggregatable name for a failed attempt."""
    if status == 0:
        return f"connection: {exc}"
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and "error" in doc:
            return f"{status} {doc['error']}"
    except ValueError:
        pass
    text = body.decode(errors="replace").strip().splitlines()[0] if body.strip() else "(empty body)"
    return f"{status} {text[:120]}"


@dataclass
class ClientConversation:
    name: str
    turns: int  # how many turns this conversation will have
    cookies: dict = field(default_factory=dict)
    said: list = field(default_factory=list)
    last_node: str | None = None


class Client(threading.Thread):
    """One client thread: keeps `--open` conversations going at once and sends a turn of
    each in turn (one turn in flight at a time, so each conversation is sequential), with
    `--think-ms` after each turn; a finished conversation is replaced by a new one."""

    def __init__(self, i: int, port: int, ledger: Ledger, stop: threading.Event, args: argparse.Namespace):
        super().__init__(name=f"client-{i}", daemon=True)
        self.i, self.port, self.ledger, self.stop_event, self.args = i, port, ledger, stop, args
        self.rng = random.Random(args.seed * 1000 + i)
        self.started = 0

    def new_conversation(self) -> ClientConversation:
        self.started += 1
        with self.ledger.lock:
            self.ledger.conversations_started += 1
        return ClientConversation(f"client {self.i} conv {self.started}", self.rng.randint(*self.args.turns))

    def run(self) -> None:
        open_ = [self.new_conversation() for _ in range(self.args.open)]
        while not self.stop_event.is_set():
            for k, c in enumerate(open_):
                if self.stop_event.is_set():
                    return
                if not self.step(c):
                    open_[k] = self.new_conversation()
                time.sleep(self.args.think_ms / 1000.0)

    def step(self, c: ClientConversation) -> bool:
        """One turn of `c`; False when the conversation is over (all its turns done, or it
        cannot go on)."""
        k = len(c.said) + 1
        # Non-ASCII on purpose (the digest is over UTF-8); a repeated message now and
        # then, so a duplicated turn cannot hide behind distinct texts.
        message = "yes" if self.rng.random() < 0.1 else f"{c.name} says #{k}: {self.rng.choice(WORDS)} ☃"
        reply = self.turn(c.name, c.cookies, c.said, message)
        if reply is None:
            return False
        c.said.append(message)
        with self.ledger.lock:
            if c.last_node is not None and reply["node"] != c.last_node:
                self.ledger.moves += 1
                self.ledger.move_times.append(self.ledger.now())
                self.ledger.moves_from_store += reply["context"] == "store"
            if len(c.said) == c.turns:
                self.ledger.conversations_completed += 1
        c.last_node = reply["node"]
        return len(c.said) < c.turns

    def turn(self, name: str, cookies: dict, said: list[str], message: str) -> dict | None:
        """Sends one turn until it is acknowledged (retry rule in the module doc); the
        checked reply, or None when the conversation cannot go on."""
        want_turn, want_digest = len(said) + 1, digest([*said, message])
        body = json.dumps({"message": message, "turn": want_turn}).encode()
        first = time.monotonic()
        failures: list[str] = []
        for attempt in range(1, self.args.max_attempts + 1):
            t = time.monotonic()
            status, data, set_cookies, exc = self.post(body, cookies)
            ms = (time.monotonic() - t) * 1000
            for c in set_cookies:
                k, _, rest = c.partition("=")
                cookies[k.strip()] = rest.split(";", 1)[0]
            with self.ledger.lock:
                self.ledger.request_ms.append(ms)
                if status == 200:
                    self.ledger.ok_request_ms.append(ms)
            if status == 200:
                reply = json.loads(data)
                turn_ms = (time.monotonic() - first) * 1000
                with self.ledger.lock:
                    self.ledger.turn_ms.append(turn_ms)
                    self.ledger.retried_turns += attempt > 1
                    if reply.get("replayed"):
                        self.ledger.replayed.append({
                            "t": round(self.ledger.now(), 1), "conversation": name, "turn": reply.get("turn"),
                            "node": reply.get("node"), "context": reply.get("context"), "attempts": attempt,
                            "earlier_failures": failures})
                    self.ledger.contexts[reply.get("context")] += 1
                    self.ledger.nodes[reply.get("node")] += 1
                    if reply.get("turn") != want_turn or reply.get("history_digest") != want_digest:
                        self.ledger.lost.append({
                            "t": round(self.ledger.now(), 1), "conversation": name, "expected_turn": want_turn,
                            "got_turn": reply.get("turn"), "digest_matches": reply.get("history_digest") == want_digest,
                            "node": reply.get("node"), "context": reply.get("context"), "attempts": attempt,
                            "earlier_failures": failures,
                        })
                        return None
                    self.ledger.turns_ok += 1
                return reply
            kind = error_kind(status, data, exc)
            failures.append(kind)
            with self.ledger.lock:
                self.ledger.errors.append((self.ledger.now(), kind))
            if status != 0 and status < 500:
                break
            time.sleep(min(1.0, 0.05 * 2 ** (attempt - 1)))
        with self.ledger.lock:
            self.ledger.abandoned.append({"t": round(self.ledger.now(), 1), "conversation": name, "turn": want_turn,
                                          "attempts": len(failures), "failures": failures[-5:]})
        return None

    def post(self, body: bytes, cookies: dict) -> tuple[int, bytes, list[str], str | None]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.args.request_timeout)
        try:
            headers = {"content-type": "application/json"}
            if cookies:
                headers["cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
            conn.request("POST", "/v1/chat", body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            return r.status, data, [v for k, v in r.getheaders() if k.lower() == "set-cookie"], None
        except (OSError, http.client.HTTPException) as e:
            return 0, b"", [], type(e).__name__
        finally:
            conn.close()


WORDS = ["the weather", "a recipe for bread", "Rust lifetimes", "a trip to Lisbon", "jazz", "chess openings",
         "héllo wörld", "Redis Cluster", "tail latency", "naïve café"]


# --------------------------------------------------------------------------------------
# Watching the system: Envoy's view of the chat nodes, the filter's gauge, Redis roles.


def envoy_healthy(envoy: orch.Envoy) -> list[int] | None:
    """Ports of the chat nodes Envoy counts healthy (the filter's criteria)."""
    healthy = envoy.healthy_addresses("chat_nodes")
    return None if healthy is None else sorted(int(a.rsplit(":", 1)[1]) for a in healthy)


def redis_roles(cluster: orch.RedisCluster) -> dict[int, str]:
    out = {}
    for n in cluster.nodes:
        if not n.alive():
            out[n.port] = "down"
            continue
        try:
            r = n.info("replication")
        except (orch.HarnessError, OSError):
            out[n.port] = "no answer"
            continue
        role = r.get("role", "?")
        if role == "slave":
            role = f"replica of {r.get('master_port')} (link {r.get('master_link_status')})"
        out[n.port] = role
    return out


class Monitor:
    """Samples the system from the main thread and records every change."""

    def __init__(self, stack: orch.Stack, ledger: Ledger, names: dict[int, str]):
        self.stack, self.ledger, self.names = stack, ledger, names
        self.last: dict[str, object] = {}
        self.changes: list[dict] = []
        self.next_redis = 0.0

    def sample(self) -> None:
        envoy = self.stack.envoy
        healthy = envoy_healthy(envoy)
        if healthy is not None:
            self._note("envoy healthy chat nodes", [self.names.get(p, p) for p in healthy])
        try:
            self._note("filter hosts.healthy gauge", envoy.stats().get("hosts.healthy"))
        except OSError:
            pass
        if time.monotonic() >= self.next_redis:
            self.next_redis = time.monotonic() + 1.0
            for port, role in redis_roles(self.stack.redis).items():
                self._note(f"redis {port}", role)

    def _note(self, what: str, value) -> None:
        if self.last.get(what, object()) != value:
            first = what not in self.last
            self.last[what] = value
            self.changes.append({"t": round(self.ledger.now(), 1), "what": what, "value": value, "initial": first})


# --------------------------------------------------------------------------------------
# The faults.


@dataclass
class Event:
    at: float
    action: str
    target: str
    done_at: float | None = None
    detail: str = ""
    ok: bool = True


def fault_schedule(args: argparse.Namespace) -> list[Event]:
    duration = args.minutes * 60
    events = []
    t, i = args.kill_every, 0
    while t + args.down_seconds <= duration - 5:
        name = f"node-{i % 3 + 1}"
        events += [Event(t, "SIGKILL chat node", name), Event(t + args.down_seconds, "restart chat node", name)]
        t += args.kill_every
        i += 1
    add, remove = 0.25 * duration, 0.65 * duration
    events += [Event(add, "add chat node (start, add to EDS)", "node-4"),
               Event(remove, "remove chat node from EDS", "node-4"),
               Event(remove + 5, "SIGTERM removed chat node", "node-4")]
    redis_at = 0.45 * duration
    # A short run restarts the old master earlier, so that it rejoins before the end.
    redis_back = min(redis_at + args.redis_down_seconds, max(redis_at + 5, duration - 5))
    events += [Event(redis_at, "SIGKILL Redis master", "first master"),
               Event(redis_back, "restart old Redis master", "first master")]
    return sorted(events, key=lambda e: e.at)


class Faults:
    """Runs the schedule from the main thread (children must be started from it: their
    parent-death signal follows the thread that started them)."""

    def __init__(self, stack: orch.Stack, node4: orch.ChatNode, eds: Path, ledger: Ledger):
        self.stack, self.node4, self.eds, self.ledger = stack, node4, eds, ledger
        self.node_stats: list[dict] = []  # one per chat-node process lifetime, scraped before it ends
        self.redis_victim: orch.RedisNode | None = None

    def hosts(self, with_node4: bool) -> list[tuple[str, int, int]]:
        ports = [*self.stack.ports.nodes, *([self.node4.port] if with_node4 else [])]
        return [("127.0.0.1", p, 1) for p in ports]

    def scrape(self, node: orch.ChatNode) -> None:
        try:
            self.node_stats.append(node.stats())
        except (OSError, ValueError) as e:
            self.node_stats.append({"node": node.node_id, "scrape_failed": str(e)})

    def run(self, e: Event) -> None:
        try:
            e.detail = self._run(e) or ""
        except Exception as ex:  # noqa: BLE001 - recorded, the soak goes on and fails
            e.ok, e.detail = False, f"{type(ex).__name__}: {ex}"
        e.done_at = self.ledger.now()

    def _run(self, e: Event) -> str:
        if e.action == "SIGKILL chat node":
            node = self.stack.node(e.target)
            self.scrape(node)
            pid = node.pid
            node.kill()
            return f"pid {pid}"
        if e.action == "restart chat node":
            node = self.stack.node(e.target).start()
            return f"pid {node.pid}, listening"
        if e.action.startswith("add chat node"):
            self.node4.start()
            orch.write_eds(self.eds, self.hosts(True))
            return f"pid {self.node4.pid} on {self.node4.port}; EDS has 4 hosts"
        if e.action == "remove chat node from EDS":
            orch.write_eds(self.eds, self.hosts(False))
            return "EDS has 3 hosts"
        if e.action == "SIGTERM removed chat node":
            self.scrape(self.node4)
            self.node4.stop()
            return f"exited {self.node4.returncode()}"
        if e.action == "SIGKILL Redis master":
            port = self.stack.redis.masters()[0]
            replica = self.stack.redis.replica_of(port)
            self.redis_victim = self.stack.redis.node(port)
            pid = self.redis_victim.pid
            self.redis_victim.kill()
            e.target = f"redis {port}"
            return f"pid {pid}; its replica is {replica}"
        if e.action == "restart old Redis master":
            assert self.redis_victim is not None
            self.redis_victim.start()
            e.target = f"redis {self.redis_victim.port}"
            return f"pid {self.redis_victim.pid}"
        raise ValueError(e.action)


# --------------------------------------------------------------------------------------
# Wasm failures.

def wasm_failures(log: str) -> list[str]:
    """Lines of Envoy's log that show a VM failure (sa_harness.wasm_failures, proven
    against a real trap by the failure-policy tests) or any error or critical line of
    Envoy's wasm logger."""
    return orch.wasm_failures(log, any_wasm_error=True)


def vm_stats(envoy: orch.Envoy) -> dict[str, int]:
    return envoy.counters("^wasm\\.")


def envoy_counters(envoy: orch.Envoy, regex: str) -> dict[str, int]:
    return envoy.counters(regex)


# --------------------------------------------------------------------------------------
# The run.


def artifacts() -> dict[str, str]:
    """What was tested: the commit (and whether the work tree differed from it) and the
    SHA-256 of the .wasm and chat-node binaries, since src/ changes under a soak's feet."""
    def sha(path: Path) -> str:
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        except OSError:
            return "missing"

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return {"commit": git("rev-parse", "--short", "HEAD") + dirty, "wasm_sha256": sha(orch.WASM),
            "chat_node_sha256": sha(orch.CHAT_NODE_BIN)}


percentiles = orch.percentiles


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="minutes of load (default 5)")
    ap.add_argument("--clients", type=int, default=12, help="concurrent client threads (default 12)")
    ap.add_argument("--open", type=int, default=8, help="conversations each client keeps going at once (default 8)")
    ap.add_argument("--turns", type=lambda s: tuple(int(x) for x in s.split("-")), default=(3, 12), metavar="MIN-MAX",
                    help="turns per conversation (default 3-12)")
    ap.add_argument("--think-ms", type=float, default=20.0, help="pause between a client's turns (default 20)")
    ap.add_argument("--kill-every", type=float, default=30.0, help="seconds between chat-node SIGKILLs (default 30)")
    ap.add_argument("--down-seconds", type=float, default=5.0, help="a killed node restarts after this (default 5)")
    ap.add_argument("--redis-down-seconds", type=float, default=30.0,
                    help="the killed Redis master restarts after this (default 30)")
    ap.add_argument("--max-attempts", type=int, default=20, help="attempts per turn before a client gives up (20)")
    ap.add_argument("--request-timeout", type=float, default=20.0, help="client timeout per attempt, s (default 20)")
    ap.add_argument("--port-offset", type=int, default=None,
                    help="DESIGN ports + N (default: the first free of 500, 600, ..., 900, 100, ..., 400)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench", help="where SOAK.md and soak.json go (default bench/)")
    args = ap.parse_args(argv)
    if len(args.turns) != 2 or not 1 <= args.turns[0] <= args.turns[1]:
        ap.error("--turns: MIN-MAX with 1 <= MIN <= MAX")
    if args.minutes > 9:
        print(f"soak: note: {args.minutes:g} min of load is past the 10-minute bound of `make soak`", flush=True)
    say = lambda s: print(s, flush=True)  # noqa: E731
    wall0 = time.monotonic()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")

    try:
        stack_check = orch.Stack(orch.Ports(), RUN_DIR)
        stack_check.check_prerequisites()
        ports, node4_port, offset = pick_ports(args.port_offset)
    except (orch.MissingPrerequisite, orch.HarnessError) as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2

    shutil.rmtree(RUN_DIR, ignore_errors=True)
    RUN_DIR.mkdir(parents=True)
    eds = RUN_DIR / "eds.json"
    cfg = orch.harness_config(listen=ports.listen, admin=ports.admin, hosts=[("127.0.0.1", p, 1) for p in ports.nodes],
                             eds_path=eds, redis_listen=ports.redis_proxy, redis_seeds=ports.redis_seeds)
    # The built-in deterministic model, whatever the caller's environment says.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    stack = orch.Stack(ports, RUN_DIR, envoy_config=cfg, node_env=env, say=say)
    node4 = orch.ChatNode("node-4", node4_port, ports.redis_proxy, RUN_DIR, env=env)
    names = {p: f"node-{i + 1}" for i, p in enumerate(ports.nodes)} | {node4_port: "node-4"}
    schedule = fault_schedule(args)
    stop = threading.Event()
    clients: list[Client] = []

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    say(f"soak: port offset {offset} (listener {ports.listen}, admin {ports.admin}, redis_proxy {ports.redis_proxy}, "
        f"Redis {ports.redis[0]}-{ports.redis[-1]}, chat nodes {ports.nodes[0]}-{node4_port}); logs in {RUN_DIR}")
    result: dict = {}
    code = 1
    try:
        stack.start()
        startup_s = time.monotonic() - wall0
        vm_before = vm_stats(stack.envoy)
        ledger = Ledger(t0=time.monotonic())
        monitor = Monitor(stack, ledger, names)
        faults = Faults(stack, node4, eds, ledger)
        monitor.sample()
        clients = [Client(i, ports.listen, ledger, stop, args) for i in range(args.clients)]
        for c in clients:
            c.start()
        say(f"soak: {args.clients} clients for {args.minutes:g} min; {len(schedule)} fault events scheduled")
        duration = args.minutes * 60
        pending = list(schedule)
        next_report = 30.0
        while ledger.now() < duration:
            while pending and pending[0].at <= ledger.now():
                e = pending.pop(0)
                faults.run(e)
                say(f"  t={e.done_at:6.1f}s  {e.action} {e.target}: {e.detail}{'' if e.ok else '  (FAILED)'}")
            monitor.sample()
            if ledger.now() >= next_report:
                next_report += 30
                with ledger.lock:
                    say(f"  t={ledger.now():6.1f}s  requests {len(ledger.request_ms)}, turns {ledger.turns_ok}, "
                        f"errors {len(ledger.errors)}, lost {len(ledger.lost)}, abandoned {len(ledger.abandoned)}")
            time.sleep(0.25)
        load_s = ledger.now()
        say(f"soak: load over after {load_s:.0f}s; letting in-flight turns finish")
        stop.set()
        for c in clients:
            c.join(timeout=args.max_attempts * (args.request_timeout + 1))
        stuck = [c.name for c in clients if c.is_alive()]
        for e in pending:  # nothing should be left; recorded if it is
            e.ok, e.detail = False, "not run: the load ended first"
        monitor.sample()
        time.sleep(1.0)  # the filter flushes its counters every 250 ms
        for n in stack.nodes:
            if n.alive():
                faults.scrape(n)
        result = report(args, stack, ledger, faults, monitor, schedule, vm_before, startup_s, load_s, offset,
                        node4_port, stuck)
        code = 1 if result["failures"] else 0
    except (orch.HarnessError, orch.MissingPrerequisite) as e:
        print(f"soak: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt as e:
        say(f"soak: interrupted ({e or 'SIGINT'}); stopping")
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop.set()
        for c in clients:
            c.join(timeout=30)
        node4.stop()
        stack.stop()
        left = [p for p in [*ports.all(), node4_port] if orch.port_open(p)]
        alive = [p.name for p in [*stack.processes(), node4] if p.alive()]
        if left or alive:
            say(f"warning: still listening {left}, still running {alive}")
        else:
            say("soak: every process reaped, no soak port listening")
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if result:
        result["wall_seconds"] = round(time.monotonic() - wall0, 1)
        result["started_at"] = started_at
        write(result, args.out)
        say(summary(result))
        say(f"written: {_rel(args.out / 'SOAK.md')}, {_rel(args.out / 'soak.json')}")
    return code


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def report(args, stack, ledger, faults, monitor, schedule, vm_before, startup_s, load_s, offset, node4_port,
           stuck) -> dict:
    envoy = stack.envoy
    stats = envoy.stats()
    outcomes = {k: v for k, v in stats.items() if k.startswith("outcome.")}
    requests = len(ledger.request_ms)
    errors = Counter(kind for _, kind in ledger.errors)
    # Each error and each move, attributed to the latest fault event that started before it.
    def window(t: float) -> str:
        before = [e for e in schedule if e.at <= t]
        return f"{before[-1].action} {before[-1].target} @{before[-1].at:.0f}s" if before else "before any fault"

    by_fault = Counter(window(t) for t, _ in ledger.errors)
    moves_by_fault = Counter(window(t) for t in ledger.move_times)
    node_totals: Counter = Counter()
    for s in faults.node_stats:
        for k, v in s.items():
            if isinstance(v, int) and k != "connections_open" and k != "cache_entries":
                node_totals[k] += v
    log = stack.envoy.log_path.read_text(errors="replace")
    wasm_hits = wasm_failures(log)
    vm_after = vm_stats(envoy)
    vm_grew = {k: (vm_before.get(k, 0), v) for k, v in vm_after.items()
               if ("created" in k or "fail" in k or "reload" in k) and v != vm_before.get(k, 0)}
    vm_fail = {k: v for k, v in vm_after.items() if "fail" in k and v}
    discovery_warnings = sum(1 for line in log.splitlines() if "discovery poll failed" in line)
    cluster = envoy_counters(envoy, r"^cluster\.chat_nodes\.(upstream_rq_retry|upstream_rq_retry_overflow|"
                                    r"upstream_rq_retry_success|upstream_cx_connect_fail|upstream_rq_5xx|"
                                    r"upstream_rq_pending_overflow|health_check\.failure|outlier_detection\.ejections_enforced_total|"
                                    r"membership_change)$")
    redis_proxy = envoy_counters(envoy, r"^redis\.redis\.(downstream_rq_total|command\.(get|set)\.(error|total))$")
    failures = []
    if ledger.lost:
        failures.append(f"{len(ledger.lost)} lost turn(s)")
    if wasm_hits or vm_grew or vm_fail:
        failures.append(f"wasm failures: {len(wasm_hits)} log line(s), vm stats changed {vm_grew}, {vm_fail}")
    if stats.get("requests", -1) != sum(outcomes.values()):
        failures.append(f"filter stats: requests {stats.get('requests')} != sum(outcome.*) {sum(outcomes.values())}")
    if ledger.abandoned:
        failures.append(f"{len(ledger.abandoned)} turn(s) abandoned after {args.max_attempts} attempts or a 4xx")
    bad_events = [f"{e.action} {e.target}: {e.detail}" for e in schedule if not e.ok]
    if bad_events:
        failures.append(f"fault events that failed: {bad_events}")
    if stuck:
        failures.append(f"clients still running at the end: {stuck}")
    return {
        "command": "make soak" if os.environ.get("MAKELEVEL") else " ".join([_rel(Path(sys.argv[0])), *sys.argv[1:]]),
        "parameters": {
            "minutes": args.minutes, "clients": args.clients, "turns_per_conversation": list(args.turns),
            "think_ms": args.think_ms, "open_per_client": args.open, "kill_every_s": args.kill_every,
            "down_s": args.down_seconds,
            "redis_down_s": args.redis_down_seconds, "max_attempts": args.max_attempts,
            "request_timeout_s": args.request_timeout, "seed": args.seed, "port_offset": offset,
            "envoy_concurrency": stack.concurrency,
        },
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": list(os.getloadavg())},
        "artifacts": artifacts(),
        "startup_seconds": round(startup_s, 1),
        "load_seconds": round(load_s, 1),
        "requests": requests,
        "requests_per_second": round(requests / load_s, 1) if load_s else None,
        "turns_acknowledged": ledger.turns_ok,
        "turns_retried": ledger.retried_turns,
        "turns_replayed": len(ledger.replayed),
        "replayed_details": ledger.replayed[:50],
        "conversations": {"started": ledger.conversations_started, "completed": ledger.conversations_completed},
        "errors": {"count": len(ledger.errors), "rate": round(len(ledger.errors) / requests, 5) if requests else None,
                   "by_kind": dict(errors.most_common()), "by_fault": dict(by_fault.most_common())},
        "latency_ms": {"request": percentiles(ledger.request_ms), "request_200": percentiles(ledger.ok_request_ms),
                       "turn": percentiles(ledger.turn_ms)},
        "lost_turns": len(ledger.lost),
        "lost_turn_details": ledger.lost[:50],
        "abandoned_turns": len(ledger.abandoned),
        "abandoned_details": ledger.abandoned[:50],
        "moved": {
            "filter_outcome_moved": stats.get("outcome.moved", 0),
            "filter_served_fallback": stats.get("served.fallback", 0),
            "filter_total": stats.get("outcome.moved", 0) + stats.get("served.fallback", 0),
            "client_node_changes": ledger.moves,
            "client_node_changes_answered_from_store": ledger.moves_from_store,
            "client_node_changes_by_fault": {window(e.at + 0.001): moves_by_fault.get(window(e.at + 0.001), 0)
                                             for e in schedule} | dict(moves_by_fault),
            "client_replies_by_context": dict(ledger.contexts),
            "nodes_store_loads": node_totals.get("store_loads", 0),
            "nodes_moved": node_totals.get("moved", 0),
            "nodes_fallback": node_totals.get("fallback", 0),
        },
        "replies_by_node": dict(sorted(ledger.nodes.items())),
        "filter_stats": stats,
        "filter_stats_consistent": stats.get("requests", -1) == sum(outcomes.values()),
        "filter_requests_vs_client_attempts": [stats.get("requests", 0), requests],
        "chat_node_totals": dict(node_totals),
        "envoy_chat_nodes_cluster": cluster,
        "envoy_redis_proxy": redis_proxy,
        "wasm": {"log_lines": wasm_hits[:20], "vm_stats_before": vm_before, "vm_stats_after": vm_after,
                 "vm_stats_changed": vm_grew, "discovery_poll_warnings": discovery_warnings,
                 "failures": len(wasm_hits) + len(vm_grew) + len(vm_fail)},
        "faults": [{"at": round(e.at, 1), "done_at": None if e.done_at is None else round(e.done_at, 1),
                    "action": e.action, "target": e.target, "detail": e.detail, "ok": e.ok} for e in schedule],
        "observed": [c for c in monitor.changes],
        "failures": failures,
        "verdict": "fail" if failures else "pass",
    }


def summary(r: dict) -> str:
    lat = r["latency_ms"]
    m = r["moved"]
    lines = [
        "",
        f"soak {r['verdict'].upper()}: {r['load_seconds']:.0f}s of load ({r['wall_seconds']:.0f}s in all, "
        f"startup {r['startup_seconds']:.0f}s), {r['parameters']['clients']} clients",
        f"  requests {r['requests']} ({r['requests_per_second']}/s), turns acknowledged {r['turns_acknowledged']}, "
        f"retried {r['turns_retried']} (answered as already applied {r['turns_replayed']}), "
        f"conversations {r['conversations']['started']}",
        f"  client-visible errors {r['errors']['count']} ({100 * (r['errors']['rate'] or 0):.3f}%): "
        + (", ".join(f"{k} x{v}" for k, v in r["errors"]["by_kind"].items()) or "none"),
        f"  latency per request p50 {lat['request']['p50']} ms, p99 {lat['request']['p99']} ms, "
        f"max {lat['request']['max']} ms; per turn (with retries) p50 {lat['turn']['p50']} ms, "
        f"p99 {lat['turn']['p99']} ms",
        f"  moved: filter outcome.moved {m['filter_outcome_moved']} + served.fallback {m['filter_served_fallback']}; "
        f"nodes' store loads {m['nodes_store_loads']}; client saw {m['client_node_changes']} node changes "
        f"({m['client_node_changes_answered_from_store']} answered from store)",
        f"  lost turns {r['lost_turns']}, abandoned turns {r['abandoned_turns']}, wasm failures {r['wasm']['failures']}, "
        f"filter stats consistent {r['filter_stats_consistent']}",
    ]
    lines += [f"  FAIL: {f}" for f in r["failures"]]
    return "\n".join(lines)


def write(r: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(r, indent=2, ensure_ascii=False) + "\n")
    (out / "SOAK.md").write_text(markdown(r))


def markdown(r: dict) -> str:
    p, lat, m, s = r["parameters"], r["latency_ms"], r["moved"], r["filter_stats"]
    outcome_sum = sum(v for k, v in s.items() if k.startswith("outcome."))

    def row(name, d):
        return f"| {name} | {d['n']} | {d['p50']} | {d['p90']} | {d['p99']} | {d['max']} |"

    err_rows = "\n".join(f"| {k} | {v} |" for k, v in r["errors"]["by_kind"].items()) or "| (none) | 0 |"
    fault_rows = "\n".join(
        f"| {f['at']:.0f} | {f['done_at']} | {f['action']} | {f['target']} | {f['detail']}{'' if f['ok'] else ' **FAILED**'} |"
        for f in r["faults"])
    by_fault = "\n".join(f"| {k} | {v} |" for k, v in r["errors"]["by_fault"].items()) or "| (none) | 0 |"
    moves_rows = "\n".join(f"| {k} | {v} |" for k, v in m["client_node_changes_by_fault"].items())
    observed = "\n".join(f"| {o['t']} | {o['what']} | {o['value']} |" for o in r["observed"] if not o["initial"])
    lost = "\n".join(f"- {json.dumps(x, ensure_ascii=False)}" for x in r["lost_turn_details"]) or "none"
    replayed = "\n".join(f"- {json.dumps(x, ensure_ascii=False)}" for x in r["replayed_details"]) or "none"
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(s.items()) if k.startswith("outcome."))
    return f"""# Soak under faults

Written by `scripts/soak.py` (`make soak`); how to run it and read it: [docs/harness.md](../docs/harness.md#soak).
Machine-readable: [soak.json](soak.json).

**Verdict: {r['verdict'].upper()}**{''.join(chr(10) + '- ' + f for f in r['failures'])}

Run of {r['started_at']}: `{r['command']}`, {r['wall_seconds']:.0f} s wall time in all (startup
{r['startup_seconds']:.0f} s, load {r['load_seconds']:.0f} s, then drain and teardown). {p['clients']} clients
with {p['open_per_client']} conversations open each, conversations of {p['turns_per_conversation'][0]}-{p['turns_per_conversation'][1]} turns,
{p['think_ms']:g} ms pause after each turn; Envoy with {p['envoy_concurrency']} workers; {r['machine']['cpus']} CPUs shared with whatever
else ran (load average at the end: {', '.join(f'{x:.2f}' for x in r['machine']['loadavg_at_end'])}).
Tested: commit {r['artifacts']['commit']}, `.wasm` sha256 {r['artifacts']['wasm_sha256']}…, chat-node
sha256 {r['artifacts']['chat_node_sha256']}….

| figure | value |
|---|---|
| requests (HTTP attempts) | {r['requests']} ({r['requests_per_second']}/s) |
| turns acknowledged | {r['turns_acknowledged']} |
| turns that needed a client retry | {r['turns_retried']} |
| ... of which the node had already applied (answered `"replayed": true`, not applied twice) | {r['turns_replayed']} |
| conversations started | {r['conversations']['started']} |
| client-visible errors | {r['errors']['count']} ({100 * (r['errors']['rate'] or 0):.3f} % of requests) |
| **lost turns** | **{r['lost_turns']}** |
| turns abandoned (retries exhausted or 4xx) | {r['abandoned_turns']} |
| **wasm failures** | **{r['wasm']['failures']}** (log lines {len(r['wasm']['log_lines'])}, VM stats changed {r['wasm']['vm_stats_changed'] or 'none'}) |
| filter `requests` / sum of `outcome.*` | {s.get('requests')} / {outcome_sum} ({'equal' if r['filter_stats_consistent'] else 'DIFFERENT'}) |
| filter `requests` / client attempts | {r['filter_requests_vs_client_attempts'][0]} / {r['filter_requests_vs_client_attempts'][1]} |

## Latency (ms, client side, loopback)

| what | n | p50 | p90 | p99 | max |
|---|---|---|---|---|---|
{row('every request', lat['request'])}
{row('requests answered 200', lat['request_200'])}
{row('turn, first attempt to acknowledged reply', lat['turn'])}

## Moved sessions

| source | count |
|---|---|
| filter `outcome.moved` (the filter routed a ticketed session to another node) | {m['filter_outcome_moved']} |
| filter `served.fallback` (Envoy retried onto the next node of the override header) | {m['filter_served_fallback']} |
| sum | {m['filter_total']} |
| chat nodes' `store_loads` (turns applied after a load from Redis, summed over every node process; scraped just before each kill, so a few may be missing; replays not included) | {m['nodes_store_loads']} |
| chat nodes' `moved` / `fallback` (requests marked moved / reloaded as an Envoy retry on a fallback); their sum should equal the clients' node changes | {m['nodes_moved']} / {m['nodes_fallback']} |
| client: replies with `context: store` (exact) | {m['client_replies_by_context'].get('store', 0)} |
| client: consecutive turns of a conversation on different nodes / of which answered `store` | {m['client_node_changes']} / {m['client_node_changes_answered_from_store']} |

Replies by context: {m['client_replies_by_context']}; by node: {r['replies_by_node']}.

Node changes the clients saw, by the latest fault event before them (pinned sessions:
adding node-4 moves none; a killed node's and the removed node-4's open conversations
move once each):

| fault window | node changes |
|---|---|
{moves_rows}

## Errors the clients saw

Each is one failed attempt; the client retried the turn (rule in docs/harness.md).

| error | count |
|---|---|
{err_rows}

By the latest fault event before the error:

| fault window | errors |
|---|---|
{by_fault}

## Fault schedule as executed (seconds from the start of the load)

| planned | done | action | target | detail |
|---|---|---|---|---|
{fault_rows}

What the soak observed (sampled every 0.25-1 s):

| t (s) | what | now |
|---|---|---|
{observed}

## Filter stats at the end

{', '.join(f'`{k}` {v}' for k, v in sorted(s.items()))}

Outcomes: {outcomes}.

Envoy `chat_nodes` cluster: {', '.join(f'`{k.split("chat_nodes.")[1]}` {v}' for k, v in sorted(r['envoy_chat_nodes_cluster'].items()))}.

Envoy redis_proxy: {', '.join(f'`{k.split("redis.redis.")[1]}` {v}' for k, v in sorted(r['envoy_redis_proxy'].items()))}.

Chat nodes, summed over every process: {', '.join(f'`{k}` {v}' for k, v in sorted(r['chat_node_totals'].items()))}.

Wasm VM stats at the end: {', '.join(f'`{k}` {v}' for k, v in sorted(r['wasm']['vm_stats_after'].items()))};
filter log lines "discovery poll failed": {r['wasm']['discovery_poll_warnings']}.

## Retried turns the node had already applied

A failed attempt that the node had in fact applied (it wrote the turn, then its reply was
lost: killed right after the write, or a client timeout). The retry was answered as
already applied (`"replayed": true`) instead of being applied twice.

{replayed}

## Lost turns

{lost}
"""


if __name__ == "__main__":
    sys.exit(main())
