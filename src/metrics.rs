//! Metric names (DESIGN section 7, a public contract) and the in-VM accumulator.
//!
//! Every metric is defined once per VM. Requests only add to plain integers in VM
//! memory ([`Tally`]); the filter flushes the deltas to Envoy on a timer (or at once when
//! `metrics.flush_ms` is 0), so the per-request cost is a few additions instead of one
//! host call per counter. A flush writes every delta of the batch together, so
//! `requests` always equals the sum of `outcome.*` once flushed.

use std::collections::HashMap;

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
}

const OUTCOMES: [Outcome; 6] =
    [Outcome::New, Outcome::Sticky, Outcome::Moved, Outcome::Unaffined, Outcome::Rejected, Outcome::NoHost];

/// Number of fixed counters.
pub const COUNTERS: usize = 1 + 6 + 3 + 8 + 2 + 2 + 1 + 2;

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
        };
        format!("{PREFIX}.{tail}")
    }
}

/// Name of the per-node counter for a node label (see [`crate::hosts::metric_label`]).
pub fn node_metric(label: &str) -> String {
    format!("{PREFIX}.node.{label}.requests")
}

/// Name of the healthy-hosts gauge.
pub fn hosts_healthy_gauge() -> String {
    format!("{PREFIX}.hosts.healthy")
}

/// Counts not yet flushed to Envoy.
#[derive(Clone, Debug)]
pub struct Tally {
    fixed: [u64; COUNTERS],
    /// Per-node counts by slot (see [`NodeSlots`]).
    nodes: Vec<u64>,
    dirty: bool,
}

impl Default for Tally {
    fn default() -> Self {
        Tally { fixed: [0; COUNTERS], nodes: Vec::new(), dirty: false }
    }
}

impl Tally {
    pub fn add(&mut self, c: Counter) {
        if let Some(slot) = self.fixed.get_mut(c.index()) {
            *slot += 1;
            self.dirty = true;
        }
    }

    pub fn add_node(&mut self, slot: usize) {
        if self.nodes.len() <= slot {
            self.nodes.resize(slot + 1, 0);
        }
        if let Some(n) = self.nodes.get_mut(slot) {
            *n += 1;
            self.dirty = true;
        }
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Hands every non-zero delta to `emit` (fixed counters by index, then node slots)
    /// and resets them.
    pub fn drain(&mut self, mut emit: impl FnMut(Delta)) {
        for (i, v) in self.fixed.iter_mut().enumerate() {
            if *v > 0 {
                emit(Delta::Fixed(i, *v));
                *v = 0;
            }
        }
        for (i, v) in self.nodes.iter_mut().enumerate() {
            if *v > 0 {
                emit(Delta::Node(i, *v));
                *v = 0;
            }
        }
        self.dirty = false;
    }

    /// The pending count of a fixed counter (for tests and tools).
    pub fn get(&self, c: Counter) -> u64 {
        self.fixed.get(c.index()).copied().unwrap_or(0)
    }

    /// The pending count of a node slot.
    pub fn get_node(&self, slot: usize) -> u64 {
        self.nodes.get(slot).copied().unwrap_or(0)
    }
}

/// One pending increment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delta {
    /// Fixed counter by [`Counter::index`].
    Fixed(usize, u64),
    /// Per-node counter by slot.
    Node(usize, u64),
}

/// Stable slots for per-node counters: a node keeps its slot (and its Envoy metric id)
/// across host-set changes, so counts are never attributed to another node.
#[derive(Clone, Debug, Default)]
pub struct NodeSlots {
    by_label: HashMap<String, usize>,
    labels: Vec<String>,
}

impl NodeSlots {
    /// The slot of `label`, allocated on first use.
    pub fn slot(&mut self, label: &str) -> usize {
        if let Some(s) = self.by_label.get(label) {
            return *s;
        }
        let s = self.labels.len();
        self.labels.push(label.to_string());
        self.by_label.insert(label.to_string(), s);
        s
    }

    pub fn label(&self, slot: usize) -> Option<&str> {
        self.labels.get(slot).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
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
        assert_eq!(node_metric("127_0_0_1_8001"), "session_affinity.node.127_0_0_1_8001.requests");
    }

    #[test]
    fn tally_drains_once() {
        let mut t = Tally::default();
        assert!(!t.is_dirty());
        t.add(Counter::Requests);
        t.add(Counter::Requests);
        t.add_node(3);
        let mut seen = vec![];
        t.drain(|d| seen.push(d));
        assert_eq!(seen, vec![Delta::Fixed(0, 2), Delta::Node(3, 1)]);
        let mut again = 0;
        t.drain(|_| again += 1);
        assert_eq!(again, 0);
    }

    #[test]
    fn slots_are_stable() {
        let mut s = NodeSlots::default();
        assert_eq!(s.slot("a"), 0);
        assert_eq!(s.slot("b"), 1);
        assert_eq!(s.slot("a"), 0);
        assert_eq!(s.label(1), Some("b"));
    }
}
