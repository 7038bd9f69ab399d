//! Placement under load (DESIGN section 10) through the per-request policy: `decide` with
//! loads and load reports in the VM's [`LoadBook`], natively, against the formula and the
//! independent reference ranking (`HostSet::rank`).

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::json;
use session_affinity::config::{Config, Hosts};
use session_affinity::decision::{
    decide_at, observe_load, respond, served_node, Decision, Given, Pending, Scratch, Served, Verdict,
};
use session_affinity::headers::Header;
use session_affinity::hosts::{node_id, HostSet, HostSpec};
use session_affinity::jws::{self, Alg, MacKey};
use session_affinity::metrics::{Counter, Outcome};

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const TICKET_KEY: &str = "nBYDAVya04QtPEYa03ebldmm+FIHyQfCwF2oLr3ILHc=";
const NOW_MS: u64 = 1_790_000_000_000;
const NOW: i64 = 1_790_000_000;

fn config(placement: serde_json::Value, extra: serde_json::Value) -> Config {
    let mut base = json!({
        "token": {"keys": [{"kid": "k1", "alg": "HS256", "secret_base64": KEY}]},
        "ticket": {"secret_base64": TICKET_KEY},
        "upstream": {"fallbacks": 2, "hosts": [{"address": "127.0.0.1:8001"}, {"address": "127.0.0.1:8002"},
                               {"address": "127.0.0.1:8003"}, {"address": "127.0.0.1:8004"}]},
        "placement": placement,
    });
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    Config::parse(base.to_string().as_bytes(), &|_| None).unwrap()
}

fn static_set(cfg: &Config) -> HostSet {
    match &cfg.hosts {
        Hosts::Static(s) => s.clone(),
        _ => panic!("static hosts expected"),
    }
}

/// A set like discovery builds it, with draining hosts marked.
fn discovered(draining: &[&str]) -> HostSet {
    let specs = (1..=4)
        .map(|i| {
            let a = format!("127.0.0.1:800{i}");
            HostSpec { key: a.clone(), draining: draining.contains(&a.as_str()), address: a, weight: 1 }
        })
        .collect();
    HostSet::new(specs).unwrap()
}

fn key(b64: &str) -> MacKey {
    use base64::Engine as _;
    MacKey::new(Alg::HS256, &base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap()
}

fn token(sid: &str) -> String {
    jws::sign(&key(KEY), br#"{"alg":"HS256","kid":"k1"}"#, json!({"sid": sid, "exp": NOW + 600}).to_string().as_bytes())
}

fn ticket(sid: &str, node: u64) -> String {
    let claims = json!({"sid": sid, "node": node_id(node), "iat": NOW, "exp": NOW + 600});
    jws::sign(&key(TICKET_KEY), br#"{"alg":"HS256","typ":"JWT"}"#, claims.to_string().as_bytes())
}

/// A VM's scratch following `set`.
fn scratch(set: &HostSet) -> Scratch {
    let mut s = Scratch::new(1);
    s.load.align(&set.hosts().iter().map(|h| h.h64).collect::<Vec<_>>());
    s
}

fn request<'c>(cfg: &'c Config, set: &HostSet, sid: &str, tick: Option<u64>, s: &mut Scratch) -> Decision<'c> {
    let tok = token(sid);
    let tic = tick.map(|n| ticket(sid, n));
    let mut hs: Vec<(&str, &str)> = vec![("x-session-token", tok.as_str())];
    if let Some(t) = &tic {
        hs.push(("x-session-ticket", t.as_str()));
    }
    let hs: Vec<Header<'_>> = hs.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())).collect();
    decide_at(cfg, &hs, set, NOW_MS, &mut Given::default(), s)
}

fn forwarded<'a>(d: &'a Decision<'_>) -> (Vec<&'a str>, &'a str, &'a Pending, Option<&'a str>) {
    match &d.verdict {
        Verdict::Forward { set, pending } => {
            let get = |name: &str| set.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());
            let order = get("x-gateway-destination-endpoint").unwrap().split(',').collect();
            (order, get("x-session-affinity").unwrap(), pending, get("endpoint-load-metrics-format"))
        }
        Verdict::Reply(r) => panic!("expected forward, got {} {}", r.status, r.body),
    }
}

fn addr(set: &HostSet, i: usize) -> &str {
    &set.hosts()[i].address
}

/// A session id whose ranking over `set` starts with host index `first`.
fn sid_ranked_first(set: &HostSet, first: usize) -> String {
    (0..).map(|i| format!("s-{i}")).find(|s| set.rank(s.as_bytes())[0] == first).unwrap()
}

/// Loads `set` with `loads[i]` requests in flight on host `i` (this VM's own).
fn load(s: &mut Scratch, loads: &[u32]) {
    for (i, n) in loads.iter().enumerate() {
        for _ in 0..*n {
            s.load.routed(i);
        }
    }
}

#[test]
fn placement_needs_pinned_mode_and_a_ticket_and_checks_its_keys() {
    let base = |placement: serde_json::Value, extra: serde_json::Value| {
        let mut doc = json!({
            "token": {"keys": [{"kid": "k1", "alg": "HS256", "secret_base64": KEY}]},
            "ticket": {"secret_base64": TICKET_KEY},
            "upstream": {"hosts": [{"address": "127.0.0.1:8001"}]},
            "placement": placement,
        });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                doc.as_object_mut().unwrap().remove(k);
            } else {
                doc[k] = v.clone();
            }
        }
        Config::parse(doc.to_string().as_bytes(), &|_| None).err().map(|e| e.to_string())
    };
    for (placement, extra, want) in [
        (
            json!({"balance_factor": 150}),
            json!({"mode": "rendezvous"}),
            Some("placement: needs `mode: \"pinned\"` and a `ticket`"),
        ),
        (
            json!({"balance_factor": 150}),
            json!({"ticket": null}),
            Some("placement: needs `mode: \"pinned\"` and a `ticket`"),
        ),
        (json!({}), json!({}), Some("placement: set at least one of")),
        (json!({"balance_factor": 100}), json!({}), Some("placement.balance_factor: must be 101-1000")),
        (json!({"balance_factor": 1001}), json!({}), Some("placement.balance_factor: must be 101-1000")),
        (json!({"balance_factor": 1.5}), json!({}), Some("placement.balance_factor: invalid type")),
        (
            json!({"saturation": {"threshold": 0}}),
            json!({}),
            Some("placement.saturation.threshold: must be a number above 0"),
        ),
        (json!({"saturation": {"threshold": -1}}), json!({}), Some("placement.saturation.threshold")),
        (json!({"saturation": {"metric": ""}}), json!({}), Some("placement.saturation.metric")),
        (json!({"saturation": {"metric": "a=b"}}), json!({}), Some("placement.saturation.metric")),
        (json!({"saturation": {"stale_ms": 0}}), json!({}), Some("placement.saturation.stale_ms: must be at least 1")),
        (json!({"saturation": {"spil": true}}), json!({}), Some("placement.saturation.spil: unknown field")),
        (json!({"drain": "yes"}), json!({}), Some("placement.drain: invalid type")),
        (json!({"balance_factor": 101}), json!({}), None),
        (json!({"balance_factor": 1000, "saturation": {}, "drain": true}), json!({}), None),
        (json!({"drain": false}), json!({}), None),
    ] {
        let got = base(placement.clone(), extra.clone());
        match (&got, want) {
            (None, None) => {}
            (Some(g), Some(w)) => assert!(g.contains(w), "{placement} {extra}: got {g:?}, want {w:?}"),
            _ => panic!("{placement} {extra}: got {got:?}, want {want:?}"),
        }
    }
    let cfg = config(json!({"saturation": {}}), json!({}));
    let s = cfg.placement.unwrap().saturation.unwrap();
    assert_eq!((s.metric.as_str(), s.threshold, s.stale_ms, s.spill), ("kv_cache_usage_perc", 0.9, 5000, false));
}

#[test]
fn new_sessions_follow_the_ranking_while_loads_are_balanced() {
    let cfg = config(json!({"balance_factor": 150}), json!({}));
    let set = static_set(&cfg);
    let mut s = scratch(&set);
    for i in 0..40 {
        let sid = format!("even-{i}");
        let d = request(&cfg, &set, &sid, None, &mut s);
        let (order, affinity, pending, ask) = forwarded(&d);
        let rank = set.rank(sid.as_bytes());
        assert_eq!(order, rank.iter().take(3).map(|i| addr(&set, *i)).collect::<Vec<_>>(), "{sid}");
        assert_eq!((affinity, ask), ("new", None));
        // The request counts on its node until it ends.
        s.load.finished(pending.in_flight.unwrap());
    }
    assert_eq!(s.tally.get(Counter::PlacementFirstChoice), 40);
    assert_eq!(s.tally.get(Counter::PlacementBounded), 0);
}

#[test]
fn a_new_session_goes_down_its_ranking_past_overloaded_nodes() {
    let cfg = config(json!({"balance_factor": 150}), json!({}));
    let set = static_set(&cfg);
    // Loads 8, 8, 0, 0 on hosts 0..3: L = 16, W = 4, bound ⌈1.5 × 17 / 4⌉ = 7, so hosts 0
    // and 1 (8 + 1 > 7) are passed over.
    for (first, want_bounded) in [(0usize, true), (1, true), (2, false), (3, false)] {
        let mut s = scratch(&set);
        load(&mut s, &[8, 8, 0, 0]);
        let sid = sid_ranked_first(&set, first);
        let rank = set.rank(sid.as_bytes());
        let d = request(&cfg, &set, &sid, None, &mut s);
        let (order, affinity, pending, _) = forwarded(&d);
        let chosen = *rank.iter().find(|&&i| i >= 2).unwrap();
        let want_first = if want_bounded { chosen } else { first };
        assert_eq!(order[0], addr(&set, want_first), "{sid} ranked {rank:?}");
        // The fallbacks: the ranking's next nodes other than the chosen one.
        let fallbacks: Vec<&str> = rank.iter().filter(|&&i| i != want_first).take(2).map(|i| addr(&set, *i)).collect();
        assert_eq!(order[1..], fallbacks[..]);
        assert_eq!(affinity, "new");
        assert_eq!(s.tally.get(Counter::PlacementBounded), u64::from(want_bounded));
        assert_eq!(s.tally.get(Counter::PlacementFirstChoice), u64::from(!want_bounded));
        // Routed: its node carries one more request until it ends.
        assert_eq!(s.load.load(want_first), [8, 8, 0, 0][want_first] + 1);
        s.load.finished(pending.in_flight.unwrap());
        assert_eq!(s.load.load(want_first), [8, 8, 0, 0][want_first]);
    }
}

#[test]
fn pinned_sessions_never_move_for_balance_alone() {
    let cfg = config(json!({"balance_factor": 101}), json!({}));
    let set = static_set(&cfg);
    let mut s = scratch(&set);
    load(&mut s, &[50, 0, 0, 0]);
    let sid = sid_ranked_first(&set, 0);
    let d = request(&cfg, &set, &sid, Some(set.hosts()[0].h64), &mut s);
    let (order, affinity, _, _) = forwarded(&d);
    assert_eq!((order[0], affinity), (addr(&set, 0), "sticky"));
    // Its ticket names another node: still that node, however loaded.
    let d = request(&cfg, &set, &sid, Some(set.hosts()[3].h64), &mut s);
    let (order, affinity, _, _) = forwarded(&d);
    assert_eq!((order[0], affinity), (addr(&set, 3), "sticky"));
    assert_eq!(s.tally.get(Counter::PlacementFirstChoice) + s.tally.get(Counter::PlacementBounded), 0);
    // Its node gone (not in the set): placed like a new session, bounded.
    let three = HostSet::new(set.specs()[..3].to_vec()).unwrap();
    let mut s3 = scratch(&three);
    load(&mut s3, &[50, 0, 0]);
    let d = request(&cfg, &three, &sid, Some(set.hosts()[3].h64), &mut s3);
    let (order, affinity, _, _) = forwarded(&d);
    assert_ne!(order[0], addr(&three, 0));
    assert_eq!(affinity, "moved");
    assert_eq!(s3.tally.get(Counter::PlacementBounded), 1);
}

#[test]
fn saturated_nodes_take_no_new_session_and_spill_moves_pinned_ones() {
    let sat = json!({"metric": "kv_cache_usage_perc", "threshold": 0.9, "stale_ms": 5000, "spill": true});
    let cfg = config(json!({"saturation": sat}), json!({}));
    let set = static_set(&cfg);
    let mut s = scratch(&set);
    let sid = sid_ranked_first(&set, 0);
    let rank = set.rank(sid.as_bytes());
    let report = |s: &mut Scratch, host: usize, value: f64, at_ms: u64| {
        let text = format!("TEXT named_metrics.kv_cache_usage_perc={value}, named_metrics.num_requests_waiting=3");
        observe_load(&cfg, Some(set.hosts()[host].h64), Some(text.as_bytes()), at_ms, &mut s.load);
    };
    report(&mut s, 0, 0.95, NOW_MS - 100);

    // New: passed over (one skip), and the request asks for a load report.
    let d = request(&cfg, &set, &sid, None, &mut s);
    let (order, affinity, pending, ask) = forwarded(&d);
    assert_eq!((order[0], affinity, ask), (addr(&set, rank[1]), "new", Some("TEXT")));
    assert!(pending.strip_load_report);
    assert_eq!(s.tally.get(Counter::PlacementBounded), 1);
    assert_eq!(s.tally.get(Counter::PlacementSaturatedSkips), 1);

    // Pinned to the saturated node: spilled to its next usable node, told it moved.
    let d = request(&cfg, &set, &sid, Some(set.hosts()[0].h64), &mut s);
    let (order, affinity, _, _) = forwarded(&d);
    assert_eq!((order[0], affinity), (addr(&set, rank[1]), "moved"));
    assert_eq!(s.tally.get(Counter::PlacementSpilled), 1);
    match &d.verdict {
        Verdict::Forward { set: hs, .. } => {
            assert!(hs.contains(&("x-session-previous-node", node_id(set.hosts()[0].h64))));
        }
        Verdict::Reply(_) => unreachable!(),
    }

    // A stale report no longer counts: exactly stale_ms old still does, one ms more not.
    let mut s2 = scratch(&set);
    report(&mut s2, 0, 0.95, NOW_MS - 5000);
    assert_eq!(forwarded(&request(&cfg, &set, &sid, None, &mut s2)).0[0], addr(&set, rank[1]));
    let mut s3 = scratch(&set);
    report(&mut s3, 0, 0.95, NOW_MS - 5001);
    assert_eq!(forwarded(&request(&cfg, &set, &sid, None, &mut s3)).0[0], addr(&set, 0));
    // Under the threshold, and malformed reports: ignored.
    let mut s4 = scratch(&set);
    report(&mut s4, 0, 0.89, NOW_MS);
    observe_load(
        &cfg,
        Some(set.hosts()[0].h64),
        Some(b"TEXT named_metrics.kv_cache_usage_perc=nan"),
        NOW_MS,
        &mut s4.load,
    );
    observe_load(&cfg, Some(set.hosts()[0].h64), Some(&[0xffu8; 5000][..]), NOW_MS, &mut s4.load);
    assert_eq!(forwarded(&request(&cfg, &set, &sid, Some(set.hosts()[0].h64), &mut s4)).0[0], addr(&set, 0));

    // Every node saturated: nobody spills, new sessions follow the ranking.
    let mut s5 = scratch(&set);
    for i in 0..4 {
        report(&mut s5, i, 1.0, NOW_MS);
    }
    let d = request(&cfg, &set, &sid, Some(set.hosts()[0].h64), &mut s5);
    let (order, affinity, _, _) = forwarded(&d);
    assert_eq!((order[0], affinity), (addr(&set, 0), "sticky"));
    assert_eq!(forwarded(&request(&cfg, &set, &sid, None, &mut s5)).0[0], addr(&set, 0));
    assert_eq!(s5.tally.get(Counter::PlacementSpilled), 0);
}

#[test]
fn without_spill_a_pinned_session_stays_on_its_saturated_node() {
    let cfg = config(json!({"saturation": {"threshold": 0.5}}), json!({}));
    let set = static_set(&cfg);
    let mut s = scratch(&set);
    observe_load(
        &cfg,
        Some(set.hosts()[2].h64),
        Some(b"TEXT named_metrics.kv_cache_usage_perc=0.7"),
        NOW_MS,
        &mut s.load,
    );
    let sid = sid_ranked_first(&set, 2);
    let d = request(&cfg, &set, &sid, Some(set.hosts()[2].h64), &mut s);
    let (order, affinity, _, _) = forwarded(&d);
    assert_eq!((order[0], affinity), (addr(&set, 2), "sticky"));
    assert_ne!(forwarded(&request(&cfg, &set, &sid, None, &mut s)).0[0], addr(&set, 2));
}

#[test]
fn draining_nodes_keep_their_sessions_take_no_new_ones_and_are_never_fallbacks() {
    let cfg = config(json!({"drain": true}), json!({}));
    let set = discovered(&["127.0.0.1:8002"]);
    let draining = set.by_address("127.0.0.1:8002").unwrap();
    let mut s = scratch(&set);
    for i in 0..30 {
        let sid = format!("d-{i}");
        let rank = set.rank(sid.as_bytes());
        let d = request(&cfg, &set, &sid, None, &mut s);
        let (order, affinity, _, _) = forwarded(&d);
        assert!(!order.contains(&addr(&set, draining)), "{sid}: {order:?}");
        let want: Vec<&str> = rank.iter().filter(|&&i| i != draining).take(3).map(|i| addr(&set, *i)).collect();
        assert_eq!(order, want);
        assert_eq!(affinity, "new");
        // Pinned to the draining node: kept there, fallbacks without it.
        let d = request(&cfg, &set, &sid, Some(set.hosts()[draining].h64), &mut s);
        let (order, affinity, _, _) = forwarded(&d);
        assert_eq!((order[0], affinity), (addr(&set, draining), "sticky"));
        assert!(!order[1..].contains(&addr(&set, draining)));
    }
    assert_eq!(s.tally.get(Counter::PlacementDrainingKept), 30);
    assert_eq!(s.tally.get(Counter::PlacementFirstChoice), 30);
    // Every host draining: a new session still gets a node.
    let all = discovered(&["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003", "127.0.0.1:8004"]);
    let mut s = scratch(&all);
    assert_eq!(forwarded(&request(&cfg, &all, "x", None, &mut s)).1, "new");
}

#[test]
fn weighted_bounds() {
    // Weights 3 and 1 (W = 4); (heavy load, light load) -> bound of the first choice:
    // - (7, 1): L = 8, heavy ⌈1.5 × 9 × 3 / 4⌉ = 11 ≥ 8: stays on heavy;
    // - (17, 0): L = 17, heavy ⌈1.5 × 18 × 3 / 4⌉ = 21 ≥ 18: stays (a heavy host may hold
    //   far more than the light one: bounds are per weight);
    // - (0, 4): L = 4, light ⌈1.5 × 5 × 1 / 4⌉ = 2 < 5: moves to heavy;
    // - (0, 1): L = 1, light ⌈1.5 × 2 / 4⌉ = 1 < 2: moves to heavy;
    // - (0, 0): L = 0, light ⌈1.5 / 4⌉ = 1 ≥ 1: stays on light.
    let cfg = Config::parse(
        json!({
            "token": {"keys": [{"kid": "k1", "alg": "HS256", "secret_base64": KEY}]},
            "ticket": {"secret_base64": TICKET_KEY},
            "upstream": {"hosts": [{"address": "127.0.0.1:8001", "weight": 3}, {"address": "127.0.0.1:8002", "weight": 1}]},
            "placement": {"balance_factor": 150},
        })
        .to_string()
        .as_bytes(),
        &|_| None,
    )
    .unwrap();
    let set = static_set(&cfg);
    let heavy = set.hosts().iter().position(|h| h.weight == 3).unwrap();
    let light = 1 - heavy;
    for (loads, first, want) in [
        ([7u32, 1], heavy, heavy),
        ([17, 0], heavy, heavy),
        ([0, 4], light, heavy),
        ([0, 1], light, heavy),
        ([0, 0], light, light),
    ] {
        let mut s = scratch(&set);
        let mut l = [0u32; 2];
        l[heavy] = loads[0];
        l[light] = loads[1];
        load(&mut s, &l);
        let sid = sid_ranked_first(&set, first);
        assert_eq!(forwarded(&request(&cfg, &set, &sid, None, &mut s)).0[0], addr(&set, want), "{loads:?}");
    }
}

#[test]
fn the_response_records_the_served_nodes_report_and_the_request_ends() {
    let cfg = config(json!({"balance_factor": 150, "saturation": {"threshold": 0.8}}), json!({}));
    let set = static_set(&cfg);
    let mut s = scratch(&set);
    let d = request(&cfg, &set, "resp", None, &mut s);
    let (order, _, pending, _) = forwarded(&d);
    let pending = pending.clone();
    let primary = set.by_address(order[0]).unwrap();
    assert_eq!(s.load.load(primary), 1);
    // Served by a fallback: its report is recorded for the fallback.
    let fb = order[1];
    let served = Served { address: Some(fb), status: Some(200) };
    let node = served_node(&pending, served, &set);
    assert_eq!(node, Some(set.hosts()[set.by_address(fb).unwrap()].h64));
    observe_load(&cfg, node, Some(b"TEXT named_metrics.kv_cache_usage_perc=0.85"), NOW_MS, &mut s.load);
    assert!(s.load.saturated(set.by_address(fb).unwrap(), 0.8, 5000, NOW_MS));
    let _ = respond(&cfg, &pending, served, &set, NOW, &mut s.tally);
    s.load.finished(pending.in_flight.unwrap());
    assert_eq!(s.load.load(primary), 0);
    assert_eq!(s.tally.get(Counter::Outcome(Outcome::New)), 1);
    // Without placement nothing is routed or asked for.
    let plain = Config::parse(
        json!({"token": {"keys": [{"kid": "k1", "alg": "HS256", "secret_base64": KEY}]},
               "upstream": {"hosts": [{"address": "127.0.0.1:8001"}]}})
        .to_string()
        .as_bytes(),
        &|_| None,
    )
    .unwrap();
    let set = static_set(&plain);
    let mut s = scratch(&set);
    let d = request(&plain, &set, "plain", None, &mut s);
    let (_, _, pending, ask) = forwarded(&d);
    assert_eq!((pending.in_flight, pending.strip_load_report, ask), (None, false, None));
    assert_eq!(s.load.load(0), 0);
}

#[test]
fn client_address_sessions_keep_their_ranking_whatever_the_loads() {
    // No ticket can remember a load-dependent choice for them: the ranking (draining
    // hosts aside) every time, and no placement counted.
    let cfg = config(json!({"balance_factor": 101, "drain": true}), json!({"on_missing": "client_address"}));
    let set = discovered(&[]);
    let mut s = scratch(&set);
    load(&mut s, &[40, 40, 40, 40]);
    let sid = "addr:10.1.2.3";
    let rank = set.rank(sid.as_bytes());
    s.load.routed(rank[0]);
    for _ in 0..3 {
        s.load.routed(rank[0]);
        let d = decide_at(
            &cfg,
            &[],
            &set,
            NOW_MS,
            &mut Given { source_address: Some("10.1.2.3:5555".into()), ..Given::default() },
            &mut s,
        );
        let (order, affinity, _, _) = forwarded(&d);
        assert_eq!((order[0], affinity), (addr(&set, rank[0]), "new"));
    }
    assert_eq!(s.tally.get(Counter::PlacementBounded) + s.tally.get(Counter::PlacementFirstChoice), 0);
    // Its first node draining: the next one (and no fallback to it).
    let set = discovered(&[addr(&set, rank[0])]);
    let mut s = scratch(&set);
    let d = decide_at(
        &cfg,
        &[],
        &set,
        NOW_MS,
        &mut Given { source_address: Some("10.1.2.3:5555".into()), ..Given::default() },
        &mut s,
    );
    let (order, _, _, _) = forwarded(&d);
    let rank = set.rank(sid.as_bytes());
    assert_eq!(order, rank[1..].iter().map(|i| addr(&set, *i)).collect::<Vec<_>>());
}
