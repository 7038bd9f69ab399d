//! Metric names (DESIGN section 7, a public contract) and the in-VM accumulator.
//!
//! Every metric is defined once per VM. Requests only add to plain integers in VM
//! memory ([`Tally`]); the filter flushes the deltas to Envoy on a timer (or at once when
//! `metrics.flush_ms` is 0), so the per-request cost is a few additions instead of one
//! host call per counter. A flush writes every delta of the batch together, so
//! `requests` always equals the sum of `outcome.*` once flushed.
//!
//! Per-node counters are keyed by the node's identity, `h64(host key)`, and named after
//! its host key ([`node_label`]): routing types carry no metric state, and the glue maps
//! a node to its Envoy metric id when it first flushes a count for it.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::token::TokenError;

/// Prefix of every metric name.
pub const PREFIX: &str = "session_affinity";

/// One request's outcome: exactly one per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Affined, with no usable ticket (a new session, or its first visit here).
    New,
    /// Affined to the node its ticket names.
    Sticky,
    /// Affined to another node than its ticket names.
    Moved,
    /// Forwarded without affinity (`pass`).
    Unaffined,
    /// Refused with a local 401 (or 500 when the host gave no randomness).
    Rejected,
    /// Refused with a local 503: no healthy host.
    NoHost,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::New => "new",
            Outcome::Sticky => "sticky",
            Outcome::Moved => "moved",
            Outcome::Unaffined => "unaffined",
            Outcome::Rejected => "rejected",
            Outcome::NoHost => "no_host",
        }
    }
}

/// The fixed counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Requests,
    Outcome(Outcome),
    TokenValid,
    TokenMissing,
    TokenMinted,
    TokenInvalid(TokenError),
    TicketIssued,
    TicketIgnored,
    ServedPrimary,
    ServedFallback,
    UpstreamErrors,
    DiscoveryOk,
    DiscoveryFailed,
    /// A session identified by an unsigned source (DESIGN section 3a).
    TokenUnsigned,
    /// A session identified by the client address (`on_missing: client_address`).
    TokenClientAddress,
    /// A request held at startup until the first host set (or `startup_wait_ms`).
    StartupHeld,
    /// Placement (DESIGN section 10): a session that needed a node placed on the first
    /// candidate of its ranking.
    PlacementFirstChoice,
    /// ... further down its ranking because of load or saturation.
    PlacementBounded,
    /// A pinned session moved off its saturated node.
    PlacementSpilled,
    /// A saturated node passed over while placing.
    PlacementSaturatedSkips,
    /// A request of a pinned session served by its draining node.
    PlacementDrainingKept,
}

const OUTCOMES: [Outcome; 6] =
    [Outcome::New, Outcome::Sticky, Outcome::Moved, Outcome::Unaffined, Outcome::Rejected, Outcome::NoHost];

/// Number of fixed counters.
pub const COUNTERS: usize = 1 + 6 + 3 + 8 + 2 + 2 + 1 + 2 + 3 + 5;

impl Counter {
    /// Every fixed counter, in index order.
    pub fn all() -> Vec<Counter> {
        let mut v = vec![Counter::Requests];
        v.extend(OUTCOMES.iter().map(|o| Counter::Outcome(*o)));
        v.extend([Counter::TokenValid, Counter::TokenMissing, Counter::TokenMinted]);
        v.extend(TokenError::ALL.iter().map(|e| Counter::TokenInvalid(*e)));
        v.extend([
            Counter::TicketIssued,
            Counter::TicketIgnored,
            Counter::ServedPrimary,
            Counter::ServedFallback,
            Counter::UpstreamErrors,
            Counter::DiscoveryOk,
            Counter::DiscoveryFailed,
            Counter::TokenUnsigned,
            Counter::TokenClientAddress,
            Counter::StartupHeld,
            Counter::PlacementFirstChoice,
            Counter::PlacementBounded,
            Counter::PlacementSpilled,
            Counter::PlacementSaturatedSkips,
            Counter::PlacementDrainingKept,
        ]);
        v
    }

    /// Position in [`Counter::all`].
    pub fn index(self) -> usize {
        match self {
            Counter::Requests => 0,
            Counter::Outcome(o) => 1 + o as usize,
            Counter::TokenValid => 7,
            Counter::TokenMissing => 8,
            Counter::TokenMinted => 9,
            Counter::TokenInvalid(e) => 10 + e.index(),
            Counter::TicketIssued => 18,
            Counter::TicketIgnored => 19,
            Counter::ServedPrimary => 20,
            Counter::ServedFallback => 21,
            Counter::UpstreamErrors => 22,
            Counter::DiscoveryOk => 23,
            Counter::DiscoveryFailed => 24,
            Counter::TokenUnsigned => 25,
            Counter::TokenClientAddress => 26,
            Counter::StartupHeld => 27,
            Counter::PlacementFirstChoice => 28,
            Counter::PlacementBounded => 29,
            Counter::PlacementSpilled => 30,
            Counter::PlacementSaturatedSkips => 31,
            Counter::PlacementDrainingKept => 32,
        }
    }

    /// The full metric name, e.g. `session_affinity.token.invalid.expired`.
    pub fn name(self) -> String {
        let tail = match self {
            Counter::Requests => "requests".to_string(),
            Counter::Outcome(o) => format!("outcome.{}", o.name()),
            Counter::TokenValid => "token.valid".into(),
            Counter::TokenMissing => "token.missing".into(),
            Counter::TokenMinted => "token.minted".into(),
            Counter::TokenInvalid(e) => format!("token.invalid.{}", e.reason()),
            Counter::TicketIssued => "ticket.issued".into(),
            Counter::TicketIgnored => "ticket.ignored".into(),
            Counter::ServedPrimary => "served.primary".into(),
            Counter::ServedFallback => "served.fallback".into(),
            Counter::UpstreamErrors => "upstream.errors".into(),
            Counter::DiscoveryOk => "discovery.ok".into(),
            Counter::DiscoveryFailed => "discovery.failed".into(),
            Counter::TokenUnsigned => "token.unsigned".into(),
            Counter::TokenClientAddress => "token.client_address".into(),
            Counter::StartupHeld => "startup.held".into(),
            Counter::PlacementFirstChoice => "placement.first_choice".into(),
            Counter::PlacementBounded => "placement.bounded".into(),
            Counter::PlacementSpilled => "placement.spilled".into(),
            Counter::PlacementSaturatedSkips => "placement.saturated_skips".into(),
            Counter::PlacementDrainingKept => "placement.draining_kept".into(),
        };
        format!("{PREFIX}.{tail}")
    }
}

/// `<node>` of the per-node metrics: the host key (DESIGN section 5: the static host's
/// `key` when set, else its address) with `.`, `:`, `[`, `]` as `_`.
pub fn node_label(host_key: &str) -> String {
    host_key.chars().map(|c| if matches!(c, '.' | ':' | '[' | ']') { '_' } else { c }).collect()
}

/// Name of the per-node request counter of a host key.
pub fn node_metric(host_key: &str) -> String {
    format!("{PREFIX}.node.{}.requests", node_label(host_key))
}

/// Name of the per-node load gauge of a host key (DESIGN section 10).
pub fn node_load_gauge(host_key: &str) -> String {
    format!("{PREFIX}.node.{}.load", node_label(host_key))
}

/// Name of the healthy-hosts gauge.
pub fn hosts_healthy_gauge() -> String {
    format!("{PREFIX}.hosts.healthy")
}

/// Counts not yet flushed to Envoy.
#[derive(Clone, Debug)]
pub struct Tally {
    fixed: [u64; COUNTERS],
    /// Per-node counts, by `h64(host key)`. Entries stay after a flush (at zero), so
    /// counting a known node never allocates.
    nodes: HashMap<u64, NodeCount, BuildHasherDefault<H64Hasher>>,
    dirty: bool,
}

/// The pending count of one node, and its host key (for the metric's name).
#[derive(Clone, Debug)]
struct NodeCount {
    key: String,
    count: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Tally { fixed: [0; COUNTERS], nodes: HashMap::default(), dirty: false }
    }
}

impl Tally {
    pub fn add(&mut self, c: Counter) {
        if let Some(slot) = self.fixed.get_mut(c.index()) {
            *slot += 1;
            self.dirty = true;
        }
    }

    /// Adds `n` to a fixed counter.
    pub fn add_n(&mut self, c: Counter, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(slot) = self.fixed.get_mut(c.index()) {
            *slot += n;
            self.dirty = true;
        }
    }

    /// Counts a request served by node `h64`. `key` gives its host key; it is asked for
    /// only the first time this tally sees the node.
    pub fn add_node(&mut self, h64: u64, key: impl FnOnce() -> String) {
        self.nodes.entry(h64).or_insert_with(|| NodeCount { key: key(), count: 0 }).count += 1;
        self.dirty = true;
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Hands every non-zero delta to `emit` (fixed counters by index, then nodes) and
    /// resets them.
    pub fn drain(&mut self, mut emit: impl FnMut(Delta<'_>)) {
        for (i, v) in self.fixed.iter_mut().enumerate() {
            if *v > 0 {
                emit(Delta::Fixed(i, *v));
                *v = 0;
            }
        }
        for (h64, n) in self.nodes.iter_mut() {
            if n.count > 0 {
                emit(Delta::Node { h64: *h64, key: &n.key, count: n.count });
                n.count = 0;
            }
        }
        self.dirty = false;
    }

    /// The pending count of a fixed counter (for tests and tools).
    pub fn get(&self, c: Counter) -> u64 {
        self.fixed.get(c.index()).copied().unwrap_or(0)
    }

    /// The pending count of node `h64`.
    pub fn get_node(&self, h64: u64) -> u64 {
        self.nodes.get(&h64).map_or(0, |n| n.count)
    }

    /// The host key this tally names node `h64` by.
    pub fn node_key(&self, h64: u64) -> Option<&str> {
        self.nodes.get(&h64).map(|n| n.key.as_str())
    }
}

/// One pending increment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delta<'a> {
    /// Fixed counter by [`Counter::index`].
    Fixed(usize, u64),
    /// Per-node request counter: the node's `h64` and host key.
    Node { h64: u64, key: &'a str, count: u64 },
}

/// A hasher for keys that are already uniform hashes (`h64` is SHA-256-derived): the
/// key itself, so a per-node count costs no SipHash.
#[derive(Clone, Copy, Debug, Default)]
pub struct H64Hasher(u64);

impl Hasher for H64Hasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is expected; anything else is folded in, never lost.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_match_all_and_names_are_unique() {
        let all = Counter::all();
        assert_eq!(all.len(), COUNTERS);
        for (i, c) in all.iter().enumerate() {
            assert_eq!(c.index(), i, "{c:?}");
        }
        let mut names: Vec<String> = all.iter().map(|c| c.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), COUNTERS);
        assert!(names.contains(&"session_affinity.token.invalid.not_yet_valid".to_string()));
        assert!(names.contains(&"session_affinity.outcome.no_host".to_string()));
        assert_eq!(node_metric("127.0.0.1:8001"), "session_affinity.node.127_0_0_1_8001.requests");
        assert!(names.contains(&"session_affinity.token.unsigned".to_string()));
        assert!(names.contains(&"session_affinity.token.client_address".to_string()));
    }

    #[test]
    fn tally_drains_once() {
        let mut t = Tally::default();
        assert!(!t.is_dirty());
        t.add(Counter::Requests);
        t.add(Counter::Requests);
        t.add_node(7, || "127.0.0.1:8001".into());
        t.add_node(7, || panic!("the key is asked for once"));
        let mut seen = vec![];
        t.drain(|d| seen.push(format!("{d:?}")));
        assert_eq!(seen, vec!["Fixed(0, 2)", r#"Node { h64: 7, key: "127.0.0.1:8001", count: 2 }"#]);
        let mut again = 0;
        t.drain(|_| again += 1);
        assert_eq!(again, 0);
        // A node seen before keeps its key after a drain.
        t.add_node(7, || panic!("known node"));
        assert_eq!((t.get_node(7), t.node_key(7)), (1, Some("127.0.0.1:8001")));
    }

    #[test]
    fn node_metrics_are_named_by_host_key() {
        assert_eq!(node_label("127.0.0.1:8001"), "127_0_0_1_8001");
        assert_eq!(node_label("[2001:db8::1]:8080"), "_2001_db8__1__8080");
        assert_eq!(node_metric("node-a.zone:1"), "session_affinity.node.node-a_zone_1.requests");
    }
}
