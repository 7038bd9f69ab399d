#!/usr/bin/env python3
"""`make bench-placement`: placement under load, measured through the real harness
(Redis Cluster 3+3, Envoy 1.40, chat nodes with the engine model on), the filter's
placement arms side by side with Envoy's bounded-load ring hash and least-request.
Writes bench/PLACEMENT.md, bench/placement.json and bench/placement.svg. How to run
and read it: docs/benchmarks.md ("Placement benchmark").

    bench/placement.py              every arm, the full workload (about 15 minutes on 2 cores)
    bench/placement.py --quick      every arm, a short workload (iteration, about 5 minutes)
    bench/placement.py --arms a,d,e a subset (keys: a b125 b150 c cq d e)

Every arm gets a fresh stack (sa_harness.Stack: Redis Cluster, Envoy, chat nodes on free
ports) and the same workload (same seed): conversations arriving over the run, each a
heavy-tailed number of turns with heavy-tailed message sizes and exponential think
times, every turn a streamed `POST /v1/chat/completions` through Envoy's listener. One
node is slowed down mid-run. Every reply is checked (turn number and history digest);
a lost turn fails the run (exit status 1).

Every process this script starts is stopped when it ends, on error too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

import placement_report as report  # bench/ (the script's own directory)
import sa_harness as h  # the harness: Stack, Ports, ChatNode, history_digest, percentile

# --------------------------------------------------------------------------------------
# Settings.

# The workload. Conversations arrive uniformly over `arrive_s` (a Poisson process
# conditioned on its count); turns per conversation and message sizes are lognormal
# (heavy right tail) and capped; think times are exponential and capped.
FULL = dict(conversations=300, arrive_s=45.0, turns_median=3.0, turns_sigma=0.9, turns_max=16, msg_median=40,
            msg_sigma=1.0, msg_max=1500, think_mean_s=1.5, think_max_s=8.0, slow_at_s=15.0)
QUICK = dict(conversations=130, arrive_s=20.0, turns_median=3.0, turns_sigma=0.9, turns_max=8, msg_median=40,
             msg_sigma=1.0, msg_max=1500, think_mean_s=1.5, think_max_s=6.0, slow_at_s=6.0)

# The engine model of every chat node (docs/chat-node.md), and the slow-down. Why these
# numbers: PLACEMENT.md "Engine parameters" (placement_report.ENGINE_WHY).
ENGINE = dict(nodes=4, slots=8, prefill_us_per_token=200, decode_us_per_token=25_000, kv_capacity_tokens=16_000,
              slow_node="node-1", slow_factor=4)

SEED = 11

# Saturation settings of arms c and cq (DESIGN section 10). Arm c reads
# kv_cache_usage_perc >= 0.9 with stale_ms 5 s (DESIGN's example, meant for vLLM's
# metric); arm cq (c') reads the queue, num_requests_waiting >= 4 (half a batch of 8
# slots) with a report counting for 1 s: the `placement` the reference envoy/envoy.yaml
# ships. A node judged saturated gets no new requests, hence no fresh report, so its
# verdict stands (and its sessions spill) until stale_ms passes; PLACEMENT.md "Reading
# this run" has the measurements behind both numbers.
SAT_KV = {"metric": "kv_cache_usage_perc", "threshold": 0.9, "stale_ms": 5000, "spill": True}
SAT_QUEUE = {"metric": "num_requests_waiting", "threshold": 4, "stale_ms": 1000, "spill": True}


@dataclass(frozen=True)
class Arm:
    key: str
    label: str
    kind: str  # "filter", "ring_hash" or "least_request"
    placement: dict | None = None

    @property
    def filtered(self) -> bool:
        return self.kind == "filter"


def arms_for(args) -> list[Arm]:
    c_bf = args.c_balance_factor
    return [
        Arm("a", "filter, ranking alone (the reference config without `placement`: pinned + ticket)", "filter"),
        Arm("b125", "filter + placement.balance_factor 125", "filter", {"balance_factor": 125}),
        Arm("b150", "filter + placement.balance_factor 150", "filter", {"balance_factor": 150}),
        Arm("c", f"filter + balance_factor {c_bf} + saturation kv_cache_usage_perc ≥ {args.kv_threshold:g}, spill, "
            "drain", "filter", {"balance_factor": c_bf, "saturation": {**SAT_KV, "threshold": args.kv_threshold,
                                                                    "stale_ms": args.kv_stale_ms},
                                "drain": True}),
        Arm("cq", f"filter + balance_factor {c_bf} + saturation num_requests_waiting ≥ {args.queue_threshold:g}, "
            "spill, drain", "filter", {"balance_factor": c_bf, "saturation": {**SAT_QUEUE,
                                                                             "threshold": args.queue_threshold,
                                                                             "stale_ms": args.queue_stale_ms},
                                       "drain": True}),
        Arm("d", "Envoy RING_HASH, hash_balance_factor 150, hash on x-session-id (no filter)", "ring_hash"),
        Arm("e", "Envoy LEAST_REQUEST, no stickiness (no filter)", "least_request"),
    ]


def log(msg: str) -> None:
    print(f"[bench-placement {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# --------------------------------------------------------------------------------------
# The workload: the same for every arm (one seed).

# A fixed vocabulary of pseudo-words: a message of k tokens is k words (the chat node
# counts whitespace-separated words as tokens).
_SYL = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "gu", "he", "ja", "wi", "xo"]


def _vocab(rng: random.Random, n: int = 4000) -> list[str]:
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYL) for _ in range(rng.randint(1, 4))))
    return sorted(words)


@dataclass
class ConvSpec:
    index: int
    sid: str
    arrive_s: float
    messages: list[str]
    thinks: list[float]  # think time before turn 2, 3, ...


def workload(w: dict, seed: int) -> list[ConvSpec]:
    rng = random.Random(seed)
    vocab = _vocab(rng)
    arrivals = sorted(rng.uniform(0, w["arrive_s"]) for _ in range(w["conversations"]))
    out = []
    for i, at in enumerate(arrivals):
        turns = min(w["turns_max"], max(1, round(rng.lognormvariate(math.log(w["turns_median"]), w["turns_sigma"]))))
        msgs = []
        for _ in range(turns):
            k = min(w["msg_max"], max(1, round(rng.lognormvariate(math.log(w["msg_median"]), w["msg_sigma"]))))
            msgs.append(" ".join(rng.choice(vocab) for _ in range(k)))
        thinks = [min(w["think_max_s"], rng.expovariate(1 / w["think_mean_s"])) for _ in range(turns - 1)]
        out.append(ConvSpec(i, f"bench-{seed}-{i:04d}", at, msgs, thinks))
    return out


def workload_summary(convs: list[ConvSpec]) -> dict:
    turns = [len(c.messages) for c in convs]
    sizes = [len(m.split()) for c in convs for m in c.messages]
    thinks = [t for c in convs for t in c.thinks]
    return {
        "conversations": len(convs), "turns": sum(turns),
        "turns_per_conversation": h.percentiles(turns, (0.5, 0.9, 0.99), 1) | {"mean": round(sum(turns) / len(turns), 2)},
        "message_tokens": h.percentiles(sizes, (0.5, 0.9, 0.99), 1) | {"mean": round(sum(sizes) / len(sizes), 1)},
        "think_s": h.percentiles(thinks, (0.5, 0.9, 0.99), 2) | {"mean": round(sum(thinks) / max(1, len(thinks)), 2)},
        "last_arrival_s": round(max(c.arrive_s for c in convs), 1),
    }


# --------------------------------------------------------------------------------------
# The client: one thread per conversation, one keep-alive connection each.


@dataclass
class TurnResult:
    conv: int
    turn: int
    t: float  # start of the turn's first attempt, seconds since the arm's start
    ttft: float  # seconds to the first content event (first attempt's start to it)
    total: float  # seconds to [DONE]
    node: str
    context: str
    cached_tokens: int
    prefill_tokens: int
    queued_us: int
    attempts: int


@dataclass
class Ledger:
    t0: float
    turns: list[TurnResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # failed attempts (client-visible errors)
    lost: list[str] = field(default_factory=list)  # turns lost: wrong turn/digest, or never acknowledged
    abandoned: int = 0  # turns not sent because their conversation was lost
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, t: TurnResult) -> None:
        with self.lock:
            self.turns.append(t)

    def error(self, e: str) -> None:
        with self.lock:
            self.errors.append(e)

    def lose(self, e: str, abandoned: int) -> None:
        with self.lock:
            self.lost.append(e)
            self.abandoned += abandoned


class Attempt:
    """One streamed completion: status, served-by, first-content time, the final chunk."""

    def __init__(self):
        self.status = 0
        self.node = ""
        self.ttft: float | None = None
        self.final: dict | None = None
        self.done = False
        self.error = ""
        self.set_cookies: list[str] = []


MAX_ATTEMPTS = 10


class Conversation(threading.Thread):
    def __init__(self, spec: ConvSpec, port: int, arm: Arm, ledger: Ledger, token: str | None):
        super().__init__(name=f"conv-{spec.index}", daemon=True)
        self.spec, self.port, self.arm, self.ledger = spec, port, arm, ledger
        self.token = token
        self.cookies: dict[str, str] = {}
        self.said: list[str] = []
        self.conn: http.client.HTTPConnection | None = None

    def run(self) -> None:
        try:
            for i, msg in enumerate(self.spec.messages):
                if i:
                    time.sleep(self.spec.thinks[i - 1])
                if not self.turn(i + 1, msg):
                    self.ledger.lose(f"conversation {self.spec.index} turn {i + 1}", len(self.spec.messages) - i - 1)
                    return
        except Exception as e:  # a bug in the client must show, not hang the arm
            self.ledger.lose(f"conversation {self.spec.index}: client exception {e!r}", 0)
        finally:
            if self.conn is not None:
                self.conn.close()

    def headers(self) -> dict:
        hd = {"content-type": "application/json", "accept": "text/event-stream"}
        if self.arm.filtered:
            # An app-issued session token (DESIGN section 3): the same session ids in
            # every filter arm, so the ranking places them the same way.
            hd["x-session-token"] = self.token or ""
            if self.cookies:
                hd["cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        else:
            # No filter in front: the client names its session itself (the chat node
            # needs x-session-id; the ring hash hashes it).
            hd["x-session-id"] = self.spec.sid
        return hd

    def turn(self, n: int, msg: str) -> bool:
        body = json.dumps({"model": "chat-node", "stream": True, "turn": n,
                           "messages": [{"role": "user", "content": msg}]}).encode()
        start = time.monotonic()
        backoff = 0.05
        for attempt in range(1, MAX_ATTEMPTS + 1):
            a = self.post(body, start)
            for c in a.set_cookies:
                k, _, rest = c.partition("=")
                self.cookies[k.strip()] = rest.split(";", 1)[0]
            if a.status == 200 and a.done and a.final is not None and a.ttft is not None:
                sa = a.final.get("session_affinity", {})
                want = h.history_digest([*self.said, msg])
                if sa.get("turn") != n or sa.get("history_digest") != want:
                    self.ledger.lose(f"conversation {self.spec.index} turn {n}: reply says turn {sa.get('turn')}, "
                                     f"digest {'ok' if sa.get('history_digest') == want else 'differs'}", 0)
                    return False
                self.said.append(msg)
                eng = sa.get("engine", {})
                self.ledger.add(TurnResult(
                    self.spec.index, n, start - self.ledger.t0, a.ttft, time.monotonic() - start,
                    a.node or sa.get("node", ""), sa.get("context", ""), eng.get("cached_tokens", 0),
                    eng.get("prefill_tokens", 0), eng.get("queued_us", 0), attempt))
                return True
            self.ledger.error(a.error or f"status {a.status}")
            if a.status == 409:
                return False  # turn_conflict: the store and the client disagree
            time.sleep(backoff)
            backoff = min(1.0, backoff * 2)
        return False

    def post(self, body: bytes, start: float) -> Attempt:
        a = Attempt()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=90)
            self.conn.request("POST", "/v1/chat/completions", body=body, headers=self.headers())
            r = self.conn.getresponse()
            a.status = r.status
            a.node = r.getheader("x-served-by") or ""
            a.set_cookies = [v for k, v in r.getheaders() if k.lower() == "set-cookie"]
            if r.status != 200:
                a.error = f"status {r.status} {r.read()[:120]!r}"
                self._close_unless_keepalive(r)
                return a
            buf = b""
            while not a.done:
                data = r.read1(65536)
                if not data:
                    break
                buf += data
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    self._event(a, event, start)
            if not a.done:
                a.error = a.error or "stream ended without [DONE]"
                self._drop()
            else:
                r.read()  # the terminating chunk: the connection is reusable
        except (OSError, http.client.HTTPException, ValueError) as e:
            a.error = f"{type(e).__name__}: {e}"
            self._drop()
        return a

    def _event(self, a: Attempt, event: bytes, start: float) -> None:
        for line in event.split(b"\n"):
            if not line.startswith(b"data: "):
                continue
            payload = line[6:]
            if payload == b"[DONE]":
                a.done = True
                continue
            obj = json.loads(payload)
            if "error" in obj:
                a.error = f"error event {json.dumps(obj['error'])[:120]}"
                continue
            choices = obj.get("choices") or [{}]
            if choices[0].get("delta", {}).get("content") and a.ttft is None:
                a.ttft = time.monotonic() - start
            if "session_affinity" in obj:
                a.final = obj

    def _close_unless_keepalive(self, r) -> None:
        if r.will_close:
            self._drop()

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None


# --------------------------------------------------------------------------------------
# Sampling: Envoy's per-host rq_active every 100 ms, the nodes' engines every second.


class Sampler(threading.Thread):
    def __init__(self, stack: h.Stack, t0: float, names: dict[str, str]):
        super().__init__(name="sampler", daemon=True)
        self.stack, self.t0, self.names = stack, t0, names
        self.stop_event = threading.Event()
        self.inflight: list[tuple[float, dict[str, int]]] = []
        self.engine: list[tuple[float, dict[str, dict]]] = []
        self.gauges: list[tuple[float, dict[str, int]]] = []

    def run(self) -> None:
        last_engine = 0.0
        while not self.stop_event.is_set():
            t = time.monotonic()
            hosts = self.stack.envoy.cluster_hosts("chat_nodes") if self.stack.envoy else None
            if hosts is not None:
                sample = {}
                for host in hosts:
                    name = self.names.get(h.host_address(host))
                    if name:
                        stats = {s.get("name"): s.get("value", 0) for s in host.get("stats", [])}
                        sample[name] = int(stats.get("rq_active", 0) or 0)
                self.inflight.append((t - self.t0, sample))
            if t - last_engine >= 1.0:
                last_engine = t
                eng = {}
                for n in self.stack.nodes:
                    try:
                        e = n.stats()["engine"]
                        eng[n.node_id] = {"kv": round(e["kv_cache_usage_perc"], 4), "waiting": e["waiting"],
                                          "running": e["running"]}
                    except (OSError, KeyError, ValueError):
                        pass
                self.engine.append((t - self.t0, eng))
            self.stop_event.wait(max(0.0, 0.1 - (time.monotonic() - t)))

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


# --------------------------------------------------------------------------------------
# Envoy configurations.


def envoy_config(arm: Arm, ports: h.Ports) -> dict:
    """The reference envoy/envoy.yaml on `ports`; filter arms add `placement` to the
    filter's JSON; the native arms drop the filter and swap the override_host policy for
    a plain one. Health checks, outlier detection, retries and redis_proxy stay."""
    cfg = h.envoy_config_for(ports)
    if arm.filtered:
        # The reference filter JSON with exactly the arm's `placement` (arm a: none, even
        # when the reference config turns placement on).
        plugin = h.filter_json(cfg)
        plugin.pop("placement", None)
        if arm.placement:
            plugin["placement"] = arm.placement
        h.set_filter_json(cfg, plugin)
        return cfg
    listener = next(l for l in cfg["static_resources"]["listeners"] if l["name"] == "chat")
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.wasm"]
    chat = h.cluster(cfg, "chat_nodes")
    del chat["load_balancing_policy"]
    if arm.kind == "ring_hash":
        for vh in hcm["route_config"]["virtual_hosts"]:
            for route in vh["routes"]:
                route["route"]["hash_policy"] = [{"header": {"header_name": "x-session-id"}}]
        chat["load_balancing_policy"] = {"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.ring_hash",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash",
                "consistent_hashing_lb_config": {"hash_balance_factor": 150}}}}]}
    elif arm.kind == "least_request":
        chat["load_balancing_policy"] = {"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.least_request",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest"}}}]}
    else:
        raise ValueError(arm.kind)
    return cfg


class BenchStack(h.Stack):
    """sa_harness.Stack; without the filter, "healthy" is Envoy's own count (there is no
    filter VM whose host set could be waited for)."""

    def __init__(self, *a, filtered: bool = True, **kw):
        super().__init__(*a, **kw)
        self.filtered = filtered

    def wait_healthy(self, n: int, timeout: float = 30.0) -> float:
        if self.filtered:
            return super().wait_healthy(n, timeout)
        envoy = self.envoy
        assert envoy is not None

        def ok() -> bool:
            envoy.check_alive("waiting for healthy hosts")
            return len(envoy.healthy_addresses("chat_nodes") or ()) == n

        return h.wait_for(ok, timeout, f"Envoy to count {n} healthy chat nodes")


# --------------------------------------------------------------------------------------
# One arm.


def node_args(e: dict) -> list[str]:
    return ["--slots", str(e["slots"]), "--prefill-us-per-token", str(e["prefill_us_per_token"]),
            "--decode-us-per-token", str(e["decode_us_per_token"]), "--kv-capacity-tokens",
            str(e["kv_capacity_tokens"])]


_current: list[BenchStack] = []


def run_arm(arm: Arm, convs: list[ConvSpec], w: dict, e: dict, workdir: Path, deadline_s: float) -> dict:
    ports = h.Ports.free(h.free_port, nodes=e["nodes"], node_admin=True)
    stack = BenchStack(ports, workdir / arm.key, envoy_config=envoy_config(arm, ports), node_args=node_args(e),
                       filtered=arm.filtered)
    _current.append(stack)
    la_start = loadavg()
    t_start = time.monotonic()
    try:
        stack.start()
        startup_s = time.monotonic() - t_start
        names = {n.address: n.node_id for n in stack.nodes}
        tokens = {c.index: h.session_token(c.sid, ttl=6 * 3600) for c in convs} if arm.filtered else {}
        ledger = Ledger(t0=time.monotonic())
        sampler = Sampler(stack, ledger.t0, names)
        sampler.start()
        slow = stack.node(e["slow_node"])
        slowed_at: list[float] = []

        def slow_down() -> None:
            slow.set_engine(prefill_us_per_token=e["prefill_us_per_token"] * e["slow_factor"],
                            decode_us_per_token=e["decode_us_per_token"] * e["slow_factor"])
            slowed_at.append(time.monotonic() - ledger.t0)

        timer = threading.Timer(w["slow_at_s"], slow_down)
        timer.start()
        threads: list[Conversation] = []
        for c in convs:
            delay = ledger.t0 + c.arrive_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t = Conversation(c, stack.ports.listen, arm, ledger, tokens.get(c.index))
            t.start()
            threads.append(t)
        last_log = time.monotonic()
        for t in threads:
            while t.is_alive():
                t.join(timeout=1.0)
                now = time.monotonic()
                if now - last_log > 15:
                    last_log = now
                    log(f"  {arm.key}: {now - ledger.t0:.0f}s, {len(ledger.turns)} turns done, "
                        f"{sum(x.is_alive() for x in threads)} conversations open")
                if now - ledger.t0 > deadline_s:
                    raise SystemExit(f"arm {arm.key}: the workload did not finish within {deadline_s:.0f}s")
        load_s = time.monotonic() - ledger.t0
        timer.cancel()
        sampler.stop()
        filter_stats = stack.envoy.stats() if arm.filtered else {}
        cluster_stats = h.parse_stats(stack.envoy.admin("/stats?filter=^cluster\\.chat_nodes\\."),
                                      "cluster.chat_nodes.")
        node_stats = {n.node_id: n.stats() for n in stack.nodes}
        wasm_fail = h.wasm_failures(stack.envoy.log_text()) if arm.filtered else []
    finally:
        stack.stop()
        _current.remove(stack)
    return {
        "arm": arm.key, "label": arm.label, "kind": arm.kind, "placement": arm.placement,
        "startup_s": round(startup_s, 1), "load_s": round(load_s, 1), "slowed_at_s": slowed_at[0] if slowed_at else None,
        "loadavg_start": la_start, "loadavg_end": loadavg(),
        "turns": [t.__dict__ for t in ledger.turns], "errors": ledger.errors, "lost": ledger.lost,
        "abandoned": ledger.abandoned,
        "inflight": sampler.inflight, "engine": sampler.engine,
        "filter_stats": {k: v for k, v in filter_stats.items()},
        "cluster_stats": {k: v for k, v in cluster_stats.items()
                          if re.match(r"^(upstream_rq_(total|retry|timeout|5xx|2xx|pending_total)|upstream_cx_total|"
                                      r"lb_healthy_panic|retry_or_shadow_abandoned)", k)},
        "node_stats": {k: {f: v.get(f) for f in ("turns", "memory_hits", "store_loads", "new_conversations", "moved",
                                                  "fallback", "replayed", "append_conflicts", "streams",
                                                  "store_failures")}
                       | {"engine": v.get("engine")} for k, v in node_stats.items()},
        "wasm_failures": wasm_fail,
        "nodes": {n.node_id: n.address for n in stack.nodes},
    }


# --------------------------------------------------------------------------------------


def machine() -> dict:
    return h.machine_facts(["src", "chat-node", "Cargo.toml", "Cargo.lock"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short workload (iteration)")
    ap.add_argument("--arms", default="a,b125,b150,c,cq,d,e", help="comma-separated subset of a,b125,b150,c,cq,d,e")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--conversations", type=int, help="override the workload's conversation count")
    ap.add_argument("--slots", type=int, default=ENGINE["slots"])
    ap.add_argument("--prefill-us", type=int, default=ENGINE["prefill_us_per_token"])
    ap.add_argument("--decode-us", type=int, default=ENGINE["decode_us_per_token"])
    ap.add_argument("--kv-capacity", type=int, default=ENGINE["kv_capacity_tokens"])
    ap.add_argument("--slow-factor", type=int, default=ENGINE["slow_factor"])
    ap.add_argument("--kv-threshold", type=float, default=SAT_KV["threshold"], help="arm c's saturation threshold")
    ap.add_argument("--queue-threshold", type=float, default=SAT_QUEUE["threshold"], help="arm cq's threshold")
    ap.add_argument("--c-balance-factor", type=int, default=150, help="arms c and cq's balance_factor")
    ap.add_argument("--kv-stale-ms", type=int, default=SAT_KV["stale_ms"], help="arm c's saturation stale_ms")
    ap.add_argument("--queue-stale-ms", type=int, default=SAT_QUEUE["stale_ms"], help="arm cq's saturation stale_ms")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    ap.add_argument("--out", default=str(BENCH), help="where PLACEMENT.md, placement.json, placement.svg go")
    args = ap.parse_args()

    w = dict(QUICK if args.quick else FULL)
    if args.conversations:
        w["conversations"] = args.conversations
    e = dict(ENGINE, slots=args.slots, prefill_us_per_token=args.prefill_us, decode_us_per_token=args.decode_us,
             kv_capacity_tokens=args.kv_capacity, slow_factor=args.slow_factor)
    by_key = {a.key: a for a in arms_for(args)}
    keys = [k.strip() for k in args.arms.split(",") if k.strip()]
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        ap.error(f"unknown arms {unknown}; known: {', '.join(by_key)}")
    try:
        h.require_redis()
        h.require_envoy()
        h.require_wasm()
        h.require_chat_node()
    except h.MissingPrerequisite as err:
        print(f"bench-placement: {err}", file=sys.stderr)
        return 2

    convs = workload(w, args.seed)
    started = time.monotonic()
    results = {"quick": args.quick, "seed": args.seed, "workload_settings": w, "engine": e,
               "saturation": {"c": by_key["c"].placement["saturation"], "cq": by_key["cq"].placement["saturation"]},
               "workload": workload_summary(convs), "machine": machine(), "loadavg_start": loadavg(),
               "reference_placement": h.filter_json(h.reference_config()).get("placement"),
               "arms": {}}
    ws = results["workload"]
    log(f"workload: {ws['conversations']} conversations, {ws['turns']} turns, seed {args.seed}; "
        f"engine: {e['nodes']} nodes x {e['slots']} slots, prefill {e['prefill_us_per_token']} us/token, "
        f"decode {e['decode_us_per_token']} us/token, KV {e['kv_capacity_tokens']} tokens; "
        f"{e['slow_node']} {e['slow_factor']}x slower at {w['slow_at_s']:g}s")
    workdir = Path(tempfile.mkdtemp(prefix="sa-bench-placement-"))
    deadline_s = 600.0
    failed = False

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    try:
        for k in keys:
            arm = by_key[k]
            log(f"arm {k}: {arm.label}")
            r = run_arm(arm, convs, w, e, workdir, deadline_s)
            results["arms"][k] = r
            s = report.arm_summary(r, results)
            log(f"arm {k}: {s['turns_ok']} turns in {r['load_s']:.0f}s (startup {r['startup_s']:.0f}s); "
                f"TTFT p50 {s['ttft_ms']['p50']:.0f} ms p99 {s['ttft_ms']['p99']:.0f} ms; turn p99 "
                f"{s['turn_ms']['p99']:.0f} ms; sticky (client) {s['sticky_client']:.3f}; store loads "
                f"{s['store_loads']}; lost {s['lost_turns']}; errors {s['client_errors']}")
            if s["lost_turns"] or r["wasm_failures"]:
                failed = True
    finally:
        for st in list(_current):
            st.stop()
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["loadavg_end"] = loadavg()
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "placement.json").write_text(report.dumps(report.compact(results)))
    (out / "PLACEMENT.md").write_text(report.markdown(results))
    (out / "placement.svg").write_text(report.chart(results))
    print(report.table(results))
    log(f"wrote {out / 'PLACEMENT.md'}, {out / 'placement.json'}, {out / 'placement.svg'} "
        f"in {results['wall_seconds']:.0f}s")
    if failed:
        log("FAILED: lost turns or filter VM failures (see PLACEMENT.md)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
