//! Holding requests until the first host set (DESIGN sections 2 and 6,
//! `upstream.discovery.startup_wait_ms`).
//!
//! A VM that discovers its hosts has none when it starts, and neither has the root
//! context of a new configuration, until a discovery poll (or another VM, through shared
//! data) gives it a set. Refusing the requests of that moment would answer `503` on every
//! Envoy start, rollout and configuration update. Instead they are held: the glue pauses
//! them, and resumes them when this state type releases them; a released request is then
//! decided exactly like one that has just arrived.
//!
//! Invariants:
//! - Requests are held only in the starting window: from [`Startup::open`] until the first
//!   host set with at least one host is reported (the glue reports the discovery
//!   schedule's first settled set, see [`crate::discovery`]), or until `wait_ms` has
//!   passed, whichever comes first. The window never reopens; after it, an empty set means `503` at once (an
//!   outage is not a startup).
//! - Every held request is released exactly once, in arrival order, unless its stream
//!   ended first ([`Startup::on_gone`]).
//! - At most [`MAX_HELD`] requests wait at once; later ones are decided at once (they
//!   would get `503` while no host is known). This bounds the memory a burst can take.
//!
//! Pure: time is an argument (milliseconds), requests are opaque ids.

/// Most requests held at once by one VM (one configuration's root context).
pub const MAX_HELD: usize = 10_000;

/// What to do with a request that has just arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Decide it now.
    Now,
    /// Hold it (pause the stream) until it is released.
    Hold,
}

/// A held request to resume now, and how long it waited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Released {
    pub id: u32,
    pub held_ms: u64,
}

/// The starting window of one VM's configuration and the requests held in it.
#[derive(Clone, Debug, Default)]
pub struct Startup {
    /// End of the window; `None` once it has closed (or never opened).
    until_ms: Option<u64>,
    /// Held requests in arrival order: id and arrival time.
    held: Vec<(u32, u64)>,
}

impl Startup {
    /// No window: every request is decided at once (static hosts, a set already known,
    /// or `startup_wait_ms: 0`).
    pub fn closed() -> Startup {
        Startup::default()
    }

    /// A window of `wait_ms` starting at `now_ms`.
    pub fn open(now_ms: u64, wait_ms: u64) -> Startup {
        if wait_ms == 0 {
            return Startup::closed();
        }
        Startup { until_ms: Some(now_ms.saturating_add(wait_ms)), held: Vec::new() }
    }

    /// A configuration is applied at `now_ms` (to a root context that may already hold
    /// requests): the window restarts with `wait_ms`, keeping what it holds; `wait_ms` 0
    /// closes it and releases them.
    pub fn restart(&mut self, now_ms: u64, wait_ms: u64) -> Vec<Released> {
        if wait_ms == 0 {
            return self.close(now_ms);
        }
        self.until_ms = Some(now_ms.saturating_add(wait_ms));
        Vec::new()
    }

    /// True while requests may still be held.
    pub fn is_open(&self) -> bool {
        self.until_ms.is_some()
    }

    /// Number of requests held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// A request `id` arrives at `now_ms`.
    pub fn on_request(&mut self, id: u32, now_ms: u64) -> Admit {
        match self.until_ms {
            Some(until) if now_ms < until && self.held.len() < MAX_HELD => {
                self.held.push((id, now_ms));
                Admit::Hold
            }
            _ => Admit::Now,
        }
    }

    /// A host set of `hosts` hosts is now in use. A non-empty one closes the window and
    /// releases every held request; an empty one changes nothing (at startup, Envoy's
    /// first health checks may not have passed yet).
    pub fn on_hosts(&mut self, hosts: usize, now_ms: u64) -> Vec<Released> {
        if hosts == 0 || self.until_ms.is_none() {
            return Vec::new();
        }
        self.close(now_ms)
    }

    /// A timer tick: once the wait has passed, the window closes and every held request
    /// is released (to be answered as the host set allows: `503` while it is empty).
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<Released> {
        match self.until_ms {
            Some(until) if now_ms >= until => self.close(now_ms),
            _ => Vec::new(),
        }
    }

    /// The stream of request `id` ended (the client left). Returns whether it was held.
    pub fn on_gone(&mut self, id: u32) -> bool {
        let before = self.held.len();
        self.held.retain(|(h, _)| *h != id);
        self.held.len() != before
    }

    fn close(&mut self, now_ms: u64) -> Vec<Released> {
        self.until_ms = None;
        self.held.drain(..).map(|(id, since)| Released { id, held_ms: now_ms.saturating_sub(since) }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(r: &[Released]) -> Vec<u32> {
        r.iter().map(|r| r.id).collect()
    }

    #[test]
    fn held_until_a_set_with_hosts_arrives() {
        let mut s = Startup::open(1000, 2000);
        assert!(s.is_open());
        assert_eq!(s.on_request(1, 1000), Admit::Hold);
        assert_eq!(s.on_request(2, 1040), Admit::Hold);
        assert_eq!(s.on_tick(1050), vec![]);
        // An empty set (health checks not passed yet) does not end the wait.
        assert_eq!(s.on_hosts(0, 1060), vec![]);
        assert_eq!(s.on_request(3, 1070), Admit::Hold);
        let r = s.on_hosts(3, 1100);
        assert_eq!(
            r,
            vec![Released { id: 1, held_ms: 100 }, Released { id: 2, held_ms: 60 }, Released { id: 3, held_ms: 30 }]
        );
        assert!(!s.is_open());
        // The window never reopens: later requests, empty sets and ticks hold nothing.
        assert_eq!(s.on_request(4, 1101), Admit::Now);
        assert_eq!(s.on_hosts(0, 1200), vec![]);
        assert_eq!(s.on_request(5, 1201), Admit::Now);
        assert_eq!(s.on_tick(5000), vec![]);
        assert_eq!(s.held(), 0);
    }

    #[test]
    fn released_when_the_wait_has_passed() {
        let mut s = Startup::open(0, 2000);
        assert_eq!(s.on_request(7, 10), Admit::Hold);
        assert_eq!(s.on_request(8, 1999), Admit::Hold);
        assert_eq!(s.on_tick(1999), vec![]);
        // At the exact end of the wait, arrivals are no longer held, and the next tick
        // releases the held ones.
        assert_eq!(s.on_request(9, 2000), Admit::Now);
        let r = s.on_tick(2049);
        assert_eq!(r, vec![Released { id: 7, held_ms: 2039 }, Released { id: 8, held_ms: 50 }]);
        assert!(!s.is_open());
        assert_eq!(s.on_hosts(3, 2100), vec![], "nothing left to release");
    }

    #[test]
    fn gone_requests_are_never_released() {
        let mut s = Startup::open(0, 100);
        for id in 1..=4 {
            assert_eq!(s.on_request(id, 0), Admit::Hold);
        }
        assert!(s.on_gone(2));
        assert!(!s.on_gone(2));
        assert!(!s.on_gone(99));
        assert_eq!(ids(&s.on_hosts(1, 5)), vec![1, 3, 4]);
        assert!(!s.on_gone(1), "released requests are no longer held");
    }

    #[test]
    fn closed_and_zero_wait_hold_nothing() {
        for mut s in [Startup::closed(), Startup::open(0, 0)] {
            assert!(!s.is_open());
            assert_eq!(s.on_request(1, 0), Admit::Now);
            assert_eq!(s.on_tick(10_000), vec![]);
            assert_eq!(s.on_hosts(2, 10_000), vec![]);
        }
    }

    #[test]
    fn a_new_configuration_restarts_the_window() {
        let mut s = Startup::open(0, 100);
        assert_eq!(s.on_request(1, 10), Admit::Hold);
        assert_eq!(s.restart(50, 1000), vec![]);
        assert_eq!(s.on_tick(500), vec![], "the new window runs to 1050");
        assert_eq!(s.on_request(2, 600), Admit::Hold);
        assert_eq!(ids(&s.on_tick(1050)), vec![1, 2]);
        let mut s = Startup::open(0, 100);
        assert_eq!(s.on_request(1, 10), Admit::Hold);
        assert_eq!(s.restart(20, 0), vec![Released { id: 1, held_ms: 10 }], "static hosts: release at once");
        assert!(!s.is_open());
        let mut s = Startup::closed();
        assert_eq!(s.restart(0, 10), vec![]);
        assert!(s.is_open(), "a discovery configuration after a static one opens a window");
    }

    #[test]
    fn holds_at_most_max_held() {
        let mut s = Startup::open(0, 1000);
        for id in 0..MAX_HELD as u32 {
            assert_eq!(s.on_request(id, 1), Admit::Hold);
        }
        assert_eq!(s.on_request(u32::MAX, 2), Admit::Now);
        assert_eq!(s.held(), MAX_HELD);
        assert_eq!(s.on_hosts(1, 3).len(), MAX_HELD);
    }

    #[test]
    fn saturating_times() {
        let mut s = Startup::open(u64::MAX - 5, 2000);
        assert_eq!(s.on_request(1, u64::MAX - 1), Admit::Hold);
        assert_eq!(s.on_tick(u64::MAX), vec![Released { id: 1, held_ms: 1 }]);
        // A clock that steps back never underflows.
        let mut s = Startup::open(100, 50);
        assert_eq!(s.on_request(1, 120), Admit::Hold);
        assert_eq!(s.on_hosts(1, 90), vec![Released { id: 1, held_ms: 0 }]);
    }
}
