#!/usr/bin/env python3
"""`make bench`: per-request cost, latency, distribution quality, core microbenchmarks,
size and memory of the session-affinity filter, side by side with Envoy's native
alternatives, on the same Envoy binary. Writes bench/RESULTS.md, bench/results.json and
bench/chart.svg. How to run and read it: docs/benchmarks.md.

    bench/run.py            the full run (5 runs per figure, about 8-9 minutes on 2 cores)
    bench/run.py --quick    1 run per figure, short durations, 10k sessions (iteration)

Options: --skip-build (use the built artifacts as they are), --stages LIST (comma
separated subset of build,throughput,latency,hostcalls,perf,memory,dist,micro), --keep
(keep the work directory with configs and logs), --out DIR.

Every process this script starts is killed when it ends, on error too.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import concurrent.futures
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

import envoy_configs as ec  # bench/ (the script's own directory)
import report
import sa_harness as harness  # Envoy, free ports, HS256 signing, the independent affinity function

ENVOY = harness.ENVOY_BIN
SA_WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "session_affinity.wasm"
NOOP_WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "noop_filter.wasm"
MICRO = ROOT / "target" / "release" / "bench-micro"
OPENLOOP = ROOT / "target" / "release" / "openloop"
MICRO_WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "bench-micro.wasm"

# The arms of the per-request benchmark, in the order they alternate. A8, B8 and Cm are
# for the analysis: A behind C's override_host cluster (the header set by the route); B
# plus exactly session-affinity's host calls; C with 4096 sessions in turn (more than the
# filter's per-VM memo of checked tokens holds).
ARMS = ["A", "B", "C", "C1k", "D", "E", "A8", "B8", "Cm", "Cp"]
CM_SESSIONS = 4096
# Calls per request in the host-call cost arms.
REPEAT = 16
LATENCY_ARMS = ["A", "B", "C", "C1k", "D", "E"]
SESSION = "bench-session-1"

FULL = dict(runs=5, closed_s=3, warm_s=1, conns=32, open_s=3, open_warm_s=0.5, open_conns=64, sessions=100_000,
            move_sessions=25_000, sample=2000, mem_requests=100_000, perf_s=3, hc_runs=3, hc_s=2)
QUICK = dict(runs=1, closed_s=2, warm_s=1, conns=32, open_s=2, open_warm_s=0.5, open_conns=64, sessions=10_000,
             move_sessions=10_000, sample=300, mem_requests=20_000, perf_s=2, hc_runs=1, hc_s=2)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------
# Processes: every one we start is killed at exit.

_procs: list[subprocess.Popen] = []


def _cleanup(*_a) -> None:
    for e in _envoys:
        e.kill()
    for p in _procs:
        if p.poll() is None:
            try:
                p.kill()
                p.wait(timeout=5)
            except Exception:
                pass


atexit.register(_cleanup)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))


def cpus() -> tuple[list[str], list[str]]:
    """(prefix for the Envoy under test, prefix for backend and load) — `taskset` pins
    them to different CPUs when there are at least two."""
    n = os.cpu_count() or 1
    if n >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", "0"], ["taskset", "-c", "1"]
    return [], []


SUT_CPU, LOAD_CPU = cpus()


_envoys: list[harness.Envoy] = []


def start_envoy(name: str, cfg: dict, workdir: Path, concurrency: int = 1, pin: list[str] | None = None
                ) -> harness.Envoy:
    """An Envoy under `workdir`, started (not yet ready: call `wait_ready`), killed at exit."""
    e = harness.Envoy(cfg, workdir, concurrency=concurrency, name=name, log_level="warn", pin=pin)
    _envoys.append(e)
    return e.start(wait=False)


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, text=True, capture_output=True, **kw)


# --------------------------------------------------------------------------------------
# Tools, build, machine.


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in (("wrk", "wrk"), ("h2load", "nghttp2-client")) if not shutil.which(tool)]
    if missing:
        log(f"installing Debian packages {' '.join(missing)} (apt-get)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, stdout=subprocess.DEVNULL)
    if not os.access(ENVOY, os.X_OK):
        raise SystemExit(f"Envoy not found at {ENVOY}: run `make venv` (or `make bench`, which installs it)")


def build() -> None:
    log("building: make build (the filter), noop-filter (wasm32), bench-micro and openloop (native), "
        "bench-micro (wasm32, for V8)")
    subprocess.run(["make", "-s", "build"], check=True, cwd=ROOT)
    subprocess.run(["cargo", "build", "-q", "--release", "--target", "wasm32-wasip1", "-p", "noop-filter"],
                   check=True, cwd=ROOT)
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "bench-micro"], check=True, cwd=ROOT)
    if shutil.which("node"):
        subprocess.run(["cargo", "build", "-q", "--release", "--target", "wasm32-wasip1", "-p", "bench-micro", "--bin",
                        "bench-micro"], check=True, cwd=ROOT)


def machine() -> dict:
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])
    os_name = "unknown"
    if Path("/etc/os-release").exists():
        m = re.search(r'PRETTY_NAME="([^"]+)"', Path("/etc/os-release").read_text())
        os_name = m[1] if m else os_name
    out = harness.command_output
    facts = harness.machine_facts(["src", "Cargo.toml", "Cargo.lock"], " (src/ modified)")
    facts.pop("python")
    return {
        **facts,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "os": os_name,
        "wrk": out(["wrk", "-v"]).splitlines()[0] if shutil.which("wrk") else "missing",
        "h2load": out(["h2load", "--version"]).splitlines()[0] if shutil.which("h2load") else "missing",
        "rustc": out(["rustc", "--version"]),
        "pinning": f"Envoy under test: `{' '.join(SUT_CPU)}`; backend and load generator: `{' '.join(LOAD_CPU)}`"
        if SUT_CPU else "none (fewer than 2 CPUs or no taskset)",
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


# --------------------------------------------------------------------------------------
# Statistics.


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


# --------------------------------------------------------------------------------------
# The arms.


class Bench:
    def __init__(self, args, settings: dict, workdir: Path):
        self.args, self.s, self.workdir = args, settings, workdir
        self.results: dict = {"settings": settings, "quick": args.quick}
        self.backend: harness.Envoy | None = None
        self.arms: dict[str, harness.Envoy] = {}
        self.headers: dict[str, list[tuple[str, str]]] = {}
        self.commands: dict[str, str] = {}

    # The backend: one Envoy, direct_response on 0.0.0.0, pinned away from the arms.
    def start_backend(self) -> None:
        self.bport = harness.free_port()
        self.backend = start_envoy("backend", ec.backend(self.bport, harness.free_port()), self.workdir, pin=LOAD_CPU)
        self.backend.wait_ready()

    def arm_hosts(self, kind: str) -> list[str]:
        if kind in ("A", "B"):
            return [f"127.0.0.1:{self.bport}"]
        if kind == "C1k":
            return [f"127.1.{i // 250}.{i % 250 + 1}:{self.bport}" for i in range(1000)]
        return [f"127.0.0.{i}:{self.bport}" for i in (1, 2, 3)]

    def start_arms(self, kinds: list[str]) -> None:
        jwks_k = base64.urlsafe_b64encode(base64.b64decode(harness.TOKEN_KEY_B64)).rstrip(b"=").decode()
        # B8 sets exactly what C sets for the benchmark's session.
        want = harness.rank(SESSION, [(h, 1) for h in self.arm_hosts("B8")])[:3]
        for kind in kinds:
            cfg = ec.arm("C" if kind == "Cm" else kind, listen=harness.free_port(), admin=harness.free_port(),
                         hosts=self.arm_hosts(kind), noop_wasm=str(NOOP_WASM), sa_wasm=str(SA_WASM),
                         token_key_b64=harness.TOKEN_KEY_B64, ticket_key_b64=harness.TICKET_KEY_B64, jwks_k=jwks_k,
                         hostcalls=f"hostcalls|{','.join(want)}|{SESSION}", override=",".join(want))
            self.arms[kind] = start_envoy(f"arm-{kind}", cfg, self.workdir, pin=SUT_CPU)
        for p in self.arms.values():
            p.wait_ready()

    def get(self, kind: str, headers: dict, path: str = "/verify") -> harness.Response:
        return harness.request(self.arms[kind].port, "GET", path, headers)

    def check_arms(self) -> dict:
        """A sample request through every arm: 200 and routed as intended, before any
        measurement. Also fetches the tickets the load will send."""
        token = harness.session_token(SESSION, ttl=24 * 3600)
        bp = self.bport
        state_host = f"127.0.0.2:{bp}"
        base = {"x-session-token": token, "x-session-host": base64.b64encode(state_host.encode()).decode()}
        checks: dict[str, str] = {}

        def expect(cond: bool, kind: str, what: str, r: harness.Response) -> None:
            if not cond:
                raise SystemExit(f"arm {kind}: {what}; got {r.status} {r.headers}\n{self.arms[kind].log_tail()}")

        tickets = {}
        for kind in ("C", "C1k", "Cp"):
            if kind not in self.arms:
                continue
            hosts = self.arm_hosts(kind)
            want = harness.rank(SESSION, [(h, 1) for h in hosts])[:3]
            r = self.get(kind, base)
            expect(r.status == 200 and r.header("x-served-by") == want[0], kind, f"first request must reach {want[0]}", r)
            tickets[kind] = r.header("x-session-ticket") or ""
            expect(bool(tickets[kind]), kind, "a ticket must be issued", r)
            r = self.get(kind, {**base, "x-session-ticket": tickets[kind]})
            expect(r.status == 200 and r.header("x-served-by") == want[0] and r.header("x-echo-affinity") == "sticky"
                   and r.header("x-echo-session-id") == SESSION and r.header("x-echo-override") == ",".join(want)
                   and r.header("x-session-ticket") is None, kind,
                   f"sticky request must reach {want[0]} with override {','.join(want)}, and no new ticket", r)
            bad = self.get(kind, {"x-session-token": token[:-4] + "AAAA"})
            expect(bad.status == 401, kind, "a forged token must be refused", bad)
            checks[kind] = (f"200 from {want[0]} (= independent rendezvous ranking of {len(hosts)} hosts), "
                            f"x-session-affinity sticky, override `{want[0]},...` ({len(want)} entries); forged token 401")
            # Only placement asks the node for a load report (the backend then sends one).
            asked = r.header("x-echo-load-format")
            if kind == "Cp":
                expect(asked == "TEXT", kind, "the filter must ask for a TEXT load report", r)
                checks[kind] += "; asked for a TEXT load report, and the backend sent one"
            else:
                expect(not asked, kind, "without placement the filter must not ask for a load report", r)
        if "Cm" in self.arms:
            checks["Cm"] = self.prepare_cm(base["x-session-host"])
        ticket = tickets.get("C", "")
        for kind in self.arms:
            t = tickets.get(kind, "") if kind in ("C1k", "Cp") else ticket
            self.headers[kind] = [("x-session-token", token), ("x-session-ticket", t),
                                  ("x-session-host", base["x-session-host"])]
        hdrs = dict(self.headers.get("A", []))
        if "A" in self.arms:
            r = self.get("A", hdrs)
            expect(r.status == 200 and r.header("x-served-by") == f"127.0.0.1:{bp}", "A", "must reach the backend", r)
            checks["A"] = f"200 from 127.0.0.1:{bp}"
        if "B" in self.arms:
            r = self.get("B", hdrs)
            expect(r.status == 200 and r.header("x-echo-noop") == "1", "B", "the backend must see x-noop: 1", r)
            checks["B"] = "200; the backend saw the header the filter set (x-noop: 1)"
        if "A8" in self.arms:
            want = harness.rank(SESSION, [(h, 1) for h in self.arm_hosts("A8")])[:3]
            r = self.get("A8", hdrs)
            expect(r.status == 200 and r.header("x-served-by") == want[0]
                   and r.header("x-echo-override") == ",".join(want), "A8",
                   f"the route's override header must send it to {want[0]}", r)
            checks["A8"] = f"200 from {want[0]} through override_host, the header set by the route"
        if "B8" in self.arms:
            want = harness.rank(SESSION, [(h, 1) for h in self.arm_hosts("B8")])[:3]
            r = self.get("B8", hdrs)
            expect(r.status == 200 and r.header("x-echo-affinity") == "sticky" and r.header("x-served-by") == want[0]
                   and r.header("x-echo-override") == ",".join(want), "B8",
                   f"the backend must see the set headers and be {want[0]}", r)
            checks["B8"] = f"200 from {want[0]} through override_host; the backend saw the three headers C sets"
        if "D" in self.arms:
            served = {self.get("D", hdrs).header("x-served-by") for _ in range(4)}
            r = self.get("D", hdrs)
            expect(r.status == 200 and len(served) == 1, "D", "jwt_authn must pass it; ring hash must be stable", r)
            bad = self.get("D", {"x-session-token": token[:-4] + "AAAA"})
            expect(bad.status == 401, "D", "a forged token must be refused", bad)
            checks["D"] = (f"200 from {served.pop()} on 5 connections (ring hash on the token header); "
                           "forged token 401")
        if "E" in self.arms:
            r = self.get("E", hdrs)
            expect(r.status == 200 and r.header("x-served-by") == state_host, "E", f"must reach {state_host}", r)
            checks["E"] = f"200 from {state_host}, the host named by the x-session-host state header"
        return checks

    def prepare_cm(self, state_host_b64: str) -> str:
        """Arm Cm: CM_SESSIONS sessions, each with its token and the ticket of its node,
        sent in turn by a wrk Lua script."""
        hosts = self.arm_hosts("Cm")
        now = int(time.time())
        lines = []
        for i in range(CM_SESSIONS):
            sid = f"bench-m-{i:05d}"
            node = harness.rank(sid, [(h, 1) for h in hosts])[0]
            tok = harness.session_token(sid, ttl=24 * 3600)
            tic = harness.sign_jwt({"sid": sid, "node": harness.node_id(node), "iat": now, "exp": now + 24 * 3600},
                                   key_b64=harness.TICKET_KEY_B64, kid=None)
            lines.append((sid, node, tok, tic))
        pairs = self.workdir / "cm-sessions.txt"
        pairs.write_text("".join(f"{tok} {tic}\n" for _, _, tok, tic in lines))
        self.cm_script = self.workdir / "cm.lua"
        self.cm_script.write_text(f"""
local reqs, n, i = {{}}, 0, 0
init = function(args)
  for line in io.lines("{pairs}") do
    local tok, tic = line:match("(%S+) (%S+)")
    n = n + 1
    reqs[n] = wrk.format("GET", "/", {{["x-session-token"] = tok, ["x-session-ticket"] = tic,
                                       ["x-session-host"] = "{state_host_b64}"}})
  end
end
request = function()
  i = i % n + 1
  return reqs[i]
end
""")
        for sid, node, tok, tic in lines[:3] + lines[-2:]:
            r = self.get("Cm", {"x-session-token": tok, "x-session-ticket": tic})
            if not (r.status == 200 and r.header("x-served-by") == node and r.header("x-echo-affinity") == "sticky"
                    and r.header("x-session-ticket") is None):
                raise SystemExit(f"arm Cm: session {sid} must be sticky on {node}; got {r.status} {r.headers}")
        return (f"{CM_SESSIONS} sessions sent in turn by a wrk Lua script (`wrk -s`), each with its own token and "
                f"ticket; 5 samples 200, sticky, on the node of the independent ranking")

    # ---- load generators

    def wrk_cmd(self, kind: str, seconds: float, conns: int | None = None) -> list[str]:
        cmd = LOAD_CPU + ["wrk", "-t1", f"-c{conns or self.s['conns']}", f"-d{seconds}s"]
        if kind == "Cm":
            cmd += ["-s", str(self.cm_script)]
        for k, v in self.headers[kind] if kind != "Cm" else []:
            cmd += ["-H", f"{k}: {v}"]
        return cmd + [f"http://127.0.0.1:{self.arms[kind].port}/"]

    def wrk(self, kind: str, seconds: float, record: bool = True) -> dict:
        cmd = self.wrk_cmd(kind, seconds)
        sut, be = self.arms[kind], self.backend
        tck = os.sysconf("SC_CLK_TCK")
        t0, s0, b0 = time.time(), sut.cpu_ticks(), be.cpu_ticks()
        out = run(cmd).stdout
        wall = time.time() - t0
        s1, b1 = sut.cpu_ticks(), be.cpu_ticks()
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
        total = int(re.search(r"(\d+) requests in", out)[1])
        non2xx = int(m[1]) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
        sock = sum(int(x) for x in m.groups()) if (
            m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)) else 0
        if non2xx or sock:
            raise SystemExit(f"arm {kind}: {non2xx} non-2xx responses and {sock} socket errors under load:\n{out}")
        if record:
            self.commands["closed" if kind != "Cm" else "closed_cm"] = " ".join(self._shown(cmd))
        return {"rps": rps, "requests": total, "sut_cpu": (s1 - s0) / tck / wall, "backend_cpu": (b1 - b0) / tck / wall}

    def _shown(self, cmd: list[str]) -> list[str]:
        """The command with token values replaced by names (the values are in results.json)."""
        out = []
        for c in cmd:
            c = re.sub(r"^(x-session-token): .*", r"'\1: $TOKEN'", c)
            c = re.sub(r"^(x-session-ticket): .*", r"'\1: $TICKET'", c)
            c = re.sub(r"^(x-session-host): .*", r"'\1: $STATE_HOST_B64'", c)
            c = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:$PORT", c)
            c = c.replace(str(self.workdir), "$WORK").replace(str(ROOT) + "/", "")
            out.append(c)
        return out

    def openloop(self, kind: str, rate: int) -> dict:
        cmd = LOAD_CPU + [str(OPENLOOP), "--addr", f"127.0.0.1:{self.arms[kind].port}", "--rate", str(rate),
                          "--duration", str(self.s["open_s"]), "--warmup", str(self.s["open_warm_s"]),
                          "--connections", str(self.s["open_conns"])]
        for k, v in self.headers[kind]:
            cmd += ["--header", f"{k}: {v}"]
        r = run(cmd)
        self.commands.setdefault("open", " ".join(self._shown(cmd)))
        res = json.loads(r.stdout)
        if res["errors"] or res["non2xx"]:
            raise SystemExit(f"arm {kind}: errors under open-loop load: {res}")
        return res

    # ---- stages

    def throughput(self) -> None:
        s = self.s
        log(f"closed loop: {len(self.arms)} arms x {s['runs']} runs x {s['closed_s']}s, wrk -t1 -c{s['conns']}, "
            "arms alternated")
        for kind in self.arms:  # warm-up: JIT, connection pools, caches
            self.wrk(kind, s["warm_s"], record=False)
        runs: dict[str, list[dict]] = {k: [] for k in self.arms}
        for i in range(s["runs"]):
            for kind in self.arms:
                runs[kind].append(self.wrk(kind, s["closed_s"]))
            log("  run %d: %s" % (i + 1, "  ".join(f"{k} {runs[k][-1]['rps']:.0f}" for k in self.arms)))
        res = {k: {"rps": summary([r["rps"] for r in v]),
                   "sut_cpu": summary([r["sut_cpu"] for r in v]),
                   "backend_cpu": summary([r["backend_cpu"] for r in v]),
                   "requests": sum(r["requests"] for r in v)} for k, v in runs.items()}
        ratios = {}
        for num, den in (("C", "A"), ("C", "B"), ("C", "D"), ("C", "E"), ("C1k", "C"), ("B", "A"), ("D", "A"),
                         ("E", "A"), ("A8", "A"), ("B8", "B"), ("C", "B8"), ("Cm", "B"), ("Cm", "C"), ("Cp", "C"),
                         ("Cp", "B"), ("Cp", "D")):
            if num in runs and den in runs:
                # Per-run ratios: each pair ran back to back, so drift cancels.
                ratios[f"{num}/{den}"] = summary([a["rps"] / b["rps"] for a, b in zip(runs[num], runs[den])])
        # The same ratios from the CPU time the Envoy under test spent per request: less
        # sensitive to other processes taking its CPU away (on a quiet machine both agree).
        cpu_ratios = {}
        for key in ratios:
            num, den = key.split("/")
            cpu_ratios[key] = summary([(b["sut_cpu"] / b["rps"]) / (a["sut_cpu"] / a["rps"])
                                       for a, b in zip(runs[num], runs[den])])
        self.results["throughput"] = {"arms": res, "ratios": ratios, "cpu_ratios": cpu_ratios,
                                      "order": list(self.arms), "connections": s["conns"],
                                      "seconds": s["closed_s"], "command": self.commands.get("closed")}

    def hostcall_costs(self) -> None:
        """The price of one host call of each kind: arm B plus REPEAT calls of one kind per
        request, alternated with B; (CPU µs per request − B's) / REPEAT."""
        kinds = {f"R-{c}": c for c in ("pairs", "get", "replace", "time", "property")}
        jwks_k = "unused"
        procs = {}
        for name, call in kinds.items():
            cfg = ec.arm("B", listen=harness.free_port(), admin=harness.free_port(), hosts=self.arm_hosts("B"),
                         noop_wasm=str(NOOP_WASM), sa_wasm=str(SA_WASM), token_key_b64=harness.TOKEN_KEY_B64,
                         ticket_key_b64=harness.TICKET_KEY_B64, jwks_k=jwks_k, noop=f"repeat|{call}|{REPEAT}")
            procs[name] = start_envoy(f"arm-{name}", cfg, self.workdir, pin=SUT_CPU)
        for p in procs.values():
            p.wait_ready()
        self.arms.update(procs)
        for name in kinds:
            self.headers[name] = self.headers["B"]
            r = self.get(name, dict(self.headers["B"]))
            if r.status != 200:
                raise SystemExit(f"arm {name}: status {r.status}\n{procs[name].log_tail()}")
        runs = self.s["hc_runs"]
        log(f"host-call costs: B + {REPEAT} calls of one kind per request, {len(kinds)} kinds x {runs} runs x "
            f"{self.s['hc_s']}s")
        order = ["B", *kinds]
        for kind in order:
            self.wrk(kind, 1, record=False)
        per: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(runs):
            got = {k: self.wrk(k, self.s["hc_s"], record=False) for k in order}
            base = got["B"]["sut_cpu"] / got["B"]["rps"]
            for k in kinds:
                per[k].append((got[k]["sut_cpu"] / got[k]["rps"] - base) * 1e6 / REPEAT)
        for name, p in procs.items():
            p.stop()
            del self.arms[name]
        self.results["hostcalls"] = {"repeat": REPEAT, "per_call_us": {kinds[k]: summary(v) for k, v in per.items()}}

    def latency(self) -> None:
        s = self.s
        a = self.results.get("throughput", {}).get("arms", {}).get("A")
        rate = int(round(a["rps"]["median"] / 2, -2)) if a else self.args.rate
        kinds = [k for k in LATENCY_ARMS if k in self.arms]
        log(f"open loop: {len(kinds)} arms x {s['runs']} runs at {rate} req/s (half of A's max), "
            f"{s['open_conns']} connections")
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for i in range(s["runs"]):
            for kind in kinds:
                runs[kind].append(self.openloop(kind, rate))
            log("  run %d: p99 %s" % (i + 1, "  ".join(f"{k} {runs[k][-1]['p99_us']:.0f}us" for k in kinds)))
        res = {}
        for k, v in runs.items():
            res[k] = {q: summary([r[q] for r in v]) for q in ("p50_us", "p90_us", "p99_us", "p999_us", "achieved_rps",
                                                              "late_p99_us")}
        added = {}
        for k in kinds:
            if k != "B" and "B" in runs:
                added[k] = {q: summary([a[q] - b[q] for a, b in zip(runs[k], runs["B"])]) for q in ("p50_us", "p99_us")}
        self.results["latency"] = {"rate": rate, "arms": res, "added_over_B": added,
                                   "command": self.commands.get("open"), "connections": s["open_conns"],
                                   "seconds": s["open_s"], "warmup_s": s["open_warm_s"]}

    def perf(self) -> None:
        """Where the worker's time goes, B vs B8 vs C: perf samples by DSO (V8's JIT code,
        i.e. the compiled filter, shows as `[JIT] tid N`)."""
        if not shutil.which("perf"):
            self.results["perf"] = {"error": "perf not installed"}
            return
        out = {}
        for kind in [k for k in ("B", "B8", "C", "Cm") if k in self.arms]:
            data = self.workdir / f"perf-{kind}.data"
            wrk = subprocess.Popen(self.wrk_cmd(kind, self.s["perf_s"] + 1), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            _procs.append(wrk)
            time.sleep(0.5)
            r = run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "2999", "-o", str(data), "-p",
                     str(self.arms[kind].pid), "--", "sleep", str(self.s["perf_s"])], check=False)
            wrk.wait()
            if r.returncode != 0:
                self.results["perf"] = {"error": (r.stderr or r.stdout).strip()[-300:]}
                return
            rep = run(["perf", "report", "-i", str(data), "--sort", "dso", "--stdio"], check=False).stdout
            shares = {}
            for line in rep.splitlines():
                m = re.match(r"\s*([\d.]+)%\s+(.+?)\s*$", line)
                if m:
                    name = "JIT (wasm code)" if m[2].startswith("[JIT]") else m[2]
                    shares[name] = shares.get(name, 0.0) + float(m[1])
            out[kind] = shares
        self.results["perf"] = {"by_dso": out, "seconds": self.s["perf_s"]}

    def memory(self) -> None:
        """Linear memory of every wasm VM of arm C, read from /proc/PID/smaps: V8 reserves
        8 GiB (guard regions) per wasm memory and maps its current pages read-write at the
        start of the reservation. `size` is the memory's current size (memory.grow), `rss`
        the pages ever touched."""
        kind = "C"
        if kind not in self.arms:
            return
        p = self.arms[kind]
        snaps = [{"after": "start-up, checks and all throughput/latency runs", "vms": wasm_memories(p.pid),
                  "envoy_rss_kb": rss_kb(p.pid)}]
        port = p.port
        # Every request without a token mints a new session: random id, signed token,
        # set-cookie x2, a fresh ticket: the allocation-heaviest path.
        n = self.s["mem_requests"]
        for phase in (1, 2):
            done = 0
            while done < n:
                out = run(LOAD_CPU + ["wrk", "-t1", "-c32", "-d2s", f"http://127.0.0.1:{port}/"]).stdout
                done += int(re.search(r"(\d+) requests in", out)[1])
                if "Non-2xx" in out:
                    raise SystemExit(f"memory stage: errors: {out}")
            snaps.append({"after": f"+{done} minting requests (phase {phase})", "vms": wasm_memories(p.pid),
                          "envoy_rss_kb": rss_kb(p.pid)})
        stats = p.admin("/stats?filter=wasm")
        self.results["memory"] = {"snapshots": snaps, "wasm_stats": [l for l in stats.splitlines() if l.strip()][:40],
                                  "requests_per_phase": n}

    def micro(self, admin_body: Path | None) -> None:
        args = ["micro"] + (["--quick"] if self.args.quick else [])
        if admin_body:
            args += ["--admin-body", str(admin_body), "--admin-cluster", "upstream"]
        log("core microbenchmarks: native")
        raw = json.loads(run([str(MICRO)] + args).stdout)
        self.results["micro"] = {k: {"unit": v["unit"], "note": v["note"], **summary(v["samples"])}
                                 for k, v in raw["results"].items()}
        # The same code as wasm in V8 (Node's WASI), when Node is there: the filter's logic
        # as Envoy's runtime runs it, minus Envoy.
        node = shutil.which("node")
        if node and MICRO_WASM.exists():
            log("core microbenchmarks: wasm32 in V8 (node)")
            # Paths as WASI sees them: the whole filesystem is preopened as "/".
            r = run([node, "--no-warnings", str(BENCH / "v8run.js"), str(MICRO_WASM), *args, "--passes", "2"],
                    check=False)
            if r.returncode == 0:
                raw = json.loads(r.stdout)
                self.results["micro_v8"] = {k: summary(v["samples"]) for k, v in raw["results"].items()}
                self.results["machine"]["node"] = run([node, "-p", "process.version + ' (V8 ' + process.versions.v8 + ')'"]).stdout.strip()
            else:
                self.results["micro_v8_error"] = (r.stderr or r.stdout)[-500:]

    def sizes(self) -> None:
        self.results["size"] = {"session_affinity_wasm_bytes": SA_WASM.stat().st_size,
                                "noop_filter_wasm_bytes": NOOP_WASM.stat().st_size}

    # ---- distribution

    def distribution(self) -> None:
        s = self.s
        n_sessions = s["sessions"]
        bp = self.bport
        sets: dict[str, list[str]] = {}
        for n, blk in ((10, 1), (50, 2)):
            base = [f"127.0.{blk}.{i}:{bp}" for i in range(1, n + 1)]
            sets[f"{n}"] = base
            sets[f"{n}+1"] = base + [f"127.0.{blk}.{n + 1}:{bp}"]
            sets[f"{n}-1"] = base[:-1]
        sessions = [f"s{i}" for i in range(n_sessions)]

        # 1. The filter, natively through the core (HostSet::top_k; decide/respond for pinned).
        log(f"distribution: filter core, {n_sessions} sessions")
        spec = self.workdir / "dist-spec.json"
        spec.write_text(json.dumps({
            "sessions": n_sessions, "prefix": "s", "sets": sets,
            "pinned": [["10", "10+1"], ["10", "10-1"], ["50", "50+1"], ["50", "50-1"]],
            "ideal_balance_for": [10, 50]}))
        native = json.loads(run([str(MICRO), "dist", "--spec", str(spec)]).stdout)
        placements: dict[str, dict[str, list[str]]] = {"rendezvous": {}, "pinned": {}, "ring_hash": {}, "maglev": {}}
        for name, idx in native["rendezvous"].items():
            placements["rendezvous"][name] = [sets[name][i] for i in idx]
        for pair, idx in native["pinned"].items():
            to = pair.split("->")[1]
            placements["pinned"][to] = [sets[to][i] for i in idx]
        for n in ("10", "50"):
            placements["pinned"][n] = placements["rendezvous"][n]

        # 2. Envoy's RING_HASH and MAGLEV, through a real Envoy, plus the filter's sample.
        log(f"distribution: Envoy RING_HASH and MAGLEV, {n_sessions} sessions x {len(sets)} host sets each")
        access = self.workdir / "dist-access.log"
        fl = {harness.free_port(): name for name in ("10", "10+1", "10-1")}
        cfg = ec.distribution(listen=harness.free_port(), admin=harness.free_port(), sets=sets, access_log=str(access),
                              filter_listeners=fl, sa_wasm=str(SA_WASM), token_key_b64=harness.TOKEN_KEY_B64,
                              ticket_key_b64=harness.TICKET_KEY_B64)
        env = start_envoy("dist", cfg, self.workdir, concurrency=2)
        env.wait_ready()
        t0 = time.time()
        jobs = []
        n_moves = min(s["move_sessions"], n_sessions)
        want_of: dict[str, int] = {}
        for name in sets:
            # Balance needs every session on the base sets; moves use the first n_moves.
            count = n_sessions if name in ("10", "50") else n_moves
            for prefix in ("ring", "maglev"):
                uris = self.workdir / f"uris-{prefix}-{name}.txt"
                uris.write_text("".join(f"http://127.0.0.1:{env.port}/{prefix}_{name}?sid={sid}\n"
                                        for sid in sessions[:count]))
                want_of[f"{prefix}_{name}"] = count
                jobs.append(["h2load", "-c1", "-m64", "-n", str(count), "-i", str(uris)])
        self.commands["dist"] = " ".join(jobs[0]).replace(str(self.workdir), "$WORK")
        # Two at a time: one per Envoy worker.
        for i in range(0, len(jobs), 2):
            ps = [subprocess.Popen(j, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for j in jobs[i:i + 2]]
            for p, job in zip(ps, jobs[i:i + 2]):
                _procs.append(p)
                out = p.communicate()[0]
                if p.returncode != 0 or not re.search(rf"\b{job[4]} succeeded", out):
                    raise SystemExit(f"h2load failed:\n{out}")
        envoy_seconds = time.time() - t0
        # Access log lines: "/ring_10?sid=s123 127.0.1.4:PORT 200" (flushed on stop).
        deadline = time.time() + 10
        want = sum(want_of.values())
        while time.time() < deadline and _count_lines(access) < want:
            time.sleep(0.2)
        seen: dict[str, dict[str, str]] = {}
        bad = 0
        with open(access) as f:
            for line in f:
                parts = line.split()
                if len(parts) != 3 or parts[2] != "200":
                    bad += 1
                    continue
                path, q = parts[0].split("?sid=")
                seen.setdefault(path[1:], {})[q] = parts[1]
        if bad:
            raise SystemExit(f"distribution: {bad} requests failed through Envoy (see {access})")
        for key, got in seen.items():
            prefix, name = key.split("_", 1)
            if len(got) != want_of[key]:
                raise SystemExit(f"distribution: {key} saw {len(got)} of {want_of[key]} sessions")
            placements["ring_hash" if prefix == "ring" else "maglev"][name] = [got[sid] for sid in sessions[:want_of[key]]]

        # 3. Cross-check a sample of the filter's placements through the real filter in Envoy.
        log(f"distribution: cross-check {s['sample']} sessions through the filter in Envoy")
        cross = self.cross_check(fl, sessions[:s["sample"]], placements)
        env.stop()

        tables = {}
        for scheme, pl in placements.items():
            tables[scheme] = {}
            for n in ("10", "50"):
                tables[scheme][n] = disruption(pl[n], pl[f"{n}+1"], pl[f"{n}-1"], sets[n], sets[f"{n}+1"], sets[f"{n}-1"],
                                               n_moves)
        self.results["distribution"] = {
            "sessions": n_sessions, "move_sessions": n_moves, "tables": tables, "ideal_balance": native["ideal_balance"],
            "cross_check": cross, "envoy_seconds": envoy_seconds, "native_seconds": native["seconds"],
            "command": self.commands["dist"],
            "sets": {k: f"{v[0]} .. {v[-1]} ({len(v)} hosts)" for k, v in sets.items()},
        }

    def cross_check(self, ports: dict[int, str], sample: list[str], placements: dict) -> dict:
        by_name = {name: port for port, name in ports.items()}
        tokens = {sid: harness.session_token(sid, ttl=3600) for sid in sample}

        def one(sid: str) -> dict:
            conns = {name: http.client.HTTPConnection("127.0.0.1", port, timeout=10) for name, port in by_name.items()}
            try:
                def get(name, headers):
                    c = conns[name]
                    c.request("GET", "/verify", headers=headers)
                    r = c.getresponse()
                    r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{name}: status {r.status}")
                    return r.getheader("x-served-by"), r.getheader("x-session-ticket")
                tok = {"x-session-token": tokens[sid]}
                first, ticket = get("10", tok)
                out = {"10": first}
                for name in ("10+1", "10-1"):
                    out[f"rendezvous {name}"] = get(name, tok)[0]
                    out[f"pinned {name}"] = get(name, {**tok, "x-session-ticket": ticket})[0]
                return out
            finally:
                for c in conns.values():
                    c.close()

        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            got = list(ex.map(one, sample))
        agree = {}
        for i, g in enumerate(got):
            pairs = [("10", placements["rendezvous"]["10"][i])]
            for name in ("10+1", "10-1"):
                pairs.append((f"rendezvous {name}", placements["rendezvous"][name][i]))
                pairs.append((f"pinned {name}", placements["pinned"][name][i]))
            for key, want in pairs:
                a = agree.setdefault(key, [0, 0])
                a[0] += g[key] == want
                a[1] += 1
        return {k: {"agree": v[0], "of": v[1]} for k, v in agree.items()}


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def disruption(base: list[str], add: list[str], rem: list[str], base_set: list[str], add_set: list[str],
               rem_set: list[str], n_moves: int) -> dict:
    """Balance over every session of `base`; moves over its first `n_moves`."""
    n = len(base_set)
    counts = {h: 0 for h in base_set}
    for h in base:
        counts[h] += 1
    mean = len(base) / n
    base, add, rem = base[:n_moves], add[:n_moves], rem[:n_moves]
    new_node = (set(add_set) - set(base_set)).pop()
    gone = (set(base_set) - set(rem_set)).pop()
    moved_add = sum(a != b for a, b in zip(base, add))
    # Moves on addition that did not go to the new node: needless.
    excess_add = sum(a != b and b != new_node for a, b in zip(base, add))
    moved_rem = sum(a != b for a, b in zip(base, rem))
    # Moves on removal of sessions that were not on the removed node: needless.
    excess_rem = sum(a != b and a != gone for a, b in zip(base, rem))
    total = len(base)
    return {
        "nodes": n,
        "balance_max_over_mean": max(counts.values()) / mean,
        "balance_min_over_mean": min(counts.values()) / mean,
        "moved_on_add": moved_add / total, "ideal_add": 1 / (n + 1), "needless_on_add": excess_add / total,
        "moved_on_remove": moved_rem / total, "ideal_remove": 1 / n, "needless_on_remove": excess_rem / total,
    }


def wasm_memories(pid: int) -> list[dict]:
    """Every V8 wasm memory of the process: the read-write mapping right before an
    8 GiB-class PROT_NONE reservation (V8's guard region)."""
    maps: list[dict] = []
    cur = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) ", line)
        if m:
            cur = {"start": int(m[1], 16), "end": int(m[2], 16), "perm": m[3]}
            maps.append(cur)
        elif cur is not None and (line.startswith("Rss:") or line.startswith("Size:")):
            cur[line.split(":")[0].lower()] = int(line.split()[1])
    out = []
    for i, c in enumerate(maps):
        if c["perm"] == "---p" and c["end"] - c["start"] >= (4 << 30):
            prev = maps[i - 1] if i else None
            if prev and prev["end"] == c["start"] and prev["perm"].startswith("rw"):
                out.append({"size_kb": prev["size"], "rss_kb": prev["rss"]})
    return out


def rss_kb(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1])


# --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 run per arm, short durations (for iteration)")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--stages", default="build,throughput,latency,hostcalls,perf,memory,dist,micro")
    ap.add_argument("--rate", type=int, default=8000, help="open-loop rate when the throughput stage is skipped")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--out", default=str(BENCH), help="where RESULTS.md, results.json, chart.svg go")
    args = ap.parse_args()
    stages = set(args.stages.split(","))
    settings = QUICK if args.quick else FULL
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="sa-bench-"))
    try:
        ensure_tools()
        if "build" in stages and not args.skip_build:
            build()
        for f in (SA_WASM, NOOP_WASM, MICRO, OPENLOOP):
            if not f.exists():
                raise SystemExit(f"{f} is missing: run without --skip-build")
        b = Bench(args, settings, workdir)
        b.results["machine"] = machine()
        b.sizes()
        b.start_backend()
        need_arms = stages & {"throughput", "latency", "hostcalls", "perf", "memory"}
        if need_arms:
            log("starting the arms: " + " ".join(ARMS))
            b.start_arms(ARMS)
            b.results["checks"] = b.check_arms()
            log("sample requests OK: every arm answers 200 and routes as intended")
        admin_body = None
        if "C1k" in b.arms:
            admin_body = workdir / "clusters-1k.json"
            admin_body.write_text(b.arms["C1k"].admin("/clusters?format=json"))
        if "throughput" in stages:
            b.throughput()
        if "latency" in stages:
            b.latency()
        if "hostcalls" in stages:
            b.hostcall_costs()
        if "perf" in stages:
            log("perf: where the worker's time goes (B, B8, C, Cm)")
            b.perf()
        if "memory" in stages:
            log(f"memory: 2 x {settings['mem_requests']} minting requests on arm C, wasm linear memory from smaps")
            b.memory()
        for p in b.arms.values():
            p.stop()
        if "dist" in stages:
            b.distribution()
        if "micro" in stages:
            b.micro(admin_body)
        b.results["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        b.results["wall_seconds"] = round(time.time() - started, 1)
        b.results["commands"] = b.commands
        b.results["load_values"] = {k: dict(v) for k, v in b.headers.items() if k in ("C", "C1k")}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(b.results, indent=1) + "\n")
        (out / "chart.svg").write_text(report.chart(b.results))
        (out / "RESULTS.md").write_text(report.markdown(b.results))
        print(report.summary(b.results))
        log(f"wrote {out / 'RESULTS.md'}, {out / 'results.json'}, {out / 'chart.svg'} "
            f"in {b.results['wall_seconds']:.0f}s")
    finally:
        _cleanup()
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
