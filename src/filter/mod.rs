//! The proxy-wasm shell (wasm32 only). It translates and nothing more: each callback
//! gathers its inputs (header bytes, time, host set, the served address), calls one pure
//! function of the core ([`decide`], [`respond`], [`admin::healthy_hosts`]) and applies
//! the result.
//!
//! One VM per Envoy worker; its root context and HTTP contexts share one [`State`] on that
//! thread: the checked configuration, the current host set (replaced whole when discovery
//! sees a change), the metric tally and the metric ids.

mod raw;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use crate::admin;
use crate::config::{Config, Hosts};
use crate::decision::{self, Pending, Scratch, Served, Verdict};
use crate::headers;
use crate::hosts::HostSet;
use crate::metrics::{self, Counter, Delta, NodeSlots};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// Per-VM state shared by the root context and every HTTP context of the worker.
struct State {
    config: Option<Rc<Config>>,
    hosts: Rc<HostSet>,
    /// True once a host set is in use (static, or a first successful poll).
    have_hosts: bool,
    /// True once a host set with at least one host has been in use (see
    /// [`admin::poll_due`]).
    seen_healthy: bool,
    scratch: Scratch,
    slots: NodeSlots,
    /// Envoy metric ids of the fixed counters, by [`Counter::index`].
    counter_ids: Vec<u32>,
    /// Envoy metric ids of the per-node counters, by slot (defined on first use).
    node_ids: Vec<Option<u32>>,
    gauge_id: Option<u32>,
    last_flush_ms: u64,
}

impl Default for State {
    fn default() -> State {
        // The memo's slot hash is seeded per VM so clients cannot aim at its slots.
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        State {
            config: None,
            hosts: Rc::default(),
            have_hosts: false,
            seen_healthy: false,
            scratch: Scratch::new(u64::from_le_bytes(seed)),
            slots: NodeSlots::default(),
            counter_ids: Vec::new(),
            node_ids: Vec::new(),
            gauge_id: None,
            last_flush_ms: 0,
        }
    }
}

impl State {
    /// Sends every pending count to Envoy.
    fn flush(&mut self, now_ms: u64) {
        self.last_flush_ms = now_ms;
        if !self.scratch.tally.is_dirty() {
            return;
        }
        let State { scratch, slots, counter_ids, node_ids, .. } = self;
        scratch.tally.drain(|delta| match delta {
            Delta::Fixed(i, v) => {
                if let Some(id) = counter_ids.get(i) {
                    raw::increment(*id, v);
                }
            }
            Delta::Node(slot, v) => {
                if node_ids.len() <= slot {
                    node_ids.resize(slot + 1, None);
                }
                let id = match node_ids.get(slot).copied().flatten() {
                    Some(id) => Some(id),
                    None => {
                        let id = slots.label(slot).and_then(|l| {
                            proxy_wasm::hostcalls::define_metric(MetricType::Counter, &metrics::node_metric(l)).ok()
                        });
                        if let Some(entry) = node_ids.get_mut(slot) {
                            *entry = id;
                        }
                        id
                    }
                };
                if let Some(id) = id {
                    raw::increment(id, v);
                }
            }
        });
    }

    /// Flushes when due (always when `flush_ms` is 0).
    fn maybe_flush(&mut self, now_ms: u64) {
        let every = self.config.as_ref().map_or(0, |c| u64::from(c.metrics_flush_ms));
        if every == 0 || now_ms.saturating_sub(self.last_flush_ms) >= every {
            self.flush(now_ms);
        }
    }

    /// Installs a new host set.
    fn install(&mut self, mut set: HostSet) {
        set.assign_slots(&mut self.slots);
        if let Some(id) = self.gauge_id {
            let _ = proxy_wasm::hostcalls::record_metric(id, set.len() as u64);
        }
        self.seen_healthy |= !set.is_empty();
        self.hosts = Rc::new(set);
        self.have_hosts = true;
    }
}

fn now_nanos() -> u64 {
    raw::now_nanos().unwrap_or(0)
}

#[derive(Default)]
struct Root {
    state: Rc<RefCell<State>>,
    /// Token of the discovery call in flight.
    in_flight: Option<u32>,
    next_poll_ms: u64,
    tick_ms: u64,
    /// Consecutive polls that saw the host set change.
    settle_polls: u32,
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        self.state.borrow_mut().flush(now_nanos() / 1_000_000);
        true
    }

    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        if self.in_flight != Some(token_id) {
            return;
        }
        self.in_flight = None;
        let Some(Hosts::Discovery(d)) = self.state.borrow().config.as_ref().map(|c| c.hosts.clone()) else {
            return;
        };
        let status = raw::header(MapType::HttpCallResponseHeaders, ":status");
        let result = if status.as_deref() != Some(b"200") {
            Err(format!(
                "admin answered status {}",
                status.map_or("none (unreachable or timed out)".into(), |s| String::from_utf8_lossy(&s).into_owned())
            ))
        } else {
            let body = proxy_wasm::hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default();
            admin::healthy_hosts(&body, &d.cluster).map_err(|e| e.to_string())
        };
        let state = self.state.clone();
        let mut st = state.borrow_mut();
        match result.and_then(|specs| {
            if st.have_hosts && st.hosts.same_as(&specs) {
                Ok(None)
            } else {
                HostSet::new(specs).map(Some).map_err(|e| e.to_string())
            }
        }) {
            Ok(change) => {
                st.scratch.tally.add(Counter::DiscoveryOk);
                // After a change, poll fast until the set holds still (admin::poll_due).
                self.settle_polls = match change {
                    Some(set) => {
                        log::info!("session-affinity: {} healthy hosts in cluster {}", set.len(), d.cluster);
                        st.install(set);
                        self.settle_polls.saturating_add(1)
                    }
                    None => 0,
                };
                let want = if self.fast(&st) { admin::FAST_POLL_MS } else { tick_ms(d.refresh_ms, &st) };
                if self.tick_ms != want {
                    self.tick_ms = want;
                    let _ = proxy_wasm::hostcalls::set_tick_period(Duration::from_millis(want));
                }
            }
            Err(e) => {
                st.scratch.tally.add(Counter::DiscoveryFailed);
                log::warn!("session-affinity: discovery poll failed, keeping the last good host set: {e}");
            }
        }
    }
}

/// The steady tick period with discovery: the refresh interval, or the metrics flush
/// interval when that is shorter.
fn tick_ms(refresh_ms: u32, st: &State) -> u64 {
    let flush = match st.config.as_ref().map(|c| c.metrics_flush_ms) {
        Some(0) | None => refresh_ms,
        Some(f) => f,
    };
    u64::from(refresh_ms.min(flush).max(10))
}

impl Root {
    /// Whether discovery polls on every tick (see [`admin::poll_due`]).
    fn fast(&self, st: &State) -> bool {
        !st.seen_healthy || (self.settle_polls > 0 && self.settle_polls <= admin::MAX_SETTLE_POLLS)
    }

    fn poll(&mut self, d: &crate::config::Discovery) {
        let headers = vec![(":method", "GET"), (":path", "/clusters?format=json"), (":authority", "envoy-admin")];
        match proxy_wasm::hostcalls::dispatch_http_call(
            &d.admin_cluster,
            headers,
            None,
            vec![],
            Duration::from_millis(u64::from(d.timeout_ms)),
        ) {
            Ok(token) => self.in_flight = Some(token),
            Err(status) => {
                self.state.borrow_mut().scratch.tally.add(Counter::DiscoveryFailed);
                log::warn!(
                    "session-affinity: cannot call admin cluster {}: {:?} (is it defined?)",
                    d.admin_cluster,
                    status
                );
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = proxy_wasm::hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let config = match Config::parse(&bytes, &|name| std::env::var(name).ok()) {
            Ok(c) => c,
            Err(e) => {
                log::error!("session-affinity: invalid configuration: {e}");
                return false;
            }
        };
        let mut st = self.state.borrow_mut();
        st.counter_ids.clear();
        for c in Counter::all() {
            match proxy_wasm::hostcalls::define_metric(MetricType::Counter, &c.name()) {
                Ok(id) => st.counter_ids.push(id),
                Err(e) => {
                    log::error!("session-affinity: cannot define metric {}: {e:?}", c.name());
                    return false;
                }
            }
        }
        st.gauge_id = proxy_wasm::hostcalls::define_metric(MetricType::Gauge, &metrics::hosts_healthy_gauge()).ok();
        let flush = config.metrics_flush_ms;
        match &config.hosts {
            Hosts::Static(set) => {
                let set = set.clone();
                st.config = Some(Rc::new(config));
                st.install(set);
                if flush > 0 {
                    self.tick_ms = u64::from(flush);
                    let _ = proxy_wasm::hostcalls::set_tick_period(Duration::from_millis(u64::from(flush)));
                }
            }
            Hosts::Discovery(_) => {
                st.config = Some(Rc::new(config));
                st.have_hosts = false;
                st.seen_healthy = false;
                self.settle_polls = 0;
                // Poll quickly until a set with a healthy host arrives, then every
                // refresh_ms (admin::poll_due).
                self.tick_ms = admin::FAST_POLL_MS;
                self.next_poll_ms = 0;
                let _ = proxy_wasm::hostcalls::set_tick_period(Duration::from_millis(admin::FAST_POLL_MS));
                if let Some(id) = st.gauge_id {
                    let _ = proxy_wasm::hostcalls::record_metric(id, 0);
                }
            }
        }
        log::info!("session-affinity: configured");
        true
    }

    fn on_tick(&mut self) {
        let now_ms = now_nanos() / 1_000_000;
        let discovery = {
            let mut st = self.state.borrow_mut();
            st.flush(now_ms);
            match st.config.as_ref().map(|c| &c.hosts) {
                Some(Hosts::Discovery(d)) => Some((d.clone(), self.fast(&st))),
                _ => None,
            }
        };
        if let Some((d, fast)) = discovery {
            if self.in_flight.is_none() && admin::poll_due(now_ms, self.next_poll_ms, fast) {
                self.next_poll_ms = now_ms + u64::from(d.refresh_ms);
                self.poll(&d);
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { state: self.state.clone(), phase: Phase::Start, nanos: 0 }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

enum Phase {
    Start,
    /// The filter answered locally: nothing to do on the response.
    Replied,
    /// Forwarded upstream; waiting for response headers.
    Forwarded(Pending),
    /// Response headers handled.
    Done,
}

struct Stream {
    state: Rc<RefCell<State>>,
    phase: Phase,
    /// Host time when the request headers arrived; the response phase reuses it (its
    /// uses, a ticket's `iat` and the flush timer, do not need a fresher clock, and a
    /// host call is the dearest thing a request does).
    nanos: u64,
}

const UPSTREAM_ADDRESS: &[u8] = b"upstream\0address";

/// TEST ONLY (Cargo feature `test-trap`, never in a production build): traps the VM when
/// the request (request phase) or the upstream's response (response phase) carries
/// `x-sa-test-trap: <phase>`, so the e2e tests can show what Envoy's `failure_policy` does
/// with a failed VM. The one deliberate panic of the crate.
#[cfg(feature = "test-trap")]
#[allow(clippy::panic)]
fn test_trap(map: MapType, phase: &[u8]) {
    if raw::header(map, "x-sa-test-trap").as_deref() == Some(phase) {
        panic!("session-affinity test-trap: trapping in the {} phase", String::from_utf8_lossy(phase));
    }
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        #[cfg(feature = "test-trap")]
        test_trap(MapType::HttpRequestHeaders, b"request");
        // Without the headers the filter can neither strip spoofed ones nor find the
        // token: refuse rather than forward unfiltered (never expected from Envoy).
        let map = raw::header_map(MapType::HttpRequestHeaders);
        let Some(request) = map.as_deref().and_then(headers::parse_map) else {
            log::error!("session-affinity: cannot read the request headers; refusing the request");
            {
                let mut st = self.state.borrow_mut();
                st.scratch.tally.add(Counter::Requests);
                st.scratch.tally.add(Counter::Outcome(metrics::Outcome::Rejected));
                st.maybe_flush(now_nanos() / 1_000_000);
            }
            self.phase = Phase::Replied;
            let hdrs = headers::serialize_map(&[(b"content-type", b"application/json")]);
            raw::send_local_response(500, "session_affinity_internal", &hdrs, br#"{"error":"internal"}"#);
            return Action::Pause;
        };
        let nanos = now_nanos();
        self.nanos = nanos;
        let now = (nanos / 1_000_000_000) as i64;
        let mut st = self.state.borrow_mut();
        let Some(cfg) = st.config.clone() else { return Action::Continue };
        let hosts = st.hosts.clone();
        let mut random = || {
            let mut b = [0u8; 16];
            getrandom::fill(&mut b).ok().map(|_| b)
        };
        let d = decision::decide(&cfg, &request, &hosts, now, &mut random, &mut st.scratch);
        st.maybe_flush(nanos / 1_000_000);
        drop(st);

        for name in &d.remove {
            raw::remove_header(MapType::HttpRequestHeaders, name);
        }
        match d.verdict {
            Verdict::Forward { set, pending } => {
                for (name, value) in &set {
                    raw::set_header(MapType::HttpRequestHeaders, name, value.as_bytes());
                }
                self.phase = Phase::Forwarded(pending);
                Action::Continue
            }
            Verdict::Reply(reply) => {
                self.phase = Phase::Replied;
                let hdrs: Vec<(&[u8], &[u8])> =
                    reply.headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())).collect();
                let details =
                    if reply.status == 401 { "session_affinity_rejected" } else { "session_affinity_no_host" };
                raw::send_local_response(reply.status, details, &headers::serialize_map(&hdrs), reply.body.as_bytes());
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        #[cfg(feature = "test-trap")]
        test_trap(MapType::HttpResponseHeaders, b"response");
        let Phase::Forwarded(pending) = std::mem::replace(&mut self.phase, Phase::Done) else {
            return Action::Continue;
        };
        let address = raw::property(UPSTREAM_ADDRESS);
        let address = address.as_deref().and_then(|a| std::str::from_utf8(a).ok());
        let status = raw::header(MapType::HttpResponseHeaders, ":status")
            .and_then(|s| std::str::from_utf8(&s).ok().and_then(|s| s.parse::<u32>().ok()));
        let nanos = self.nanos;
        let mut st = self.state.borrow_mut();
        let Some(cfg) = st.config.clone() else { return Action::Continue };
        let hosts = st.hosts.clone();
        let State { slots, scratch, .. } = &mut *st;
        let add = decision::respond(
            &cfg,
            &pending,
            Served { address, status },
            &hosts,
            slots,
            (nanos / 1_000_000_000) as i64,
            &mut scratch.tally,
        );
        st.maybe_flush(nanos / 1_000_000);
        drop(st);
        for (name, value) in &add {
            raw::add_header(MapType::HttpResponseHeaders, name, value.as_bytes());
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // Forwarded but no response headers ever came: the upstream never answered.
        if let Phase::Forwarded(_) = self.phase {
            let mut st = self.state.borrow_mut();
            st.scratch.tally.add(Counter::UpstreamErrors);
            st.maybe_flush(self.nanos / 1_000_000);
        }
    }
}
