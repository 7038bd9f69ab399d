//! `bench-micro`: native measurements of the session-affinity core, driven by
//! `bench/run.py` (see `docs/benchmarks.md`). Everything prints one JSON document.
//!
//! ```text
//! bench-micro micro [--quick] [--passes N] [--admin-body FILE [--admin-cluster NAME]]
//!                                                   microbenchmarks (ns per operation)
//! bench-micro dist --spec FILE                      placements for the distribution tables
//! ```
//!
//! The same binary built for wasm32-wasip1 runs inside V8 through `bench/v8run.js` (Node's
//! WASI), which measures the filter's logic as compiled wasm, without Envoy.
//!
//! `micro` times each operation in `runs` samples (5, or 3 with `--quick`); a sample
//! repeats the operation until at least `min_time` has passed and reports the mean time
//! per operation. The JSON gives every sample; `run.py` reports median, min and max.
//!
//! `dist` computes, through the real core (`HostSet::top_k`, and `decision::decide` /
//! `respond` for pinned mode with real tickets), where each of N sessions lands on each
//! host set of the spec. `run.py` turns placements into balance and disruption figures
//! with the same code it uses for Envoy's RING_HASH and MAGLEV.

#![forbid(unsafe_code)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use session_affinity::affinity;
use session_affinity::config::Config;
use session_affinity::decision::{self, Scratch, Served, Verdict};
use session_affinity::hosts::{HostSet, HostSpec};

const TOKEN_KEY_256: &str = "ZHyFaEazbRm+DDoK9WnS0KR5CpfWH4fC5OOVI3Bh6os=";
const TICKET_KEY: &str = "nBYDAVya04QtPEYa03ebldmm+FIHyQfCwF2oLr3ILHc=";
/// A fixed clock, inside every token's validity.
const NOW: i64 = 1_900_000_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("micro") => micro(&args[1..]),
        Some("dist") => dist(&args[1..]),
        _ => Err("usage: bench-micro micro [--quick] [--admin-body FILE] | dist --spec FILE".into()),
    };
    match result {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("bench-micro: {e}");
            std::process::exit(2);
        }
    }
}

fn flag_value(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

/// Hosts `10.<i/250>.<i%250>.1:8080`, `n` of them.
fn specs(n: usize) -> Vec<HostSpec> {
    (0..n)
        .map(|i| {
            let a = format!("10.{}.{}.1:8080", i / 250, i % 250);
            HostSpec { address: a.clone(), key: a, weight: 1, draining: false }
        })
        .collect()
}

fn plugin_config(alg: &str, secret_b64: &str, hosts: &[HostSpec], mode: &str) -> Result<Config, String> {
    let hosts: Vec<Value> = hosts.iter().map(|h| json!({"address": h.address})).collect();
    let doc = json!({
        "token": {"keys": [{"kid": "k1", "alg": alg, "secret_base64": secret_b64}], "leeway_seconds": 30},
        "on_missing": "mint",
        "on_invalid": "reject",
        "ticket": {"secret_base64": TICKET_KEY},
        "mode": mode,
        "upstream": {"fallbacks": 2, "hosts": hosts},
    });
    Config::parse(doc.to_string().as_bytes(), &|_| None).map_err(|e| e.to_string())
}

/// A secret of the length `alg` needs, base64.
fn secret_for(alg: &str) -> String {
    match alg {
        "HS384" => b64(&[7u8; 48]),
        "HS512" => b64(&[9u8; 64]),
        _ => TOKEN_KEY_256.to_string(),
    }
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].iter().enumerate() {
            if i <= chunk.len() {
                out.push(A[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Times `op` (called with an increasing counter): `runs` samples of at least `min_time`
/// each; returns ns per operation for each sample.
fn time_it(runs: usize, min_time: Duration, mut op: impl FnMut(u64)) -> Vec<f64> {
    // Warm-up: caches, branch predictors, lazy statics.
    let warm = Instant::now();
    let mut i = 0u64;
    while warm.elapsed() < min_time / 4 {
        op(i);
        i += 1;
    }
    let mut out = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let mut n = 0u64;
        loop {
            // Check the clock every 16 operations: cheap next to any operation here.
            for _ in 0..16 {
                op(i);
                i += 1;
            }
            n += 16;
            let e = start.elapsed();
            if e >= min_time {
                out.push(e.as_nanos() as f64 / n as f64);
                break;
            }
        }
    }
    out
}

fn micro(args: &[String]) -> Result<Value, String> {
    let quick = args.iter().any(|a| a == "--quick");
    let (runs, min_time) = if quick { (3, Duration::from_millis(20)) } else { (5, Duration::from_millis(80)) };
    // Under V8 (`bench/v8run.js`), a first short pass lets every hot function tier up from
    // Liftoff to TurboFan, as it has long done in a running Envoy; only the last pass counts.
    let passes: usize = flag_value(args, "--passes").and_then(|p| p.parse().ok()).unwrap_or(1).max(1);
    for _ in 1..passes {
        suite(args, 1, Duration::from_millis(10))?;
    }
    let results = suite(args, runs, min_time)?;
    Ok(json!({"runs": runs, "min_time_ms": min_time.as_millis() as u64, "passes": passes, "results": results}))
}

fn suite(args: &[String], runs: usize, min_time: Duration) -> Result<serde_json::Map<String, Value>, String> {
    let mut results = serde_json::Map::new();
    let mut put = |name: &str, unit: &str, samples: Vec<f64>, note: &str| {
        results.insert(name.to_string(), json!({"unit": unit, "samples": samples, "note": note}));
    };

    // Token validation, one configured key per algorithm.
    for alg in ["HS256", "HS384", "HS512"] {
        let cfg = plugin_config(alg, &secret_for(alg), &specs(3), "pinned")?;
        let token = cfg.validator.mint("bench-session-0123456789", NOW, 86_400).ok_or("mint failed")?;
        if cfg.validator.validate(token.as_bytes(), NOW).is_err() {
            return Err(format!("{alg} token does not validate"));
        }
        let s = time_it(runs, min_time, |_| {
            black_box(cfg.validator.validate(black_box(token.as_bytes()), NOW).is_ok());
        });
        put(&format!("token_validate_{alg}"), "ns", s, &format!("{} byte token, kid k1", token.len()));
    }

    // Ticket verification (always HS256).
    {
        let cfg = plugin_config("HS256", TOKEN_KEY_256, &specs(3), "pinned")?;
        let tc = cfg.ticket.as_ref().ok_or("no ticket config")?;
        let t = tc.tickets.issue("bench-session", 0x1234_5678_9abc_def0, NOW);
        let s = time_it(runs, min_time, |_| {
            black_box(tc.tickets.verify(black_box(t.as_bytes()), "bench-session", NOW).is_some());
        });
        put("ticket_verify", "ns", s, "HS256 ticket bound to the session");
    }

    // h64 of a session id (one SHA-256 of 22 bytes).
    {
        let sid = "AAECAwQFBgcICQoLDA0ODw";
        let s = time_it(runs, min_time, |_| {
            black_box(affinity::h64(black_box(sid.as_bytes())));
        });
        put("session_h64", "ns", s, "SHA-256 of a 22-byte session id");
    }

    // Ranking and rebuild by host count.
    for n in [3usize, 100, 1000, 10_000] {
        let set = HostSet::new(specs(n)).map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(4);
        let s = time_it(runs, min_time, |i| {
            set.top_k(affinity::fmix64(i), 3, &mut out);
            black_box(&out);
        });
        put(&format!("top_k3_{n}"), "ns", s, "best 3 hosts (primary + 2 fallbacks) for a session hash");
        let s = time_it(runs, min_time, |i| {
            black_box(set.rank(&i.to_le_bytes()));
        });
        put(&format!("rank_full_{n}"), "ns", s, "reference full ranking (tests/tools only)");
        let sp = specs(n);
        let s = time_it(runs, min_time, |_| {
            black_box(HostSet::new(black_box(sp.clone())).is_ok());
        });
        put(
            &format!("hostset_rebuild_{n}"),
            "ns",
            s,
            "HostSet::new (hash, index, weight classes) incl. clone of specs",
        );
    }

    // Admin /clusters?format=json parse.
    {
        let (body, what) = match flag_value(args, "--admin-body") {
            Some(path) => (std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?, "captured from Envoy"),
            None => (synthetic_admin_body(1000).into_bytes(), "synthetic"),
        };
        let cluster = flag_value(args, "--admin-cluster").unwrap_or_else(|| "chat_nodes".into());
        let hosts = session_affinity::admin::healthy_hosts(&body, &cluster).map_err(|e| e.to_string())?;
        let n = hosts.len();
        let s = time_it(runs, min_time, |_| {
            black_box(session_affinity::admin::healthy_hosts(black_box(&body), &cluster).map(|h| h.len()).ok());
        });
        put(
            "admin_parse_1000",
            "ns",
            s,
            &format!("{what} body, {} bytes, cluster {cluster}: {n} healthy hosts", body.len()),
        );
        let s = time_it(runs, min_time, |_| {
            let specs = session_affinity::admin::healthy_hosts(&body, &cluster).unwrap_or_default();
            black_box(HostSet::new(specs).is_ok());
        });
        put("admin_parse_and_rebuild_1000", "ns", s, "one discovery poll that sees a change");
    }

    // The whole per-request policy, natively: decide (token + ticket, pinned) and respond.
    // "hit": the same token and ticket every time, as a conversation sends them (the
    // per-VM memo answers); "miss": 4096 sessions in turn, more than the memo holds.
    for n in [3usize, 1000] {
        let hs = specs(n);
        let cfg = plugin_config("HS256", TOKEN_KEY_256, &hs, "pinned")?;
        let set = HostSet::new(hs).map_err(|e| e.to_string())?;
        let mut scratch = Scratch::new(7);
        let mut requests = Vec::new();
        for i in 0..4096 {
            let token = cfg.validator.mint(&format!("bench-session-{i:06}"), NOW, 86_400).ok_or("mint failed")?;
            let (_, ticket) = place(&cfg, &set, &token, None, &mut scratch)?;
            requests.push((token, ticket.ok_or("no ticket issued")?));
        }
        let headers_of = |(token, ticket): &(String, String)| -> Vec<(Vec<u8>, Vec<u8>)> {
            vec![
                (b":authority".to_vec(), b"bench".to_vec()),
                (b":path".to_vec(), b"/".to_vec()),
                (b":method".to_vec(), b"GET".to_vec()),
                (b":scheme".to_vec(), b"http".to_vec()),
                (b"user-agent".to_vec(), b"wrk".to_vec()),
                (b"x-session-token".to_vec(), token.as_bytes().to_vec()),
                (b"x-session-ticket".to_vec(), ticket.as_bytes().to_vec()),
            ]
        };
        let all: Vec<Vec<(Vec<u8>, Vec<u8>)>> = requests.iter().map(headers_of).collect();
        for (label, count) in [("hit", 1usize), ("miss", all.len())] {
            let mut none = decision::Given::default();
            let s = time_it(runs, min_time, |i| {
                let owned = &all[i as usize % count];
                let headers: Vec<(&[u8], &[u8])> = owned.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
                let d = decision::decide(&cfg, black_box(&headers), &set, NOW, &mut none, &mut scratch);
                if let Verdict::Forward { pending, .. } = &d.verdict {
                    let served = Served { address: pending.primary.as_deref(), status: Some(200) };
                    black_box(decision::respond(&cfg, pending, served, &set, NOW, &mut scratch.tally));
                }
                black_box(d);
            });
            put(
                &format!("request_{n}_{label}"),
                "ns",
                s,
                &format!("decide + respond, valid token and sticky ticket, pinned mode, memo {label}"),
            );
        }
    }

    Ok(results)
}

/// An admin `/clusters?format=json` body shaped like Envoy's (stats, health, weight,
/// locality), for when no captured body is given.
fn synthetic_admin_body(n: usize) -> String {
    let hosts: Vec<Value> = specs(n)
        .iter()
        .map(|h| {
            let (ip, port) = h.address.rsplit_once(':').unwrap_or(("", ""));
            let stats: Vec<Value> = ["cx_connect_fail", "cx_total", "rq_error", "rq_success", "rq_timeout", "rq_total"]
                .iter()
                .map(|s| json!({"name": s, "value": "12", "type": "COUNTER"}))
                .chain(std::iter::once(json!({"name": "cx_active", "type": "GAUGE", "value": "1"})))
                .collect();
            json!({
                "address": {"socket_address": {"address": ip, "port_value": port.parse::<u32>().unwrap_or(0)}},
                "stats": stats,
                "health_status": {"eds_health_status": "HEALTHY"},
                "weight": 1,
                "locality": {},
            })
        })
        .collect();
    json!({"cluster_statuses": [{"name": "chat_nodes", "added_via_api": false, "host_statuses": hosts}]}).to_string()
}

/// Runs one request through `decide` and `respond`: the chosen address and the ticket the
/// response would carry (if any).
fn place(
    cfg: &Config,
    set: &HostSet,
    token: &str,
    ticket: Option<&str>,
    scratch: &mut Scratch,
) -> Result<(String, Option<String>), String> {
    let mut headers: Vec<(&[u8], &[u8])> = vec![(b"x-session-token", token.as_bytes())];
    if let Some(t) = ticket {
        headers.push((b"x-session-ticket", t.as_bytes()));
    }
    let d = decision::decide(cfg, &headers, set, NOW, &mut decision::Given::default(), scratch);
    let Verdict::Forward { pending, .. } = d.verdict else { return Err("request was not forwarded".into()) };
    let primary = pending.primary.clone().ok_or("no primary")?;
    let served = Served { address: Some(&primary), status: Some(200) };
    let add = decision::respond(cfg, &pending, served, set, NOW, &mut scratch.tally);
    let t = add.into_iter().find(|(n, _)| *n == "x-session-ticket").map(|(_, v)| v);
    Ok((primary, t))
}

/// `dist --spec FILE`: spec `{"sessions": N, "prefix": "s", "sets": {"name": [addr...]},
/// "pinned": [["from", "to"], ...]}`. Session `i` is `prefix + i`.
fn dist(args: &[String]) -> Result<Value, String> {
    let path = flag_value(args, "--spec").ok_or("dist needs --spec FILE")?;
    let spec: Value = serde_json::from_slice(&std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?)
        .map_err(|e| e.to_string())?;
    let n = spec["sessions"].as_u64().ok_or("sessions")? as usize;
    let prefix = spec["prefix"].as_str().unwrap_or("s");
    let sessions: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let mut sets = std::collections::BTreeMap::new();
    for (name, addrs) in spec["sets"].as_object().ok_or("sets")? {
        let addrs: Vec<String> =
            addrs.as_array().ok_or("set")?.iter().filter_map(|a| a.as_str().map(String::from)).collect();
        sets.insert(name.clone(), addrs);
    }

    let started = Instant::now();
    // Rendezvous: the head of the ranking (what the filter picks without a ticket).
    let mut rendezvous = serde_json::Map::new();
    for (name, addrs) in &sets {
        let set = host_set(addrs)?;
        let index: std::collections::HashMap<&str, usize> =
            addrs.iter().enumerate().map(|(i, a)| (a.as_str(), i)).collect();
        let mut out = Vec::with_capacity(1);
        let mut placed = Vec::with_capacity(n);
        for s in &sessions {
            set.top_k(affinity::h64(s.as_bytes()), 1, &mut out);
            let addr = out.first().and_then(|i| set.hosts().get(*i)).map(|h| h.address.as_str()).unwrap_or("");
            placed.push(index.get(addr).copied().map_or(-1, |i| i as i64));
        }
        rendezvous.insert(name.clone(), json!(placed));
    }

    // Pinned: a first request on `from` (no ticket) gets a ticket; the next request of the
    // same session, with that ticket, runs on `to`. Both through decide/respond.
    let mut pinned = serde_json::Map::new();
    for pair in spec["pinned"].as_array().cloned().unwrap_or_default() {
        let (Some(from), Some(to)) = (pair[0].as_str(), pair[1].as_str()) else { continue };
        let (fa, ta) = (sets.get(from).ok_or("pinned from")?, sets.get(to).ok_or("pinned to")?);
        let cfg = plugin_config("HS256", TOKEN_KEY_256, &specs_of(fa), "pinned")?;
        let (fset, tset) = (host_set(fa)?, host_set(ta)?);
        let index: std::collections::HashMap<&str, usize> =
            ta.iter().enumerate().map(|(i, a)| (a.as_str(), i)).collect();
        let mut placed = Vec::with_capacity(n);
        let mut scratch = Scratch::new(1);
        for s in &sessions {
            let token = cfg.validator.mint(s, NOW, 86_400).ok_or("mint")?;
            let (_, ticket) = place(&cfg, &fset, &token, None, &mut scratch)?;
            let (addr, _) = place(&cfg, &tset, &token, ticket.as_deref(), &mut scratch)?;
            placed.push(index.get(addr.as_str()).copied().map_or(-1, |i| i as i64));
        }
        pinned.insert(format!("{from}->{to}"), json!(placed));
    }

    // The balance a perfectly uniform random placement would have (median of 201 trials).
    let mut ideal = serde_json::Map::new();
    for k in spec["ideal_balance_for"].as_array().cloned().unwrap_or_default() {
        let nodes = k.as_u64().unwrap_or(1).max(1) as usize;
        ideal.insert(nodes.to_string(), json!(ideal_balance(n, nodes, 201)));
    }
    Ok(json!({
        "sessions": n,
        "rendezvous": rendezvous,
        "pinned": pinned,
        "ideal_balance": ideal,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

fn specs_of(addrs: &[String]) -> Vec<HostSpec> {
    addrs.iter().map(|a| HostSpec { address: a.clone(), key: a.clone(), weight: 1, draining: false }).collect()
}

fn host_set(addrs: &[String]) -> Result<HostSet, String> {
    HostSet::new(specs_of(addrs)).map_err(|e| e.to_string())
}

/// Median over `trials` of max/mean when `sessions` land uniformly at random on `nodes`.
fn ideal_balance(sessions: usize, nodes: usize, trials: usize) -> f64 {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        affinity::fmix64(state)
    };
    let mut ratios: Vec<f64> = (0..trials)
        .map(|_| {
            let mut counts = vec![0u64; nodes];
            for _ in 0..sessions {
                let r = ((u128::from(next()) * nodes as u128) >> 64) as usize;
                counts[r] += 1;
            }
            let max = counts.iter().copied().max().unwrap_or(0) as f64;
            max / (sessions as f64 / nodes as f64)
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios[trials / 2]
}
