"""Turns bench/results.json into RESULTS.md, chart.svg and the console summary.

Kept apart from run.py so a results.json can be re-rendered without re-measuring:

    .venv/bin/python bench/report.py bench/results.json   # rewrites RESULTS.md and chart.svg beside it
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

ARM_LABEL = {
    "A": "A: no filter",
    "B": "B: no-op Rust proxy-wasm filter",
    "C": "C: session-affinity, 3 hosts",
    "C1k": "C1k: session-affinity, 1000 hosts",
    "D": "D: jwt_authn HS256 + hash_policy + RING_HASH",
    "E": "E: stateful_session (header)",
    "A8": "A8: no filter, override_host (header set by the route)",
    "B8": "B8: no-op + session-affinity's host calls",
    "Cm": "Cm: session-affinity, 3 hosts, 4096 sessions in turn",
    "Cp": "Cp: session-affinity with placement on",
}
SCHEME_LABEL = {"rendezvous": "session-affinity, rendezvous", "pinned": "session-affinity, pinned (tickets)",
                "ring_hash": "Envoy RING_HASH", "maglev": "Envoy MAGLEV"}

# Host calls per sticky request (valid token and ticket, no spoofed headers), counted in
# src/filter/mod.rs and src/filter/raw.rs; B8 makes exactly these. Update with the glue.
HOST_CALLS = [
    ("request headers", "proxy_get_header_map_pairs (whole map, one buffer; the host calls back proxy_on_memory_allocate)", 1, 0),
    ("request headers", "proxy_get_header_map_value (x-session-token)", 0, 1),
    ("request headers", "(the clock read on the last tick is used: no clock read per request)", 0, 0),
    ("request headers", "proxy_replace_header_map_value (override header, x-session-id, x-session-affinity / x-noop)", 3, 1),
    ("request headers", "proxy_remove_header_map_value (only for spoofed copies)", 0, 0),
    ("response headers", "proxy_get_header_map_pairs (:status and x-envoy-attempt-count in one read)", 1, 0),
    ("response headers", "proxy_get_property upstream.address (only when a retry answered)", 0, 0),
    ("response headers", "(the request's time is reused: no clock read)", 0, 0),
    ("response headers", "proxy_add_header_map_value (only when a ticket or token is issued)", 0, 0),
    ("timer", "proxy_increment_metric, ~25 per flush every 250 ms (amortized ~0 per request)", 0, 0),
]


# What limits the throughput and latency targets: the analysis behind section 1's
# "Where the time goes", kept in one place so the summary cannot drift from the method.
LIMITS = """**What limits C/B, C/D and the p99 target.** The filter's own logic is not what costs:
with the token memo hit (a conversation resends its token every turn), decide + respond
run in {hit} (section 3). What costs is the host calls
the contract requires on every request: read the request headers (to find the token and
every spoofed spelling), set three headers (override list, `x-session-id`,
`x-session-affinity`), and read the response head (`:status` for errors, and
`x-envoy-attempt-count`: when the first attempt answered, the primary served and
`upstream.address` is not asked for). That is 5 host calls against the no-op filter's 2,
at 0.5 to 1.5 µs each through V8 and Envoy (section 1, "One host call"), and Envoy's own
`override_host` routing, which B does not use ({oh}). With arm B at
about {cB:.0f} µs of CPU per request, C/B ≥ 0.92 leaves {budget:.1f} µs for everything the filter
does beyond B. Arm D runs in native C++ without the Wasm ABI at all (B − A alone is about
{abi:.0f} µs per request). The filter avoids the avoidable calls: one header-map read
instead of per-header reads on the request and on the response, no removes unless a
client spoofed a header, no clock read per request (the last tick's), the served node
from the attempt count instead of a property lookup, counters batched in VM memory and
flushed every 250 ms. The p99
figures are not measurable to tens of microseconds on this 2-core machine: the
generator's "send late p99" is milliseconds for the wasm arms B, C and D alike (the
no-op filter included), so the added p99 over B is noise of ±20 ms, not the filter."""


def f(x: float, nd: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{nd}f}"


def mmm(s: dict, nd: int = 0, scale: float = 1.0) -> str:
    """median (min–max)."""
    return f"{f(s['median'] * scale, nd)} ({f(s['min'] * scale, nd)}–{f(s['max'] * scale, nd)})"


def cost_us(arm: dict) -> float:
    """CPU microseconds of the Envoy under test per request (its CPU time / requests)."""
    return arm["sut_cpu"]["median"] * 1e6 / arm["rps"]["median"]


def _status(s: dict, goal: float, higher_is_better: bool) -> str:
    """met / missed when every run agrees; otherwise by the median, saying so."""
    ok = (lambda v: v >= goal) if higher_is_better else (lambda v: v <= goal)
    if ok(s["min"]) and ok(s["max"]):
        return "met"
    if not ok(s["min"]) and not ok(s["max"]):
        return "missed"
    return ("met" if ok(s["median"]) else "missed") + " by the median, not by every run"


def targets(r: dict) -> list[tuple[str, str, str, bool | str | None]]:
    out: list[tuple[str, str, str, bool | str | None]] = []
    tp = r.get("throughput", {}).get("ratios", {})
    cr = r.get("throughput", {}).get("cpu_ratios", {})
    for key, goal in (("C/B", 0.92), ("C/D", 1.00), ("C1k/C", 0.90)):
        if key in tp:
            v = tp[key]
            by_cpu = f"; by CPU time {cr[key]['median']:.3f} ({cr[key]['min']:.3f}–{cr[key]['max']:.3f})" if key in cr else ""
            out.append((key, f"≥ {goal:.2f}", f"{v['median']:.3f} ({v['min']:.3f}–{v['max']:.3f}){by_cpu}",
                        _status(v, goal, True)))
    lat = r.get("latency", {}).get("added_over_B", {})
    if "C" in lat:
        v = lat["C"]["p99_us"]
        out.append(("p99 added latency over B (C)", "≤ 30 µs", f"{mmm(v, 1)} µs", _status(v, 30, False)))
    d = r.get("distribution")
    if d:
        ok_bal = True
        ok_moves = True
        for n in ("10", "50"):
            t = d["tables"]["rendezvous"][n]
            ideal = d["ideal_balance"][n]
            ok_bal &= (t["balance_max_over_mean"] - 1) <= 2 * (ideal - 1)
            sessions = d.get("move_sessions", d["sessions"])
            for kind in ("add", "remove"):
                p = t[f"ideal_{kind}"]
                se = math.sqrt(p * (1 - p) / sessions)
                ok_moves &= abs(t[f"moved_on_{kind}"] - p) <= 4 * se and t[f"needless_on_{kind}"] == 0
        out.append(("rendezvous balance at the ideal (max/mean − 1 ≤ 2× a uniform random placement's)", "ideal",
                    ", ".join(f"n={n}: {d['tables']['rendezvous'][n]['balance_max_over_mean']:.4f} vs "
                              f"{d['ideal_balance'][n]:.4f}" for n in ("10", "50")), ok_bal))
        out.append(("rendezvous disruption at the ideal (within 4 s.e. of 1/(n+1), 1/n; no needless move)", "ideal",
                    ", ".join(f"n={n}: +{d['tables']['rendezvous'][n]['moved_on_add']:.4f} "
                              f"−{d['tables']['rendezvous'][n]['moved_on_remove']:.4f}" for n in ("10", "50")), ok_moves))
        pin = max(d["tables"]["pinned"][n]["moved_on_add"] for n in ("10", "50"))
        out.append(("pinned mode moves on node addition", "0", f"{pin:.4f}", pin == 0))
        cc = d.get("cross_check", {})
        if cc:
            agree = all(v["agree"] == v["of"] for v in cc.values())
            out.append(("native core = real Envoy on the cross-check sample", "all agree",
                        f"{sum(v['agree'] for v in cc.values())}/{sum(v['of'] for v in cc.values())}", agree))
    size = r.get("size", {}).get("session_affinity_wasm_bytes")
    if size:
        out.append((".wasm size", "≤ 400 KB", f"{size / 1000:.1f} KB ({size / 1024:.1f} KiB)", size <= 400_000))
    mem = r.get("memory")
    if mem:
        grow = memory_growth(mem)
        out.append(("wasm linear memory growth between the last two snapshots", "0",
                    f"{grow} KiB", grow == 0))
    return out


def status_text(ok: bool | str | None) -> str:
    if isinstance(ok, str):
        return ok
    return "met" if ok else "missed"


def memory_growth(mem: dict) -> int:
    snaps = mem["snapshots"]
    if len(snaps) < 2:
        return 0
    a, b = snaps[-2]["vms"], snaps[-1]["vms"]
    return sum(y["size_kb"] for y in b) - sum(x["size_kb"] for x in a)


def contention(r: dict) -> str:
    """A warning when the Envoy under test did not have its CPU to itself."""
    tp = r.get("throughput", {}).get("arms", {})
    low = {k: a["sut_cpu"]["min"] for k, a in tp.items() if a["sut_cpu"]["min"] < 0.85}
    load = r["machine"].get("loadavg_start", ["0"])[0]
    if not low:
        return ""
    return (f"The Envoy under test ran below 85 % of its CPU in some runs ({', '.join(f'{k} {v * 100:.0f} %' for k, v in low.items())}; "
            f"load average {load} at the start): other processes were using the machine, so requests/s and "
            f"latencies are lower and noisier than on a quiet machine. Prefer the CPU-time ratios and re-run "
            f"`make bench` on a quiet machine before quoting.")


def summary(r: dict) -> str:
    lines = ["", "session-affinity benchmarks" + (" (QUICK: 1 run, short)" if r.get("quick") else ""), ""]
    tp = r.get("throughput")
    lat = r.get("latency", {})
    if tp:
        lines.append(f"{'arm':44} {'req/s median (min-max)':>26} {'p50 µs':>9} {'p99 µs':>9}")
        for k, a in tp["arms"].items():
            la = lat.get("arms", {}).get(k)
            p50 = f(la["p50_us"]["median"]) if la else "-"
            p99 = f(la["p99_us"]["median"]) if la else "-"
            lines.append(f"{ARM_LABEL[k]:44} {mmm(a['rps']):>26} {p50:>9} {p99:>9}")
        lines.append("")
        lines.append("ratios: " + "  ".join(f"{k} {v['median']:.3f}" for k, v in tp["ratios"].items()))
        if lat:
            lines.append(f"open loop at {lat['rate']} req/s; added p99 over B: "
                         + "  ".join(f"{k} {v['p99_us']['median']:+.0f}µs" for k, v in lat["added_over_B"].items()))
    lines.append("")
    for name, goal, value, ok in targets(r):
        lines.append(f"  [{status_text(ok)}] {name}: {value} (target {goal})")
    warn = contention(r)
    if warn:
        lines.append("\nWARNING: " + warn)
    lines.append(f"\nwall time {r.get('wall_seconds', 0):.0f}s")
    return "\n".join(lines)


def markdown(r: dict) -> str:
    m = r["machine"]
    quick = r.get("quick")
    s = r["settings"]
    L: list[str] = []
    L.append("# Benchmarks\n")
    L.append("Written by `make bench` (`bench/run.py`); how to run and read it: "
             "[docs/benchmarks.md](../docs/benchmarks.md). Raw numbers: [results.json](results.json). "
             "Chart: [chart.svg](chart.svg).\n")
    if quick:
        L.append("> **QUICK RUN** (`--quick`): one run per figure and short durations. Not for quoting.\n")
    L.append("Every figure is the **median of %d runs, with (min–max)**, unless it says otherwise.\n" % s["runs"])
    L.append("![benchmark chart](chart.svg)\n")
    warn = contention(r)
    if warn:
        L.append("> **Contended run.** " + warn + "\n")

    L.append("## Machine\n")
    L.append("| | |\n|---|---|")
    for k, label in (("cpu", "CPU"), ("cpus", "CPUs"), ("memory_gib", "memory (GiB)"), ("os", "OS"), ("kernel", "kernel"),
                     ("envoy", "Envoy"), ("wrk", "wrk"), ("h2load", "h2load"), ("rustc", "rustc"), ("git", "commit"),
                     ("pinning", "CPU pinning"), ("date", "date")):
        L.append(f"| {label} | {m.get(k)} |")
    L.append(f"| load average at start / end | {' '.join(m.get('loadavg_start', []))} / "
             f"{' '.join(m.get('loadavg_end', []))} |")
    L.append(f"| wall time of this run | {r.get('wall_seconds', 0):.0f} s |\n")

    L.append("## Targets\n")
    L.append("| target | goal | measured | |\n|---|---|---|---|")
    for name, goal, value, ok in targets(r):
        st = status_text(ok)
        L.append(f"| {name} | {goal} | {value} | {st if st.startswith('met') else '**' + st + '**'} |")
    L.append("")
    tp0 = (r.get("throughput") or {}).get("arms", {})
    if "A" in tp0 and "B" in tp0:
        cA0, cB0 = cost_us(tp0["A"]), cost_us(tp0["B"])
        oh = (f"A8 − A: {cost_us(tp0['A8']) - cA0:.1f} µs per request in this run, with no wasm at all"
              if "A8" in tp0 else "arm A8 measures it")
        v8hit = r.get("micro_v8", {}).get("request_3_hit") or r.get("micro", {}).get("request_3_hit")
        hit = (f"{v8hit['median'] / 1000:.1f} µs {'of wasm in V8' if 'request_3_hit' in r.get('micro_v8', {}) else 'natively'}"
               " in this run" if v8hit else "a few microseconds")
        L.append(LIMITS.format(cB=cB0, budget=cB0 / 0.92 - cB0, abi=cB0 - cA0, oh=oh, hit=hit))
        L.append("")

    tp = r.get("throughput")
    if tp:
        L.append("## 1. Per-request cost\n")
        L.append(f"One Envoy process per arm, same binary, `--concurrency 1`, pinned to its own CPU; a fast backend "
                 f"(another Envoy with a `direct_response` route on `0.0.0.0`, which answers for every 127.x.y.z) and "
                 f"the load generator share the other CPU. Closed-loop saturation: `wrk`, one thread, "
                 f"{tp['connections']} connections, {tp['seconds']} s per run after a warm-up; the arms alternate "
                 f"{' '.join(tp.get('order', []))}, {' '.join(tp.get('order', [])[:3])} …, so drift hits every arm alike. Every arm receives the same request: a "
                 f"valid HS256 session token (`x-session-token`), the affinity ticket arm C issued for it "
                 f"(`x-session-ticket`; C1k its own) and a stateful-session header (`x-session-host`); each arm "
                 f"uses what is meant for it and forwards the rest. No retries or access logs in any arm.\n")
        L.append("```\n" + (tp.get("command") or "") + "\n```\n")
        L.append("| arm | requests/s | CPU µs per request (Envoy under test) | Envoy under test CPU | backend CPU |")
        L.append("|---|---|---|---|---|")
        for k, a in tp["arms"].items():
            L.append(f"| {ARM_LABEL[k]} | {mmm(a['rps'])} | {cost_us(a):.1f} | {mmm(a['sut_cpu'], 0, 100)} % | "
                     f"{mmm(a['backend_cpu'], 0, 100)} % |")
        L.append("")
        L.append("Ratios of requests/s, computed per run between arms that ran back to back, then median (min–max):\n")
        L.append("| ratio | requests/s | by CPU time per request |\n|---|---|---|")
        cr = tp.get("cpu_ratios", {})
        for k, v in tp["ratios"].items():
            c = cr.get(k)
            cs = f"{c['median']:.3f} ({c['min']:.3f}–{c['max']:.3f})" if c else "n/a"
            L.append(f"| {k} | {v['median']:.3f} ({v['min']:.3f}–{v['max']:.3f}) | {cs} |")
        L.append("")
        L.append("\"By CPU time\" is (CPU µs per request of the denominator arm) / (that of the numerator arm): what "
                 "the requests/s ratio would be if both ran at 100 % of their CPU. On a quiet machine the two columns "
                 "agree; when other processes take the Envoy under test's CPU away, the requests/s column drops and "
                 "this one holds better (not perfectly: a starved worker batches less and pays more per request).\n")
        L.append("The Envoy under test should be near 100 % CPU in every arm: then it, not the load generator or the "
                 "backend, sets the rate. \"CPU µs per request\" is its CPU time divided by the requests it served.\n")

    lat = r.get("latency")
    if lat:
        L.append("### Latency at a fixed rate\n")
        L.append(f"Open loop at **{lat['rate']} requests/s** (about half of A's maximum), {lat['connections']} "
                 f"keep-alive connections, {lat['seconds']} s measured after {lat['warmup_s']} s of warm-up, "
                 f"arms alternated. Load generator: `bench/micro/src/bin/openloop.rs`, because Debian's `wrk` has no "
                 f"`-R`, and `h2load --rps` starts every connection's timer together (bursts of one request per "
                 f"connection, which measured milliseconds of queueing at 50 % load) and times a request from when "
                 f"it was written, not from when it was due. `openloop` sends on a fixed schedule (one request every "
                 f"1/rate s, timerfd, no bursts) and times each request **from the moment it was due** to the end of "
                 f"its response, so waiting for a connection or for the generator itself counts against the arm (no "
                 f"coordinated omission). \"send late p99\" shows how late requests actually left.\n")
        L.append("```\n" + (lat.get("command") or "") + "\n```\n")
        L.append("| arm | p50 µs | p90 µs | p99 µs | p99.9 µs | achieved req/s | send late p99 µs |")
        L.append("|---|---|---|---|---|---|---|")
        for k, a in lat["arms"].items():
            L.append(f"| {ARM_LABEL[k]} | {mmm(a['p50_us'], 0)} | {mmm(a['p90_us'], 0)} | {mmm(a['p99_us'], 0)} | "
                     f"{mmm(a['p999_us'], 0)} | {mmm(a['achieved_rps'], 0)} | {mmm(a['late_p99_us'], 0)} |")
        L.append("")
        L.append("Added latency over B (per run: arm minus B of the same round):\n")
        L.append("| arm | added p50 µs | added p99 µs |\n|---|---|---|")
        for k, v in lat["added_over_B"].items():
            L.append(f"| {ARM_LABEL[k]} | {mmm(v['p50_us'], 1)} | {mmm(v['p99_us'], 1)} |")
        L.append("")

    an = analysis(r)
    if an:
        L.append("### Where the time goes (C against B)\n")
        L.extend(an)
        L.append("")

    d = r.get("distribution")
    if d:
        L.append("## 2. Distribution quality\n")
        L.append(f"{d['sessions']:,} distinct session ids (`s0`, `s1`, …) over host sets of 10 and 50 nodes "
                 f"(127.0.1.x and 127.0.2.x on the backend's port) for balance; \"add\" appends one node, \"remove\" "
                 f"drops the last, and moves are counted over the first {d.get('move_sessions', d['sessions']):,} "
                 f"sessions (standard error of a moved fraction near 10 %: "
                 f"{100 * math.sqrt(0.09 / d.get('move_sessions', d['sessions'])):.2f} points). Moved = sessions whose "
                 f"node differs from the base set's. Needless = moves the change does "
                 f"not require (on add: moved, but not to the new node; on remove: moved, but was not on the removed "
                 f"node).\n")
        L.append(f"- Envoy `RING_HASH` (defaults: `minimum_ring_size` 1024) and `MAGLEV` (table 65537): measured "
                 f"**through a real Envoy**: one cluster per host set, `hash_policy` on the `sid` query parameter, "
                 f"every session sent once per cluster with h2load and its `%UPSTREAM_HOST%` read from the access "
                 f"log ({d['envoy_seconds']:.0f} s). `{d['command']}`")
        L.append(f"- session-affinity: through the native core (`HostSet::top_k` for rendezvous; for pinned, "
                 f"`decision::decide` + `respond` with real tickets: a first request on the base set gets a ticket, "
                 f"the next request of the session carries it to the changed set) ({d['native_seconds']:.1f} s). "
                 f"Cross-checked against the **real filter in Envoy** on a sample: ")
        cc = d.get("cross_check", {})
        L.append("  " + ", ".join(f"{k}: {v['agree']}/{v['of']} agree" for k, v in cc.items()) + ".\n")
        for n in ("10", "50"):
            L.append(f"**{n} nodes** (ideal balance for a uniform random placement of {d['sessions']:,} sessions: "
                     f"max/mean {d['ideal_balance'][n]:.4f}, median of 201 simulations):\n")
            L.append("| scheme | balance max/mean | min/mean | moved on add (ideal) | needless on add | "
                     "moved on remove (ideal) | needless on remove |")
            L.append("|---|---|---|---|---|---|---|")
            for scheme, t in d["tables"].items():
                row = t[n]
                L.append(f"| {SCHEME_LABEL[scheme]} | {row['balance_max_over_mean']:.4f} | "
                         f"{row['balance_min_over_mean']:.4f} | {row['moved_on_add'] * 100:.2f} % "
                         f"({row['ideal_add'] * 100:.2f} %) | {row['needless_on_add'] * 100:.2f} % | "
                         f"{row['moved_on_remove'] * 100:.2f} % ({row['ideal_remove'] * 100:.2f} %) | "
                         f"{row['needless_on_remove'] * 100:.2f} % |")
            L.append("")
        L.append("Pinned mode's balance is the rendezvous balance (a session without a ticket is placed by the "
                 "ranking); on addition it moves nothing, so the new node starts empty and fills with new sessions.\n")

    mi = r.get("micro")
    if mi:
        v8 = r.get("micro_v8", {})
        L.append("## 3. Core microbenchmarks\n")
        L.append("`target/release/bench-micro micro`: each figure is the mean time per operation over ≥ 80 ms of "
                 "repetitions, median (min–max) of 5 such runs. **native**: x86-64 (the `sha2` crate uses the CPU's "
                 "SHA instructions, which wasm cannot). **wasm in V8**: the same program built for wasm32-wasip1 and "
                 f"run by {r['machine'].get('node', 'Node')} through `bench/v8run.js`, after a first pass that lets V8 "
                 "tier every hot function up to TurboFan: the filter's logic as Envoy's V8 runtime executes it, "
                 "without host calls (Envoy embeds its own V8 build, not necessarily this version; same Liftoff/TurboFan pipeline).\n")
        L.append("| operation | native | wasm in V8 | note |\n|---|---|---|---|")
        for k, v in mi.items():
            unit = "µs" if v["median"] >= 10_000 else "ns"
            scale = 1e-3 if unit == "µs" else 1
            nd = 1 if unit == "µs" else 0
            w = v8.get(k)
            ws = f"{mmm(w, nd, scale)} {unit}" if w else "n/a"
            L.append(f"| `{k}` | {mmm(v, nd, scale)} {unit} | {ws} | {v['note']} |")
        L.append("")

    sz = r.get("size")
    mem = r.get("memory")
    if sz or mem:
        L.append("## 4. Size and memory\n")
    if sz:
        L.append(f"- `session_affinity.wasm`: **{sz['session_affinity_wasm_bytes']:,} bytes** "
                 f"({sz['session_affinity_wasm_bytes'] / 1000:.1f} KB); the no-op filter: "
                 f"{sz['noop_filter_wasm_bytes']:,} bytes.")
    if mem:
        L.append("- Linear memory of every wasm VM of arm C's Envoy, read from `/proc/PID/smaps`: V8 reserves an "
                 "8 GiB guard region per wasm memory and maps the memory's current pages read-write at its start, "
                 "so that mapping's size is the VM's linear memory (`memory.grow` only adds to it) and its RSS the "
                 "pages ever touched. Envoy's admin `/stats` has no wasm memory figure (only VM counts: "
                 "`wasm.envoy.wasm.runtime.v8.active` etc.). The load is the allocation-heaviest path: requests "
                 "without a token, each minting a session (random id, signed token, two `set-cookie`s, a ticket).\n")
        L.append("| after | linear memory per VM (KiB, size / RSS) | Envoy RSS (MiB) |\n|---|---|---|")
        for snap in mem["snapshots"]:
            vms = ", ".join(f"{v['size_kb']} / {v['rss_kb']}" for v in snap["vms"])
            L.append(f"| {snap['after']} | {vms} | {snap['envoy_rss_kb'] / 1024:.0f} |")
        L.append(f"\nGrowth between the last two snapshots: **{memory_growth(mem)} KiB**. (With "
                 "`--concurrency 1` Envoy runs one VM per worker plus VMs on the main thread; the worker's is the "
                 "one whose RSS moves.)\n")

    L.append("## Exact commands\n")
    cmds = r.get("commands", {})
    L.append("```")
    L.append("make bench                      # = .venv/bin/python bench/run.py (builds first)")
    L.append(".venv/bin/python bench/run.py --quick")
    for k, v in cmds.items():
        L.append(f"# {k}\n{v}")
    L.append("```")
    L.append("`$TOKEN`, `$TICKET` and `$STATE_HOST_B64` are in results.json (`load_values`); `$PORT` is a free port "
             "chosen per run.\n")
    return "\n".join(L) + "\n"


def analysis(r: dict) -> list[str]:
    tp = r.get("throughput", {}).get("arms", {})
    if not all(k in tp for k in ("A", "B", "C")):
        return []
    cA, cB, cC = cost_us(tp["A"]), cost_us(tp["B"]), cost_us(tp["C"])
    pf0 = r.get("perf", {}).get("by_dso", {})
    jit = {k: cost_us(tp[k]) * v.get("JIT (wasm code)", 0) / 100 for k, v in pf0.items() if k in tp}
    L = []
    if contention(r):
        L.append("> This run was contended (see the warning above): the differences of CPU µs per request below "
                 "carry several µs of noise, and can even come out negative. The per-call prices (16 calls per "
                 "request amplify the signal), the perf shares (within one process) and the V8 microbenchmarks "
                 "(single-threaded) hold up better.\n")
    per_run = {k: [c * 1e6 / q for c, q in zip(a["sut_cpu"]["runs"], a["rps"]["runs"])] for k, a in tp.items()}
    L.append("CPU µs per request of the Envoy under test, median (min–max) over the runs: "
             + ", ".join(f"{k} {statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})" for k, v in per_run.items())
             + ".\n")
    L.append(f"- **The wasm ABI floor** (B − A): {cB - cA:.1f} µs per request: a VM entry per callback "
             "(context create, request headers, response headers, response body, log, done, delete) and B's two host "
             "calls. session-affinity pays it too; it is what C/B does not count.")
    if "A8" in tp:
        cA8 = cost_us(tp["A8"])
        L.append(f"- **Envoy's override_host routing** (A8 − A): {cA8 - cA:.1f} µs. A8 is arm A behind C's "
                 "`override_host` cluster of 3 hosts, the override list set natively by the route: Envoy reads and "
                 "parses the header and looks the host up instead of round robin over one. C and B8 pay it, A and "
                 "B do not, so it counts against C/B although no wasm runs in it.")
    if "B8" in tp:
        cB8 = cost_us(tp["B8"])
        L.append(f"- **Host calls and override_host routing** (B8 − B): {cB8 - cB:.1f} µs. B8 is the no-op "
                 "filter making exactly session-affinity's host calls on a sticky request, setting the same header "
                 "values, behind the same `override_host` cluster of 3 hosts, and nothing else (table below): "
                 f"{sum(x[2] for x in HOST_CALLS)} host calls instead of 2, three of which return a buffer (the host calls back into the VM to allocate "
                 "it), and Envoy parses the override list and picks that host instead of round robin over one."
                 + (f" Without the override_host routing (B8 − B − (A8 − A)), the host calls alone: "
                    f"{cB8 - cB - (cA8 - cA):.1f} µs." if "A8" in tp else ""))
        L.append(f"- **Logic inside the VM** (C − B8): {cC - cB8:.1f} µs: header-map parsing, the token and ticket "
                 "(memo hit here: a hash and a comparison each), ranking, building the header values, the "
                 "response-side bookkeeping, allocations.")
    mi = r.get("micro", {})
    v8 = r.get("micro_v8", {})
    src = v8 if "request_3_hit" in v8 else mi
    where = "in V8 (wasm, `micro_v8`)" if src is v8 else "natively"
    if "request_3_hit" in src:
        g = lambda k: src.get(k, {}).get("median", float("nan")) / 1000  # noqa: E731
        L.append(f"- The filter's own logic measured {where}: decide + respond for a sticky request "
                 f"{g('request_3_hit'):.1f} µs with the memo hit (same token and ticket as last time: arm C), "
                 f"{g('request_3_miss'):.1f} µs when both must be verified (arm Cm), {g('request_1000_hit'):.1f} µs "
                 f"with 1000 hosts (arm C1k; `top_k` over 1000 hosts alone {g('top_k3_1000'):.1f} µs). A full check "
                 f"costs token {g('token_validate_HS256'):.1f} µs + ticket {g('ticket_verify'):.1f} µs: base64, two "
                 f"JSON objects and an HMAC-SHA256 each, in software SHA-256 under wasm.")
        if "Cm" in tp and "C" in tp:
            L.append(f"- **Memo miss** (Cm − C): {cost_us(tp['Cm']) - cC:.1f} µs per request through Envoy.")
        if "C1k" in tp:
            L.append(f"- **1000 hosts** (C1k − C): {cost_us(tp['C1k']) - cC:.1f} µs per request through Envoy: the "
                     "ranking's one `fmix64` per host, and Envoy's own `override_host` lookup in a bigger host map.")
    pf = r.get("perf", {}).get("by_dso")
    if pf:
        L.append("- `perf record -e cpu-clock` on the worker under load (share of samples):\n")
        cols = sorted({k for v in pf.values() for k in v}, key=lambda k: -max(v.get(k, 0) for v in pf.values()))[:6]
        L.append("  | arm | " + " | ".join(cols) + " |")
        L.append("  |---|" + "---|" * len(cols))
        for arm, v in pf.items():
            L.append(f"  | {arm} | " + " | ".join(f"{v.get(c, 0):.1f} %" for c in cols) + " |")
        L.append("\n  `JIT (wasm code)` is the filter compiled by V8 (with the SDK's dispatch and the allocator); V8's "
                 "runtime and the host-call implementations are inside `envoy` (stripped, so not split further).")
        if jit:
            L.append("  Time in wasm code per request (share × CPU µs per request): "
                     + ", ".join(f"{k} {v:.1f} µs" for k, v in jit.items())
                     + ". The rest of each arm's cost is Envoy and the kernel.")
    hc = r.get("hostcalls", {}).get("per_call_us")
    if hc:
        L.append(f"- **One host call** (arm B plus {r['hostcalls']['repeat']} calls of one kind per request, against B, "
                 "CPU µs per request difference / " + str(r["hostcalls"]["repeat"]) + "):\n")
        L.append("  | host call | µs per call |\n  |---|---|")
        names = {"pairs": "proxy_get_header_map_pairs (request headers)", "get": "proxy_get_header_map_value",
                 "replace": "proxy_replace_header_map_value", "time": "proxy_get_current_time_nanoseconds",
                 "property": "proxy_get_property upstream.address"}
        for k, v in hc.items():
            L.append(f"  | {names.get(k, k)} | {mmm(v, 2)} |")
        est = (hc.get("pairs", {}).get("median", 0) + hc.get("time", {}).get("median", 0)
               + 3 * hc.get("replace", {}).get("median", 0) + hc.get("property", {}).get("median", 0)
               + hc.get("get", {}).get("median", 0))
        base = hc.get("get", {}).get("median", 0) + hc.get("replace", {}).get("median", 0)
        L.append(f"\n  C's {sum(x[2] for x in HOST_CALLS)} calls at these prices: about {est:.1f} µs per request, against {base:.1f} µs for B's 2 "
                 f"(`:status` priced as a header get).")
        top = max(hc, key=lambda k: hc[k]["median"])
        if jit and "C" in jit and "B" in jit:
            extra_calls = est - base
            extra_jit = jit["C"] - jit["B"]
            L.append(f"\n  **So, C against B:** about {extra_calls:.1f} µs of extra host calls plus about "
                     f"{extra_jit:.1f} µs of extra wasm code per request, against a measured C − B of {cC - cB:.1f} µs "
                     "(which also holds Envoy's `override_host` routing, and this run's noise). "
                     + ("The host calls, more than the filter's logic, are what separates C from B"
                        if extra_calls >= extra_jit else
                        "The filter's wasm code, more than its host calls, is what separates C from B")
                     + f"; the priciest single call is {names.get(top, top)} ({hc[top]['median']:.2f} µs).")
    L.append("\nHost calls per sticky request (read from `src/filter/mod.rs`; what B8 replays):\n")
    L.append("| phase | host call | C | B |\n|---|---|---|---|")
    for phase, call, c, b in HOST_CALLS:
        L.append(f"| {phase} | {call} | {c} | {b} |")
    L.append(f"| | **total** | **{sum(x[2] for x in HOST_CALLS)}** | **{sum(x[3] for x in HOST_CALLS)}** |")
    return L


# --------------------------------------------------------------------------------------
# The chart: hand-written SVG.


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def chart(r: dict) -> str:
    W = 960
    parts: list[str] = []
    y = 0

    def text(x, y, s, size=12, anchor="start", weight="normal", fill="#222"):
        parts.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
                     f'font-weight="{weight}" fill="{fill}">{_esc(s)}</text>')

    def rect(x, y, w, h, fill):
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{h:.1f}" fill="{fill}"/>')

    def line(x1, y1, x2, y2, stroke="#222", width=1, dash=None):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}" '
                     f'stroke-width="{width}"{d}/>')

    colors = {"A": "#9e9e9e", "B": "#607d8b", "A8": "#bdbdbd", "B8": "#90a4ae", "C": "#1e88e5", "C1k": "#64b5f6", "D": "#ef6c00",
              "E": "#8e24aa", "Cm": "#1565c0", "Cp": "#26a69a"}
    title = "session-affinity benchmarks" + (" (quick run)" if r.get("quick") else "")
    text(20, 28, title, 18, weight="bold")
    ev = r["machine"].get("envoy", "")
    ev = ev.split("/")[1] if ev.count("/") >= 2 else ev
    text(20, 46, f"Envoy {ev} · {r['machine'].get('cpu', '')} × {r['machine'].get('cpus', '')} · median of "
                 f"{r['settings']['runs']} runs, whiskers min–max", 11, fill="#555")
    y = 70
    tp = r.get("throughput")
    if tp:
        text(20, y, "Throughput, one worker (requests/s, closed loop)", 14, weight="bold")
        y += 12
        arms = list(tp["arms"].items())
        vmax = max(a["rps"]["max"] for _, a in arms) * 1.05
        x0, x1 = 330, W - 160
        for k, a in arms:
            bh = 18
            y += 6
            text(x0 - 8, y + 13, ARM_LABEL[k], 11, anchor="end")
            w = (x1 - x0) * a["rps"]["median"] / vmax
            rect(x0, y, w, bh, colors.get(k, "#999"))
            line(x0 + (x1 - x0) * a["rps"]["min"] / vmax, y + bh / 2, x0 + (x1 - x0) * a["rps"]["max"] / vmax,
                 y + bh / 2, "#000", 1.5)
            ratio = a["rps"]["median"] / tp["arms"]["A"]["rps"]["median"] if "A" in tp["arms"] else 0
            tx = max(x0 + w, x0 + (x1 - x0) * a["rps"]["max"] / vmax)
            text(tx + 6, y + 13, f"{a['rps']['median']:,.0f}  ({ratio:.2f}×A)", 11)
            y += bh
        y += 14
        rt = tp["ratios"]
        text(x0, y, "   ".join(f"{k} = {rt[k]['median']:.3f}" for k in ("C/A", "C/B", "C/D", "C/E", "C1k/C") if k in rt),
             12, weight="bold")
        y += 26
    lat = r.get("latency")
    if lat:
        text(20, y, f"Latency at {lat['rate']:,} requests/s, open loop (µs; bar p50, tick p99)", 14, weight="bold")
        y += 12
        arms = list(lat["arms"].items())
        vmax = max(a["p99_us"]["median"] for _, a in arms) * 1.15
        x0, x1 = 330, W - 120
        for k, a in arms:
            bh = 14
            y += 6
            text(x0 - 8, y + 11, ARM_LABEL[k], 11, anchor="end")
            rect(x0, y, (x1 - x0) * a["p50_us"]["median"] / vmax, bh, colors.get(k, "#999"))
            px = x0 + (x1 - x0) * a["p99_us"]["median"] / vmax
            line(px, y - 2, px, y + bh + 2, "#000", 2)
            line(x0, y + bh / 2, px, y + bh / 2, "#000", 0.5, "2,2")
            text(px + 6, y + 11, f"p50 {a['p50_us']['median']:,.0f} · p99 {a['p99_us']['median']:,.0f}", 11)
            y += bh
        y += 30
    d = r.get("distribution")
    if d:
        text(20, y, f"Disruption: sessions moved when one node is added / removed ({d.get('move_sessions', d['sessions']):,} sessions; "
                    f"dashed = ideal 1/(n+1), 1/n)", 14, weight="bold")
        y += 16
        schemes = list(d["tables"].keys())
        scol = {"rendezvous": "#1e88e5", "pinned": "#43a047", "ring_hash": "#ef6c00", "maglev": "#8e24aa"}
        groups = [(n, kind) for n in ("10", "50") for kind in ("add", "remove")]
        gw = (W - 80) / len(groups)
        vmax = max(max(d["tables"][s][n][f"moved_on_{k}"] for s in schemes for n, k in groups),
                   max(d["tables"]["rendezvous"][n][f"ideal_{k}"] for n, k in groups)) * 1.15
        ph = 150
        base_y = y + ph
        for gi, (n, kind) in enumerate(groups):
            gx = 50 + gi * gw
            bw = (gw - 30) / len(schemes)
            for si, s in enumerate(schemes):
                v = d["tables"][s][n][f"moved_on_{kind}"]
                h = ph * v / vmax
                rect(gx + si * bw, base_y - h, bw - 4, h, scol.get(s, "#999"))
                text(gx + si * bw + (bw - 4) / 2, base_y - h - 3, f"{v * 100:.1f}", 9, anchor="middle")
            ideal = d["tables"]["rendezvous"][n][f"ideal_{kind}"]
            iy = base_y - ph * ideal / vmax
            line(gx - 4, iy, gx + len(schemes) * bw, iy, "#000", 1.2, "5,3")
            text(gx + (len(schemes) * bw) / 2, base_y + 16, f"{n} nodes, {kind} (%)", 11, anchor="middle")
        line(40, base_y, W - 30, base_y, "#444")
        y = base_y + 36
        lx = 50
        for s in schemes:
            rect(lx, y - 10, 12, 12, scol.get(s, "#999"))
            text(lx + 16, y, SCHEME_LABEL[s], 11)
            lx += 16 + 7 * len(SCHEME_LABEL[s]) + 24
        y += 24
        text(20, y, "Balance: max/mean sessions per node (lower is better; dashed = uniform random placement)", 14,
             weight="bold")
        y += 12
        x0, x1 = 330, W - 120
        vmin = 1.0
        vmax = max(d["tables"][s][n]["balance_max_over_mean"] for s in schemes for n in ("10", "50")) * 1.02
        for n in ("10", "50"):
            for s in schemes:
                y += 4
                v = d["tables"][s][n]["balance_max_over_mean"]
                text(x0 - 8, y + 11, f"{SCHEME_LABEL[s]}, {n} nodes", 11, anchor="end")
                rect(x0, y, (x1 - x0) * (v - vmin) / (vmax - vmin), 13, scol.get(s, "#999"))
                text(x0 + (x1 - x0) * (v - vmin) / (vmax - vmin) + 6, y + 11, f"{v:.3f}", 11)
                y += 13
            ideal = d["ideal_balance"][n]
            ix = x0 + (x1 - x0) * (ideal - vmin) / (vmax - vmin)
            line(ix, y - 4 * 17, ix, y + 2, "#000", 1.2, "5,3")
            y += 8
        text(x0, y + 14, "axis starts at 1.0 (perfect balance)", 10, fill="#555")
        y += 30
    H = y + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
            f'font-family="Helvetica, Arial, sans-serif">\n<rect width="{W}" height="{H}" fill="white"/>\n'
            + "\n".join(parts) + "\n</svg>\n")


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("results.json"))
    res = json.loads(src.read_text())
    src.with_name("RESULTS.md").write_text(markdown(res))
    src.with_name("chart.svg").write_text(chart(res))
    print(summary(res))
