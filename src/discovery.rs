//! The discovery schedule (DESIGN section 6 `discovery`), as a pure state type.
//!
//! [`Poller`] decides when to poll Envoy's admin `/clusters?format=json`, what a poll's
//! result means for the host set in use, how often the root context ticks, and what to
//! share with the other VMs. The glue performs its [`Effect`]s (a `dispatch_http_call`,
//! `set_tick_period`, installing a set, shared data, counters, a log line) and feeds the
//! outcomes back; it decides nothing itself.
//!
//! The schedule:
//! - **Fast polls** ([`FAST_POLL_MS`], every tick) until a poll has shown a healthy host:
//!   at startup the first polls usually run before Envoy's first health-check round has
//!   passed and see an empty set.
//! - **Settling**: after a poll saw the set change, fast polls again until one sees it
//!   unchanged, at most [`MAX_SETTLE_POLLS`] in a row: hosts pass their health checks
//!   one at a time, and a set caught half-way would otherwise be used for a whole
//!   `refresh_ms` (in pinned mode, sessions placed on it stay there).
//! - **Steady**: one poll every `refresh_ms`, even when every host later goes down (an
//!   outage does not turn into fast admin polling).
//! - **Backoff**: after `n` consecutive failed polls the next one waits
//!   `base × 2^(n−1)` (base: the fast or the steady interval), at most
//!   [`MAX_BACKOFF_FACTOR`] × `refresh_ms`. A failed poll keeps the last good set.
//! - **Settled**: the set holds still (a poll saw it unchanged, or settling gave up). The
//!   first settled set with a healthy host is reported ([`Effect::Settled`]): it ends the
//!   startup wait ([`crate::startup`]), so requests held at startup are placed on the
//!   whole set, not on the first host that passed its health check (which would move
//!   pinned conversations off their nodes).
//! - **Shared set**: every successful poll that leaves the set settled publishes it,
//!   stamped with the time, in proxy-wasm shared data (process-wide: every VM of the
//!   plugin, on every worker and the main thread, and every configuration of it). A VM
//!   that has not yet seen a healthy set adopts a fresh, non-empty published one at once
//!   (at configure time and on its ticks) as settled, and confirms it with its next
//!   poll. A new configuration's root context thus starts with the set its predecessor
//!   was using, and holds nothing.
//!
//! Time is an argument (milliseconds); tests drive the schedule with a fake clock.

use std::rc::Rc;

use crate::admin;
use crate::config::Discovery;
use crate::hosts::{self, HostSet, HostSpec};
use crate::metrics::Counter;

/// Tick and poll interval, in milliseconds, while discovery polls fast.
pub const FAST_POLL_MS: u64 = 50;

/// At most this many fast polls in a row after a change (a flapping cluster must not
/// turn into 20 admin calls a second for good).
pub const MAX_SETTLE_POLLS: u32 = 20;

/// Consecutive failures back off up to this many `refresh_ms`.
pub const MAX_BACKOFF_FACTOR: u64 = 4;

/// Ticks are never shorter than this.
pub const MIN_TICK_MS: u64 = 10;

/// What the glue must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Start an admin poll now, then report it with [`Poller::on_poll_result`] (or
    /// [`Poller::on_dispatch_failed`] if it cannot be sent).
    Poll,
    /// Set the root context's tick period (milliseconds).
    Tick(u64),
    /// Use this host set from now on.
    Install(Rc<HostSet>),
    /// The set in use, of this many hosts (at least one), has settled (see the module
    /// documentation); reported once per settling.
    Settled(usize),
    /// Write this value to the shared-data key ([`shared_key`]).
    Publish(Vec<u8>),
    /// Read the shared-data key and report it with [`Poller::on_shared`].
    ReadShared,
    /// Count this counter.
    Count(Counter),
    /// Log this warning.
    Warn(String),
}

/// The discovery schedule of one root context (one VM's configuration).
#[derive(Clone, Debug)]
pub struct Poller {
    cluster: String,
    refresh_ms: u64,
    timeout_ms: u64,
    /// Metrics flush interval (0: on every request), which the tick also serves.
    flush_ms: u64,
    /// The set last installed.
    hosts: Option<Rc<HostSet>>,
    /// A set with at least one host has been in use.
    seen_healthy: bool,
    /// Consecutive polls (or adoptions) that changed the set.
    settle_polls: u32,
    /// Consecutive failed polls.
    failures: u32,
    in_flight: bool,
    next_poll_ms: u64,
    tick_ms: u64,
}

impl Poller {
    pub fn new(d: &Discovery, flush_ms: u32) -> Poller {
        Poller {
            cluster: d.cluster.clone(),
            refresh_ms: u64::from(d.refresh_ms),
            timeout_ms: u64::from(d.timeout_ms),
            flush_ms: u64::from(flush_ms),
            hosts: None,
            seen_healthy: false,
            settle_polls: 0,
            failures: 0,
            in_flight: false,
            next_poll_ms: 0,
            tick_ms: 0,
        }
    }

    /// The configuration was applied: tick fast, and look for a set another VM shares.
    pub fn start(&mut self, _now_ms: u64) -> Vec<Effect> {
        let mut fx = vec![Effect::ReadShared];
        self.retick(&mut fx);
        fx
    }

    /// A timer tick.
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        if !self.seen_healthy {
            fx.push(Effect::ReadShared);
        }
        if !self.in_flight && self.due(now_ms) {
            self.in_flight = true;
            fx.push(Effect::Poll);
        }
        fx
    }

    /// True when a poll should start at `now_ms` (none being in flight).
    fn due(&self, now_ms: u64) -> bool {
        if self.failures > 0 {
            now_ms >= self.next_poll_ms
        } else {
            self.fast() || now_ms >= self.next_poll_ms
        }
    }

    /// Whether discovery polls on every tick.
    pub fn fast(&self) -> bool {
        !self.seen_healthy || (self.settle_polls > 0 && self.settle_polls <= MAX_SETTLE_POLLS)
    }

    /// The poll could not even be sent (the admin cluster does not exist, say).
    pub fn on_dispatch_failed(&mut self, reason: String, now_ms: u64) -> Vec<Effect> {
        self.on_poll_result(Err(reason), now_ms)
    }

    /// A poll answered: the healthy hosts it listed, or why it failed.
    pub fn on_poll_result(&mut self, result: Result<Vec<HostSpec>, String>, now_ms: u64) -> Vec<Effect> {
        self.in_flight = false;
        let was_fast = self.fast();
        let mut fx = Vec::new();
        let result = result.and_then(|specs| match &self.hosts {
            Some(h) if h.same_as(&specs) => Ok(None),
            _ => HostSet::new(specs).map(|s| Some(Rc::new(s))).map_err(|e| e.to_string()),
        });
        match result {
            Ok(change) => {
                fx.push(Effect::Count(Counter::DiscoveryOk));
                self.failures = 0;
                match change {
                    Some(set) => {
                        self.settle_polls = self.settle_polls.saturating_add(1);
                        self.install(set, &mut fx);
                    }
                    None => self.settle_polls = 0,
                }
                if let (Some(set), false) = (&self.hosts, self.fast()) {
                    if was_fast && !set.is_empty() {
                        fx.push(Effect::Settled(set.len()));
                    }
                    fx.push(Effect::Publish(encode_shared(set, now_ms)));
                }
                self.next_poll_ms = now_ms.saturating_add(self.refresh_ms);
            }
            Err(e) => {
                fx.push(Effect::Count(Counter::DiscoveryFailed));
                self.failures = self.failures.saturating_add(1);
                let delay = self.backoff_ms();
                self.next_poll_ms = now_ms.saturating_add(delay);
                fx.push(Effect::Warn(format!(
                    "discovery poll failed ({} in a row; next in {delay} ms), keeping the last good host set: {e}",
                    self.failures
                )));
            }
        }
        self.retick(&mut fx);
        fx
    }

    /// The delay before the next poll after [`Poller::failures`] consecutive failures.
    fn backoff_ms(&self) -> u64 {
        let base = if self.fast() { FAST_POLL_MS } else { self.refresh_ms };
        let cap = self.refresh_ms.saturating_mul(MAX_BACKOFF_FACTOR).max(FAST_POLL_MS);
        let shift = self.failures.saturating_sub(1).min(32);
        base.saturating_mul(1u64 << shift).min(cap)
    }

    /// Consecutive failed polls so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The shared-data value (see [`Effect::ReadShared`]) at `now_ms`, if any. A VM that
    /// has not seen a healthy set adopts a fresh, non-empty one as settled (only settled
    /// sets are published), and confirms it with its next poll, due at once.
    pub fn on_shared(&mut self, value: Option<&[u8]>, now_ms: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.seen_healthy {
            return fx;
        }
        let max_age = self.refresh_ms.saturating_mul(2).saturating_add(self.timeout_ms);
        let Some(specs) = value.and_then(|v| decode_shared(v, now_ms, max_age)) else { return fx };
        if specs.is_empty() || self.hosts.as_ref().is_some_and(|h| h.same_as(&specs)) {
            return fx;
        }
        let Ok(set) = HostSet::new(specs) else { return fx };
        self.settle_polls = 0;
        self.next_poll_ms = now_ms;
        let n = set.len();
        self.install(Rc::new(set), &mut fx);
        fx.push(Effect::Settled(n));
        self.retick(&mut fx);
        fx
    }

    fn install(&mut self, set: Rc<HostSet>, fx: &mut Vec<Effect>) {
        self.seen_healthy |= !set.is_empty();
        self.hosts = Some(set.clone());
        fx.push(Effect::Install(set));
    }

    /// The tick period the schedule needs: fast, or the refresh interval (the metrics
    /// flush interval when shorter).
    fn want_tick(&self) -> u64 {
        if self.fast() {
            return FAST_POLL_MS;
        }
        let steady = match self.flush_ms {
            0 => self.refresh_ms,
            f => self.refresh_ms.min(f),
        };
        steady.max(MIN_TICK_MS)
    }

    fn retick(&mut self, fx: &mut Vec<Effect>) {
        let want = self.want_tick();
        if want != self.tick_ms {
            self.tick_ms = want;
            fx.push(Effect::Tick(want));
        }
    }

    /// The cluster whose hosts are discovered (for log lines).
    pub fn cluster(&self) -> &str {
        &self.cluster
    }
}

/// What an admin poll answered: the usable hosts of `cluster` (with `drain`, draining
/// ones marked) and their loads, or why the poll failed. `status` is the response's
/// `:status` (`None`: no response, unreachable or timed out). The hosts go to
/// [`Poller::on_poll_result`], the loads to [`crate::load::LoadBook::polled`].
pub fn poll_answer(status: Option<&[u8]>, body: &[u8], cluster: &str, drain: bool) -> Result<admin::Listing, String> {
    match status {
        Some(b"200") => admin::listing(body, cluster, drain).map_err(|e| e.to_string()),
        Some(s) => Err(format!("admin answered status {}", String::from_utf8_lossy(s))),
        None => Err("admin answered status none (unreachable or timed out)".into()),
    }
}

/// The shared-data key of a discovery source. Shared data is process-wide per Envoy
/// `vm_id`, so the key names the filter, the admin cluster and the cluster.
pub fn shared_key(d: &Discovery) -> String {
    format!("session_affinity.discovery.v2\n{}\n{}", d.admin_cluster, d.cluster)
}

const SHARED_MAGIC: &str = "sa-hosts-v2";

/// A host set as shared data: `sa-hosts-v2 <written_ms>` then one `<weight> <address>`
/// line per host, `<weight> <address> draining` for a draining one (a discovered host's
/// key is its address).
pub fn encode_shared(set: &HostSet, now_ms: u64) -> Vec<u8> {
    let mut out = format!("{SHARED_MAGIC} {now_ms}\n");
    for s in set.specs() {
        let flag = if s.draining { " draining" } else { "" };
        out.push_str(&format!("{} {}{flag}\n", s.weight, s.address));
    }
    out.into_bytes()
}

/// The hosts of a shared value written at most `max_age_ms` before `now_ms`. Anything
/// malformed, from another format version, or too old is `None`: shared data is only a
/// head start, the VM's own polls stay the authority.
pub fn decode_shared(value: &[u8], now_ms: u64, max_age_ms: u64) -> Option<Vec<HostSpec>> {
    let text = std::str::from_utf8(value).ok()?;
    let mut lines = text.lines();
    let (magic, written) = lines.next()?.split_once(' ')?;
    if magic != SHARED_MAGIC {
        return None;
    }
    let written: u64 = written.parse().ok()?;
    if now_ms.saturating_sub(written) > max_age_ms {
        return None;
    }
    let mut specs = Vec::new();
    for line in lines {
        let (weight, rest) = line.split_once(' ')?;
        let weight: u32 = weight.parse().ok().filter(|w| *w >= 1)?;
        let (address, draining) = match rest.split_once(' ') {
            None => (rest, false),
            Some((a, "draining")) => (a, true),
            Some(_) => return None,
        };
        let address = hosts::canonical_address(address)?;
        specs.push(HostSpec { key: address.clone(), address, weight, draining });
    }
    Some(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discovery(refresh_ms: u32) -> Discovery {
        Discovery {
            admin_cluster: "admin".into(),
            cluster: "chat".into(),
            refresh_ms,
            timeout_ms: 250,
            startup_wait_ms: 2000,
        }
    }

    fn specs(n: u16) -> Vec<HostSpec> {
        (0..n)
            .map(|i| {
                let a = format!("127.0.0.1:{}", 8001 + i);
                HostSpec { key: a.clone(), address: a, weight: 1, draining: false }
            })
            .collect()
    }

    /// The effects, with sets shown by size and shared values by their host lines.
    fn show(fx: &[Effect]) -> Vec<String> {
        fx.iter()
            .map(|e| match e {
                Effect::Poll => "poll".into(),
                Effect::Tick(ms) => format!("tick {ms}"),
                Effect::Install(set) => format!("install {}", set.len()),
                Effect::Settled(n) => format!("settled {n}"),
                Effect::Publish(v) => format!("publish {}", String::from_utf8_lossy(v).lines().count() - 1),
                Effect::ReadShared => "read shared".into(),
                Effect::Count(c) => format!("count {}", c.name().trim_start_matches("session_affinity.")),
                Effect::Warn(w) => format!("warn {}", &w[..w.find(')').map_or(w.len(), |i| i + 1)]),
            })
            .collect()
    }

    /// Drives a poller: (time, event) -> expected effects.
    enum Ev {
        Tick,
        Ok(u16),
        Fail,
        Shared(Option<Vec<u8>>),
    }

    fn run(p: &mut Poller, steps: &[(u64, Ev, &[&str])]) {
        for (i, (now, ev, want)) in steps.iter().enumerate() {
            let fx = match ev {
                Ev::Tick => p.on_tick(*now),
                Ev::Ok(n) => p.on_poll_result(Ok(specs(*n)), *now),
                Ev::Fail => p.on_poll_result(Err("admin answered status 503".into()), *now),
                Ev::Shared(v) => p.on_shared(v.as_deref(), *now),
            };
            assert_eq!(show(&fx), *want, "step {i} at t={now}");
        }
    }

    #[test]
    fn fast_until_healthy_then_settle_then_steady() {
        let mut p = Poller::new(&discovery(500), 250);
        assert_eq!(show(&p.start(0)), ["read shared", "tick 50"]);
        run(
            &mut p,
            &[
                (50, Ev::Tick, &["read shared", "poll"]),
                // No poll while one is in flight.
                (100, Ev::Tick, &["read shared"]),
                // First answer: empty (health checks not passed yet). Still fast; nothing
                // settled, nothing published.
                (110, Ev::Ok(0), &["count discovery.ok", "install 0"]),
                (150, Ev::Tick, &["read shared", "poll"]),
                (160, Ev::Ok(0), &["count discovery.ok"]),
                (200, Ev::Tick, &["read shared", "poll"]),
                // One host healthy: a change, so keep polling fast while it settles.
                (210, Ev::Ok(1), &["count discovery.ok", "install 1"]),
                (250, Ev::Tick, &["poll"]),
                (260, Ev::Ok(3), &["count discovery.ok", "install 3"]),
                (300, Ev::Tick, &["poll"]),
                // Unchanged: settled (the startup wait ends on the whole set), published,
                // steady ticks (the flush interval, 250 < 500).
                (310, Ev::Ok(3), &["count discovery.ok", "settled 3", "publish 3", "tick 250"]),
                (560, Ev::Tick, &[]),
                (810, Ev::Tick, &["poll"]),
                (820, Ev::Ok(3), &["count discovery.ok", "publish 3"]),
                // A change in steady state: fast until it holds still, then settled again.
                (1320, Ev::Tick, &["poll"]),
                (1330, Ev::Ok(2), &["count discovery.ok", "install 2", "tick 50"]),
                (1380, Ev::Tick, &["poll"]),
                (1390, Ev::Ok(2), &["count discovery.ok", "settled 2", "publish 2", "tick 250"]),
                // Every host down later: an outage, not a startup; polls stay steady. An
                // empty set is published but never reported settled.
                (1890, Ev::Tick, &["poll"]),
                (1900, Ev::Ok(0), &["count discovery.ok", "install 0", "tick 50"]),
                (1950, Ev::Tick, &["poll"]),
                (1960, Ev::Ok(0), &["count discovery.ok", "publish 0", "tick 250"]),
                (2210, Ev::Tick, &[]),
                (2460, Ev::Tick, &["poll"]),
            ],
        );
    }

    #[test]
    fn settling_is_bounded() {
        let mut p = Poller::new(&discovery(1000), 0);
        p.start(0);
        let mut now = 0;
        let mut fast_polls = 0;
        // A flapping cluster: every poll sees another set.
        for i in 0..40u16 {
            now += FAST_POLL_MS;
            let fx = p.on_tick(now);
            if fx.contains(&Effect::Poll) {
                fast_polls += 1;
                p.on_poll_result(Ok(specs(1 + i % 2)), now);
            }
        }
        assert_eq!(fast_polls, MAX_SETTLE_POLLS + 1, "the first poll, then the bounded settle polls");
        assert!(!p.fast());
        assert_eq!(p.want_tick(), 1000, "no flush interval: the refresh interval");
    }

    #[test]
    fn failures_back_off_and_keep_the_set() {
        let mut p = Poller::new(&discovery(500), 250);
        p.start(0);
        // Startup with the admin failing: 50, 100, 200, 400, 800, 1600, then the cap
        // (4 x refresh_ms = 2000).
        run(
            &mut p,
            &[
                (50, Ev::Tick, &["read shared", "poll"]),
                (60, Ev::Fail, &["count discovery.failed", "warn discovery poll failed (1 in a row; next in 50 ms)"]),
                (100, Ev::Tick, &["read shared"]),
                (110, Ev::Tick, &["read shared", "poll"]),
                (120, Ev::Fail, &["count discovery.failed", "warn discovery poll failed (2 in a row; next in 100 ms)"]),
                (200, Ev::Tick, &["read shared"]),
                (220, Ev::Tick, &["read shared", "poll"]),
                (230, Ev::Fail, &["count discovery.failed", "warn discovery poll failed (3 in a row; next in 200 ms)"]),
            ],
        );
        let delays: Vec<u64> = (0..6)
            .map(|_| {
                p.failures += 1;
                p.backoff_ms()
            })
            .collect();
        assert_eq!(delays, [400, 800, 1600, 2000, 2000, 2000]);
        // Recovery: a good poll resets the streak.
        p.in_flight = true;
        run(&mut p, &[(5000, Ev::Ok(2), &["count discovery.ok", "install 2"])]);
        assert_eq!(p.failures(), 0);
        run(
            &mut p,
            &[
                (5050, Ev::Tick, &["poll"]),
                (5060, Ev::Ok(2), &["count discovery.ok", "settled 2", "publish 2", "tick 250"]),
                // Steady failures back off from refresh_ms, keeping the set (no install).
                (5560, Ev::Tick, &["poll"]),
                (
                    5570,
                    Ev::Fail,
                    &["count discovery.failed", "warn discovery poll failed (1 in a row; next in 500 ms)"],
                ),
                (5820, Ev::Tick, &[]),
                (6070, Ev::Tick, &["poll"]),
                (
                    6080,
                    Ev::Fail,
                    &["count discovery.failed", "warn discovery poll failed (2 in a row; next in 1000 ms)"],
                ),
                (6330, Ev::Tick, &[]),
                (6830, Ev::Tick, &[]),
                (7080, Ev::Tick, &["poll"]),
                (
                    7090,
                    Ev::Fail,
                    &["count discovery.failed", "warn discovery poll failed (3 in a row; next in 2000 ms)"],
                ),
                (9090, Ev::Tick, &["poll"]),
                (
                    9100,
                    Ev::Fail,
                    &["count discovery.failed", "warn discovery poll failed (4 in a row; next in 2000 ms)"],
                ),
                (11100, Ev::Tick, &["poll"]),
                (11110, Ev::Ok(2), &["count discovery.ok", "publish 2"]),
            ],
        );
        // A dispatch that cannot be sent is a failed poll too.
        p.in_flight = true;
        assert_eq!(
            show(&p.on_dispatch_failed("no such cluster".into(), 12000)),
            ["count discovery.failed", "warn discovery poll failed (1 in a row; next in 500 ms)"]
        );
        assert!(!p.in_flight);
    }

    #[test]
    fn a_set_that_cannot_be_built_is_a_failed_poll() {
        let mut p = Poller::new(&discovery(500), 0);
        p.start(0);
        p.on_tick(50);
        let dup = vec![specs(1)[0].clone(), specs(1)[0].clone()];
        let fx = p.on_poll_result(Ok(dup), 60);
        assert_eq!(show(&fx)[0], "count discovery.failed");
        assert!(matches!(&fx[1], Effect::Warn(w) if w.contains("duplicate host address 127.0.0.1:8001")));
    }

    #[test]
    fn adopts_a_fresh_shared_set_until_it_has_its_own() {
        let other = HostSet::new(specs(3)).unwrap();
        let mut p = Poller::new(&discovery(500), 250);
        assert_eq!(show(&p.start(5000)), ["read shared", "tick 50"]);
        // Max age: 2 x refresh + timeout = 1250 ms.
        run(
            &mut p,
            &[
                (5000, Ev::Shared(None), &[]),
                (5000, Ev::Shared(Some(b"garbage".to_vec())), &[]),
                (5000, Ev::Shared(Some(encode_shared(&other, 5000 - 1251))), &[]),
                (5000, Ev::Shared(Some(encode_shared(&HostSet::default(), 4990))), &[]),
                // Adopted as settled (only settled sets are published): the startup wait
                // ends at once; steady ticks; the confirming poll is due at once.
                (5000, Ev::Shared(Some(encode_shared(&other, 5000 - 1250))), &["install 3", "settled 3", "tick 250"]),
                (5250, Ev::Tick, &["poll"]),
                (5260, Ev::Ok(3), &["count discovery.ok", "publish 3"]),
                (5300, Ev::Shared(Some(encode_shared(&other, 5300))), &[]),
            ],
        );
        // A VM whose own first poll saw an empty set still adopts a healthy shared one,
        // and its own poll then wins.
        let mut p = Poller::new(&discovery(500), 250);
        p.start(0);
        run(
            &mut p,
            &[
                (50, Ev::Tick, &["read shared", "poll"]),
                (60, Ev::Ok(0), &["count discovery.ok", "install 0"]),
                (100, Ev::Tick, &["read shared", "poll"]),
                (101, Ev::Shared(Some(encode_shared(&other, 90))), &["install 3", "settled 3", "tick 250"]),
                (110, Ev::Ok(2), &["count discovery.ok", "install 2", "tick 50"]),
                (150, Ev::Tick, &["poll"]),
                (160, Ev::Ok(2), &["count discovery.ok", "settled 2", "publish 2", "tick 250"]),
            ],
        );
    }

    #[test]
    fn poll_answers() {
        let body = br#"{"cluster_statuses":[{"name":"chat","host_statuses":[
            {"address":{"socket_address":{"address":"127.0.0.1","port_value":8001}}}]}]}"#;
        assert_eq!(poll_answer(Some(b"200"), body, "chat", false).map(|l| l.hosts.len()), Ok(1));
        assert_eq!(
            poll_answer(Some(b"200"), body, "other", false),
            Err("cluster not found in the admin output".into())
        );
        // A 500 whose body is a valid listing is still a failed poll.
        assert_eq!(poll_answer(Some(b"500"), body, "chat", false), Err("admin answered status 500".into()));
        assert_eq!(poll_answer(Some(b"\xff"), b"", "chat", false), Err("admin answered status \u{fffd}".into()));
        assert_eq!(
            poll_answer(None, body, "chat", false),
            Err("admin answered status none (unreachable or timed out)".into())
        );
    }

    #[test]
    fn shared_values_round_trip_and_refuse_garbage() {
        let set = HostSet::new(vec![
            HostSpec {
                address: "[2001:db8::1]:8080".into(),
                key: "[2001:db8::1]:8080".into(),
                weight: 5,
                draining: false,
            },
            HostSpec { address: "10.0.0.1:80".into(), key: "10.0.0.1:80".into(), weight: 1, draining: false },
            HostSpec { address: "10.0.0.2:80".into(), key: "10.0.0.2:80".into(), weight: 2, draining: true },
        ])
        .unwrap();
        let v = encode_shared(&set, 1234);
        assert_eq!(
            String::from_utf8_lossy(&v),
            "sa-hosts-v2 1234\n1 10.0.0.1:80\n2 10.0.0.2:80 draining\n5 [2001:db8::1]:8080\n"
        );
        assert_eq!(HostSet::new(decode_shared(&v, 1234, 0).unwrap()).unwrap(), set);
        assert_eq!(decode_shared(&v, 1235, 0), None, "too old");
        assert_eq!(decode_shared(&v, 0, 0).map(|s| s.len()), Some(3), "a clock behind the writer's is not 'old'");
        for bad in [
            &b""[..],
            b"sa-hosts-v1 1\n",
            b"sa-hosts-v2 x\n",
            b"sa-hosts-v2 1\n1 10.0.0.1:80 drained\n",
            b"sa-hosts-v2 1\n1 10.0.0.1:80 draining x\n",
            b"sa-hosts-v2 1\n0 10.0.0.1:80\n",
            b"sa-hosts-v2 1\n1 example.com:80\n",
            b"sa-hosts-v2 1\n110.0.0.1:80\n",
            b"sa-hosts-v2 1\n\xff\n",
        ] {
            assert_eq!(decode_shared(bad, 1, 10), None, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(decode_shared(b"sa-hosts-v2 1\n", 1, 10), Some(vec![]));
        assert_eq!(shared_key(&discovery(1)), "session_affinity.discovery.v2\nadmin\nchat");
    }
}
