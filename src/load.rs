//! Per-node load and load reports as one VM sees them (DESIGN section 10), as a pure
//! state type: the glue feeds it events (a request routed, a request finished, an admin
//! poll, a load report) and reads loads and saturation back; time is an argument.
//!
//! **Load** of a node = its `rq_active` in the last admin poll (Envoy sums the gauge over
//! every worker, so it already counts this VM's requests that were in flight then), plus
//! the requests this VM routed to it since that poll, minus those of them that have
//! finished. Each routed request carries an [`InFlight`] naming the poll epoch it was
//! routed in, so a request that finishes after the next poll is not subtracted twice.
//! Without polls (static hosts), the load is this VM's own in-flight requests.
//!
//! Nodes are keyed by `h64` of their host key, so a node keeps its counts across host-set
//! changes; [`LoadBook::align`] re-indexes them like the current host set so that the
//! request path looks loads up by host index.

use std::collections::HashMap;

/// What a routed request remembers, to report its end ([`LoadBook::finished`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InFlight {
    node: u64,
    epoch: u64,
}

/// The last load report of a node: the configured metric's value and when it came.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Report {
    pub value: f64,
    pub at_ms: u64,
}

#[derive(Clone, Debug, Default)]
struct Node {
    /// `rq_active` in the last poll that listed the node.
    polled: u32,
    /// Routed by this VM since the last poll, not yet finished.
    since_poll: u32,
    /// Routed by this VM, not yet finished (whatever the poll).
    in_flight: u32,
    report: Option<Report>,
}

/// Loads and reports of the nodes, for one VM.
#[derive(Clone, Debug, Default)]
pub struct LoadBook {
    nodes: HashMap<u64, Node>,
    /// `h64` of each host of the current set, by host index.
    order: Vec<u64>,
    epoch: u64,
    /// True once an admin poll has reported `rq_active` (discovery).
    polled: bool,
}

impl LoadBook {
    /// Follows a new host set: `hosts` are the `h64`s of its hosts in set order. Nodes that
    /// left are forgotten (a request still in flight to one is ignored when it ends).
    pub fn align(&mut self, hosts: &[u64]) {
        self.nodes.retain(|h, _| hosts.contains(h));
        for h in hosts {
            self.nodes.entry(*h).or_default();
        }
        self.order = hosts.to_vec();
    }

    /// An admin poll: `rq_active` per node `h64`. Starts a new epoch: what was routed
    /// before is in these figures from now on.
    pub fn polled(&mut self, rq_active: impl IntoIterator<Item = (u64, u32)>) {
        self.epoch += 1;
        self.polled = true;
        for n in self.nodes.values_mut() {
            n.polled = 0;
            n.since_poll = 0;
        }
        for (h, active) in rq_active {
            if let Some(n) = self.nodes.get_mut(&h) {
                n.polled = active;
            }
        }
    }

    /// A request routed to the host at `index` of the current set.
    pub fn routed(&mut self, index: usize) -> Option<InFlight> {
        let h = *self.order.get(index)?;
        let n = self.nodes.get_mut(&h)?;
        n.since_poll = n.since_poll.saturating_add(1);
        n.in_flight = n.in_flight.saturating_add(1);
        Some(InFlight { node: h, epoch: self.epoch })
    }

    /// A routed request ended (answered, failed or reset).
    pub fn finished(&mut self, f: InFlight) {
        if let Some(n) = self.nodes.get_mut(&f.node) {
            n.in_flight = n.in_flight.saturating_sub(1);
            if f.epoch == self.epoch {
                n.since_poll = n.since_poll.saturating_sub(1);
            }
        }
    }

    /// A load report from the node `h64` (the configured metric's value).
    pub fn report(&mut self, node: u64, value: f64, now_ms: u64) {
        if let Some(n) = self.nodes.get_mut(&node) {
            n.report = Some(Report { value, at_ms: now_ms });
        }
    }

    /// The load of the host at `index` (DESIGN section 10).
    pub fn load(&self, index: usize) -> u32 {
        let Some(n) = self.order.get(index).and_then(|h| self.nodes.get(h)) else { return 0 };
        if self.polled {
            n.polled.saturating_add(n.since_poll)
        } else {
            n.in_flight
        }
    }

    /// The load of the node `h64`, if it is in the current set.
    pub fn load_of(&self, node: u64) -> Option<u32> {
        self.order.iter().position(|h| *h == node).map(|i| self.load(i))
    }

    /// The last report of the host at `index`.
    pub fn last_report(&self, index: usize) -> Option<Report> {
        self.order.get(index).and_then(|h| self.nodes.get(h)).and_then(|n| n.report)
    }

    /// Whether the host at `index` is saturated: its last report is at least `threshold`
    /// and at most `stale_ms` old.
    pub fn saturated(&self, index: usize, threshold: f64, stale_ms: u64, now_ms: u64) -> bool {
        self.last_report(index).is_some_and(|r| r.value >= threshold && now_ms.saturating_sub(r.at_ms) <= stale_ms)
    }

    /// `h64`s of the current set, by host index.
    pub fn hosts(&self) -> &[u64] {
        &self.order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = 0xa;
    const B: u64 = 0xb;
    const C: u64 = 0xc;

    #[test]
    fn static_hosts_count_the_vms_own_in_flight_requests() {
        let mut b = LoadBook::default();
        b.align(&[A, B]);
        let r1 = b.routed(0).unwrap();
        let r2 = b.routed(0).unwrap();
        let _r3 = b.routed(1).unwrap();
        assert_eq!((b.load(0), b.load(1)), (2, 1));
        b.finished(r1);
        assert_eq!(b.load(0), 1);
        b.finished(r2);
        b.finished(r2); // a second end of the same request never goes below zero
        assert_eq!(b.load(0), 0);
        assert_eq!(b.routed(7), None);
    }

    #[test]
    fn polls_replace_what_was_routed_before_them() {
        let mut b = LoadBook::default();
        b.align(&[A, B]);
        let before = b.routed(0).unwrap(); // in flight at the poll: inside rq_active
        b.polled([(A, 5), (B, 2)]);
        assert_eq!((b.load(0), b.load(1)), (5, 2));
        let after = b.routed(0).unwrap();
        assert_eq!(b.load(0), 6);
        // The request routed before the poll ends: the poll's figure already had it, and
        // the next poll will not; it is not subtracted from this epoch's count.
        b.finished(before);
        assert_eq!(b.load(0), 6);
        b.finished(after);
        assert_eq!(b.load(0), 5);
        // A node the poll does not list has no polled load.
        b.polled([(B, 1)]);
        assert_eq!((b.load(0), b.load(1)), (0, 1));
    }

    #[test]
    fn host_set_changes_keep_counts_by_node() {
        let mut b = LoadBook::default();
        b.align(&[A, B]);
        b.polled([(A, 3), (B, 4)]);
        let r = b.routed(1).unwrap();
        b.report(B, 0.95, 100);
        // C joins before B in set order; B keeps its figures at its new index.
        b.align(&[A, C, B]);
        assert_eq!((b.load(0), b.load(1), b.load(2)), (3, 0, 5));
        assert_eq!(b.load_of(B), Some(5));
        assert!(b.saturated(2, 0.9, 1000, 500));
        b.finished(r);
        assert_eq!(b.load(2), 4);
        // B leaves: forgotten; its late end is ignored.
        let r = b.routed(2).unwrap();
        b.align(&[A, C]);
        b.finished(r);
        assert_eq!(b.load_of(B), None);
        assert_eq!(b.hosts(), &[A, C]);
    }

    #[test]
    fn saturation_needs_a_fresh_report_at_or_over_the_threshold() {
        let mut b = LoadBook::default();
        b.align(&[A]);
        assert!(!b.saturated(0, 0.9, 5000, 0));
        b.report(A, 0.9, 1000);
        // (threshold, stale_ms, now) -> saturated
        for (t, stale, now, want) in [
            (0.9, 5000, 1000, true),
            (0.9, 5000, 6000, true),  // exactly stale_ms old
            (0.9, 5000, 6001, false), // older
            (0.91, 5000, 1000, false),
            (0.5, 0, 1000, true),
            (0.5, 0, 1001, false),
        ] {
            assert_eq!(b.saturated(0, t, stale, now), want, "t={t} stale={stale} now={now}");
        }
        b.report(A, 0.1, 2000);
        assert!(!b.saturated(0, 0.9, 5000, 2000));
        b.report(0xdead, 1.0, 2000); // not in the set: ignored
        assert_eq!(b.last_report(0), Some(Report { value: 0.1, at_ms: 2000 }));
    }
}
