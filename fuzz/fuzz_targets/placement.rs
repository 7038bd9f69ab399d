//! Placement under load: ORCA load reports (hostile, malformed, huge) and the placement
//! rules on arbitrary loads, weights, saturation and draining flags.
//!
//! Invariants: a report never panics; a value it yields is finite and came from a
//! well-formed `TEXT ` report of at most `MAX_REPORT_BYTES`; a report recorded for a node
//! makes it saturated exactly when the value reaches the threshold. `place` returns a
//! host of the ranking, never a draining one while a non-draining one exists: the first
//! candidate that fits the bound (over every candidate) and is not saturated, else the
//! first that fits, else the first candidate; a `FirstChoice` is the first candidate;
//! fallbacks never repeat the chosen node or list a draining one.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use session_affinity::load::LoadBook;
use session_affinity::orca;
use session_affinity::placement::{self, NodeView, Placed};

#[derive(Arbitrary, Debug)]
struct Input {
    report: Vec<u8>,
    nodes: Vec<(u16, u8, bool, bool)>,
    order_seed: u64,
    balance_factor: Option<u16>,
    threshold: u8,
}

fuzz_target!(|data: &[u8]| {
    // The raw bytes as a report, and as `TEXT ` + bytes.
    for report in [data.to_vec(), [b"TEXT ".as_slice(), data].concat()] {
        if let Some(v) = orca::named_metric(&report, "kv_cache_usage_perc") {
            assert!(v.is_finite());
            assert!(report.starts_with(b"TEXT ") && report.len() <= orca::MAX_REPORT_BYTES);
        }
    }
    let Ok(input) = Input::arbitrary(&mut Unstructured::new(data)) else { return };

    // A report recorded in a load book.
    let mut book = LoadBook::default();
    book.align(&[1, 2]);
    let threshold = f64::from(input.threshold) / 100.0 + 0.01;
    if let Some(v) = orca::named_metric(&input.report, "kv_cache_usage_perc") {
        book.report(1, v, 10);
        assert_eq!(book.saturated(0, threshold, 100, 10), v >= threshold);
    } else {
        assert!(!book.saturated(0, threshold, 100, 10));
    }

    // The placement rules.
    let nodes: Vec<NodeView> = input
        .nodes
        .iter()
        .take(32)
        .map(|&(load, weight, saturated, draining)| NodeView {
            load: u32::from(load),
            weight: u32::from(weight).max(1),
            saturated,
            draining,
        })
        .collect();
    let n = nodes.len();
    // A permutation of the hosts as the ranking.
    let mut ranking: Vec<usize> = (0..n).collect();
    let mut seed = input.order_seed;
    for i in (1..n).rev() {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ranking.swap(i, (seed >> 33) as usize % (i + 1));
    }
    let c = input.balance_factor.map(|c| u32::from(c % 900) + 101);
    let Some(choice) = placement::place(&ranking, &nodes, c) else {
        assert!(ranking.is_empty());
        return;
    };
    let v = nodes[choice.host];
    assert!(ranking.contains(&choice.host));
    let any_live = nodes.iter().any(|n| !n.draining);
    if any_live {
        assert!(!v.draining);
    }
    let candidate = |i: usize| !any_live || !nodes[i].draining;
    let first_candidate = *ranking.iter().find(|&&i| candidate(i)).unwrap();
    assert_eq!(choice.placed == Placed::FirstChoice, choice.host == first_candidate);
    // The bound is over every candidate, saturated or not.
    let candidates: Vec<usize> = ranking.iter().copied().filter(|&i| candidate(i)).collect();
    let total_load: u64 = candidates.iter().map(|&i| u64::from(nodes[i].load)).sum();
    let total_weight: u64 = candidates.iter().map(|&i| u64::from(nodes[i].weight)).sum();
    let fits = |i: usize| {
        c.is_none_or(|c| u64::from(nodes[i].load) < placement::bound(c, total_load, nodes[i].weight, total_weight))
    };
    let want = candidates
        .iter()
        .copied()
        .find(|&i| fits(i) && !nodes[i].saturated)
        .or_else(|| candidates.iter().copied().find(|&i| fits(i)))
        .unwrap_or(first_candidate);
    assert_eq!(choice.host, want);
    let mut out = Vec::new();
    placement::fallbacks(&ranking, &nodes, choice.host, 3, &mut out);
    assert!(!out.contains(&choice.host) && out.iter().all(|&i| !nodes[i].draining) && out.len() <= 3);
});
