//! The proxy-wasm shell (wasm32 only). It translates and nothing more: each callback
//! gathers its inputs (header bytes, time, host set, the served address), calls the pure
//! core ([`decide`], [`respond`], [`discovery::poll_answer`], the [`Poller`] and
//! [`Startup`] state types) and applies the result or performs the effects.
//!
//! One VM per Envoy worker (and one on the main thread); in each, one root context per
//! configuration of the plugin. A root context and the HTTP contexts it creates share one
//! [`State`] on that thread: the checked configuration, the host set in use (replaced
//! whole when discovery sees a change), the startup window, the metric tally and the
//! metric ids.
//!
//! Held requests: while the startup window is open and no settled host set with a healthy
//! host is known, a request is paused (`Action::Pause`) and its context id recorded. When
//! such a set arrives (a poll confirmed by the next, or a set shared by another VM) or the
//! wait has passed, the root context makes
//! each held stream the effective context (`proxy_set_effective_context`), runs the very
//! same request phase as an unheld request would ([`serve`]), resumes it
//! (`proxy_continue_stream`) unless it answered locally, and leaves the response-phase
//! state in [`State::resumed`] for the stream to pick up.

mod raw;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use crate::config::{Config, Discovery, Hosts};
use crate::decision::{self, Ask, LocalReply, Pending, Scratch, Served, Verdict};
use crate::discovery::{self, Effect, Poller};
use crate::headers;
use crate::hosts::HostSet;
use crate::load::InFlight;
use crate::metrics::{self, Counter, Delta, Outcome};
use crate::orca;
use crate::startup::{Admit, Released, Startup};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(Root::new(id)) });
}}

/// A per-VM random seed (the memo's slot hash is seeded so clients cannot aim at slots).
fn seed() -> u64 {
    let mut seed = [0u8; 8];
    let _ = getrandom::fill(&mut seed);
    u64::from_le_bytes(seed)
}

/// Envoy metric ids of this VM.
#[derive(Default)]
struct MetricIds {
    /// The fixed counters, by [`Counter::index`].
    counters: Vec<u32>,
    /// Per-node request counters, by node `h64` (defined on first flush of the node).
    nodes: HashMap<u64, Option<u32>>,
    /// Per-node load gauges (under `placement`), by node `h64`.
    loads: HashMap<u64, Option<u32>>,
    gauge: Option<u32>,
}

/// State shared by a root context and every HTTP context it creates.
struct State {
    config: Option<Rc<Config>>,
    hosts: Rc<HostSet>,
    startup: Startup,
    scratch: Scratch,
    ids: MetricIds,
    last_flush_ms: u64,
    /// Response-phase state of held requests the root context has resumed, by context id.
    resumed: HashMap<u32, Phase>,
    /// This VM has handled a request (a worker's VM).
    routes: bool,
    /// Host time (ns) read at the last tick, and the tick period (ms, 0: no tick). While
    /// the tick runs at least every [`CLOCK_TICK_MS`], requests read this instead of the
    /// host clock (one host call fewer): time is then at most a tick stale, which token
    /// expiry (seconds, with leeway), tickets (seconds) and load reports (`stale_ms`)
    /// tolerate.
    tick_nanos: Option<u64>,
    tick_ms: u64,
}

/// Requests use the tick's clock while ticks come at least this often.
const CLOCK_TICK_MS: u64 = 1000;

impl State {
    fn new() -> State {
        State {
            config: None,
            hosts: Rc::default(),
            startup: Startup::closed(),
            scratch: Scratch::new(seed()),
            ids: MetricIds::default(),
            last_flush_ms: 0,
            resumed: HashMap::new(),
            routes: false,
            tick_nanos: None,
            tick_ms: 0,
        }
    }

    /// Sends every pending count to Envoy, and (under `placement`, from a VM that routes
    /// requests) every node's load.
    fn flush(&mut self, now_ms: u64) {
        self.last_flush_ms = now_ms;
        // The main thread's VM never routes a request: its view of the loads is the admin
        // poll's alone, so it leaves the gauges to the workers' VMs.
        if self.config.as_ref().is_some_and(|c| c.placement.is_some()) && self.routes {
            let State { scratch, ids, hosts, .. } = self;
            for (i, h) in hosts.hosts().iter().enumerate() {
                let id = *ids.loads.entry(h.h64).or_insert_with(|| {
                    proxy_wasm::hostcalls::define_metric(MetricType::Gauge, &metrics::node_load_gauge(&h.key)).ok()
                });
                if let Some(id) = id {
                    let _ = proxy_wasm::hostcalls::record_metric(id, u64::from(scratch.load.load(i)));
                }
            }
        }
        if !self.scratch.tally.is_dirty() {
            return;
        }
        let State { scratch, ids, .. } = self;
        scratch.tally.drain(|delta| match delta {
            Delta::Fixed(i, v) => {
                if let Some(id) = ids.counters.get(i) {
                    raw::increment(*id, v);
                }
            }
            Delta::Node { h64, key, count } => {
                let id = *ids.nodes.entry(h64).or_insert_with(|| {
                    proxy_wasm::hostcalls::define_metric(MetricType::Counter, &metrics::node_metric(key)).ok()
                });
                if let Some(id) = id {
                    raw::increment(id, count);
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

    /// Puts a host set in use (and keys the loads like it).
    fn install(&mut self, set: Rc<HostSet>) {
        if let Some(id) = self.ids.gauge {
            let _ = proxy_wasm::hostcalls::record_metric(id, set.len() as u64);
        }
        let order: Vec<u64> = set.hosts().iter().map(|h| h.h64).collect();
        self.scratch.load.align(&order);
        self.hosts = set;
    }
}

fn now_nanos() -> u64 {
    raw::now_nanos().unwrap_or(0)
}

/// The time a request is decided at: the last tick's clock while ticks are frequent
/// (see [`State::tick_nanos`]), else the host clock.
fn request_nanos(state: &RefCell<State>) -> u64 {
    let st = state.borrow();
    match st.tick_nanos {
        Some(t) if st.tick_ms > 0 && st.tick_ms <= CLOCK_TICK_MS => t,
        _ => now_nanos(),
    }
}

/// Sets the root context's tick period and remembers it (for [`request_nanos`]).
fn set_tick(state: &RefCell<State>, ms: u64) {
    let _ = proxy_wasm::hostcalls::set_tick_period(Duration::from_millis(ms));
    let mut st = state.borrow_mut();
    st.tick_ms = ms;
    st.tick_nanos = Some(now_nanos());
}

/// Sends a local reply of the core.
fn reply(r: &LocalReply) {
    let hdrs: Vec<(&[u8], &[u8])> = r.headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())).collect();
    raw::send_local_response(r.status, r.details, &headers::serialize_map(&hdrs), r.body.as_bytes());
}

/// The host inputs a decision asks for only when it needs them.
struct HostAsk;

const SOURCE_ADDRESS: &[u8] = b"source\0address";
const UPSTREAM_ADDRESS: &[u8] = b"upstream\0address";

impl Ask for HostAsk {
    fn random(&mut self) -> Option<[u8; 16]> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).ok().map(|_| b)
    }
    fn source_address(&mut self) -> Option<Vec<u8>> {
        raw::property(SOURCE_ADDRESS)
    }
}

/// The request phase of one request, on the current context (or, for a held request
/// the root context resumes, on the effective one): reads the headers, decides, applies.
/// The same code for a held and an unheld request.
fn serve(state: &RefCell<State>, nanos: u64) -> Phase {
    // Without the headers the filter can neither strip spoofed ones nor find the
    // session: refuse rather than forward unfiltered (never expected from Envoy).
    let map = raw::header_map(MapType::HttpRequestHeaders);
    let Some(request) = map.as_deref().and_then(headers::parse_map) else {
        log::error!("session-affinity: cannot read the request headers; refusing the request");
        let mut st = state.borrow_mut();
        st.scratch.tally.add(Counter::Requests);
        st.scratch.tally.add(Counter::Outcome(Outcome::Rejected));
        st.maybe_flush(nanos / 1_000_000);
        drop(st);
        reply(&decision::unreadable_headers());
        return Phase::Replied;
    };
    let mut st = state.borrow_mut();
    let Some(cfg) = st.config.clone() else { return Phase::Start };
    st.routes = true;
    let hosts = st.hosts.clone();
    let d = decision::decide_at(&cfg, &request, &hosts, nanos / 1_000_000, &mut HostAsk, &mut st.scratch);
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
            Phase::Forwarded { pending, nanos }
        }
        Verdict::Reply(r) => {
            reply(&r);
            Phase::Replied
        }
    }
}

struct Root {
    id: u32,
    state: Rc<RefCell<State>>,
    /// Discovery, when configured: the schedule, its source and shared-data key.
    discovery: Option<(Poller, Discovery, String)>,
    /// Token of the discovery call in flight.
    in_flight: Option<u32>,
}

impl Root {
    fn new(id: u32) -> Root {
        Root { id, state: Rc::new(RefCell::new(State::new())), discovery: None, in_flight: None }
    }

    /// Performs the effects of the discovery schedule, then resumes what they released.
    fn apply(&mut self, fx: Vec<Effect>, now_ms: u64) {
        let mut queue: VecDeque<Effect> = fx.into();
        let mut released = Vec::new();
        while let Some(effect) = queue.pop_front() {
            let Some((poller, d, key)) = self.discovery.as_mut() else { return };
            match effect {
                Effect::Poll => {
                    let headers =
                        vec![(":method", "GET"), (":path", "/clusters?format=json"), (":authority", "envoy-admin")];
                    match proxy_wasm::hostcalls::dispatch_http_call(
                        &d.admin_cluster,
                        headers,
                        None,
                        vec![],
                        Duration::from_millis(u64::from(d.timeout_ms)),
                    ) {
                        Ok(token) => self.in_flight = Some(token),
                        Err(status) => queue.extend(poller.on_dispatch_failed(
                            format!("cannot call admin cluster {}: {status:?} (is it defined?)", d.admin_cluster),
                            now_ms,
                        )),
                    }
                }
                Effect::Tick(ms) => set_tick(&self.state, ms),
                Effect::Install(set) => {
                    let draining = set.hosts().iter().filter(|h| h.draining).count();
                    if draining > 0 {
                        log::info!(
                            "session-affinity: {} healthy hosts in cluster {} ({draining} draining)",
                            set.len(),
                            d.cluster
                        );
                    } else {
                        log::info!("session-affinity: {} healthy hosts in cluster {}", set.len(), d.cluster);
                    }
                    self.state.borrow_mut().install(set);
                }
                Effect::Settled(n) => released.extend(self.state.borrow_mut().startup.on_hosts(n, now_ms)),
                Effect::Publish(value) => {
                    raw::set_shared_data(key, &value);
                }
                Effect::ReadShared => {
                    let value = raw::shared_data(key);
                    queue.extend(poller.on_shared(value.as_deref(), now_ms));
                }
                Effect::Count(c) => self.state.borrow_mut().scratch.tally.add(c),
                Effect::Warn(message) => log::warn!("session-affinity: {message}"),
            }
        }
        self.resume(released);
    }

    /// Runs the request phase of each released request on its own stream and resumes it.
    fn resume(&self, released: Vec<Released>) {
        if released.is_empty() {
            return;
        }
        let nanos = now_nanos();
        let (mut resumed, mut longest) = (0usize, 0u64);
        for r in &released {
            // A stream that has ended is gone from Envoy too.
            if !raw::set_effective_context(r.id) {
                continue;
            }
            let phase = serve(&self.state, nanos);
            if !matches!(phase, Phase::Replied) {
                raw::continue_request();
            }
            self.state.borrow_mut().resumed.insert(r.id, phase);
            resumed += 1;
            longest = longest.max(r.held_ms);
        }
        raw::set_effective_context(self.id);
        log::info!("session-affinity: resumed {resumed} requests held at startup (longest {longest} ms)");
    }
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
        let Some(cluster) = self.discovery.as_ref().map(|(_, d, _)| d.cluster.clone()) else { return };
        let placement = self.state.borrow().config.as_ref().is_some_and(|c| c.placement.is_some());
        let drain = self.state.borrow().config.as_ref().and_then(|c| c.placement.as_ref()).is_some_and(|p| p.drain);
        let status = raw::header(MapType::HttpCallResponseHeaders, ":status");
        let body = match status.as_deref() {
            Some(b"200") => proxy_wasm::hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let result = discovery::poll_answer(status.as_deref(), &body, &cluster, drain);
        let now_ms = now_nanos() / 1_000_000;
        // The nodes' loads as Envoy counts them (rq_active), the base of placement.
        if let (true, Ok(listing)) = (placement, &result) {
            let polled = listing.rq_active.iter().map(|(a, n)| (crate::affinity::h64(a.as_bytes()), *n));
            self.state.borrow_mut().scratch.load.polled(polled);
        }
        let fx = match self.discovery.as_mut() {
            Some((poller, _, _)) => poller.on_poll_result(result.map(|l| l.hosts), now_ms),
            None => return,
        };
        self.apply(fx, now_ms);
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
        let now_ms = now_nanos() / 1_000_000;
        let mut st = self.state.borrow_mut();
        st.ids.counters.clear();
        for c in Counter::all() {
            match proxy_wasm::hostcalls::define_metric(MetricType::Counter, &c.name()) {
                Ok(id) => st.ids.counters.push(id),
                Err(e) => {
                    log::error!("session-affinity: cannot define metric {}: {e:?}", c.name());
                    return false;
                }
            }
        }
        st.ids.gauge = proxy_wasm::hostcalls::define_metric(MetricType::Gauge, &metrics::hosts_healthy_gauge()).ok();
        // Memoized verdicts belong to the previous configuration's keys and settings.
        st.scratch.new_config(seed());
        let flush = config.metrics_flush_ms;
        let hosts = config.hosts.clone();
        st.config = Some(Rc::new(config));
        let (fx, released) = match hosts {
            Hosts::Static(set) => {
                self.discovery = None;
                let released = st.startup.restart(now_ms, 0);
                st.install(Rc::new(set));
                if flush > 0 {
                    drop(st);
                    set_tick(&self.state, u64::from(flush));
                    st = self.state.borrow_mut();
                }
                (Vec::new(), released)
            }
            Hosts::Discovery(d) => {
                // Until a set arrives: no hosts, and requests wait (startup_wait_ms).
                st.hosts = Rc::default();
                if let Some(id) = st.ids.gauge {
                    let _ = proxy_wasm::hostcalls::record_metric(id, 0);
                }
                let released = st.startup.restart(now_ms, u64::from(d.startup_wait_ms));
                let mut poller = Poller::new(&d, flush);
                let fx = poller.start(now_ms);
                let key = discovery::shared_key(&d);
                self.discovery = Some((poller, d, key));
                self.in_flight = None;
                (fx, released)
            }
        };
        drop(st);
        log::info!("session-affinity: configured");
        self.apply(fx, now_ms);
        self.resume(released);
        true
    }

    fn on_tick(&mut self) {
        let nanos = now_nanos();
        self.state.borrow_mut().tick_nanos = Some(nanos);
        let now_ms = nanos / 1_000_000;
        self.state.borrow_mut().flush(now_ms);
        if let Some((poller, _, _)) = self.discovery.as_mut() {
            let fx = poller.on_tick(now_ms);
            self.apply(fx, now_ms);
        }
        let released = self.state.borrow_mut().startup.on_tick(now_ms);
        self.resume(released);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { id: context_id, state: self.state.clone(), phase: Phase::Start }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

enum Phase {
    /// Nothing decided (yet, or no configuration): nothing to do on the response.
    Start,
    /// Paused at startup; the root context resumes it (see [`State::resumed`]).
    Held,
    /// The filter answered locally: nothing to do on the response.
    Replied,
    /// Forwarded upstream; waiting for response headers. `nanos`: host time of the
    /// decision; the response phase reuses it (its uses, a ticket's `iat` and the flush
    /// timer, do not need a fresher clock, and a host call is the dearest thing a request
    /// does).
    Forwarded { pending: Pending, nanos: u64 },
    /// Response headers handled; under `placement`, the request still counts in its
    /// node's load until it ends.
    Done(Option<InFlight>),
}

struct Stream {
    id: u32,
    state: Rc<RefCell<State>>,
    phase: Phase,
}

impl Stream {
    /// A held request takes over the phase the root context left when it resumed it.
    fn take_resumed(&mut self) {
        if let Phase::Held = self.phase {
            if let Some(phase) = self.state.borrow_mut().resumed.remove(&self.id) {
                self.phase = phase;
            }
        }
    }
}

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

impl Context for Stream {
    fn on_done(&mut self) -> bool {
        // A stream that ends while held is never resumed.
        self.take_resumed();
        if let Phase::Held = self.phase {
            self.state.borrow_mut().startup.on_gone(self.id);
        }
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        #[cfg(feature = "test-trap")]
        test_trap(MapType::HttpRequestHeaders, b"request");
        let nanos = request_nanos(&self.state);
        {
            let mut st = self.state.borrow_mut();
            if st.startup.on_request(self.id, nanos / 1_000_000) == Admit::Hold {
                st.scratch.tally.add(Counter::StartupHeld);
                self.phase = Phase::Held;
                return Action::Pause;
            }
        }
        self.phase = serve(&self.state, nanos);
        match self.phase {
            Phase::Replied => Action::Pause,
            _ => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        #[cfg(feature = "test-trap")]
        test_trap(MapType::HttpResponseHeaders, b"response");
        self.take_resumed();
        let Phase::Forwarded { pending, nanos } = std::mem::replace(&mut self.phase, Phase::Done(None)) else {
            return Action::Continue;
        };
        self.phase = Phase::Done(pending.in_flight);
        // One read of the response head: its status, whether the first attempt answered
        // (then the primary served, and `upstream.address` is not asked), the load report.
        let map = raw::header_map(MapType::HttpResponseHeaders);
        let parsed = map.as_deref().and_then(headers::parse_map).unwrap_or_default();
        let head = decision::response_head(&parsed);
        let looked_up;
        let address = match (&pending.primary, head.first_attempt) {
            (Some(primary), true) => Some(primary.as_str()),
            _ => {
                looked_up = raw::property(UPSTREAM_ADDRESS);
                looked_up.as_deref().and_then(|a| std::str::from_utf8(a).ok())
            }
        };
        let (cfg, hosts) = {
            let st = self.state.borrow();
            (st.config.clone(), st.hosts.clone())
        };
        let Some(cfg) = cfg else { return Action::Continue };
        // Saturation: the node's own load report, recorded at the time it came.
        let saturation = cfg.placement.as_ref().is_some_and(|p| p.saturation.is_some());
        let now_ms = if saturation { request_nanos(&self.state) / 1_000_000 } else { 0 };
        let mut st = self.state.borrow_mut();
        let served = Served { address, status: head.status };
        let add =
            decision::respond(&cfg, &pending, served, &hosts, (nanos / 1_000_000_000) as i64, &mut st.scratch.tally);
        if saturation {
            let node = decision::served_node(&pending, served, &hosts);
            decision::observe_load(&cfg, node, head.load_report, now_ms, &mut st.scratch.load);
        }
        st.maybe_flush(nanos / 1_000_000);
        drop(st);
        if saturation && pending.strip_load_report && head.load_report.is_some() {
            raw::remove_header(MapType::HttpResponseHeaders, orca::REPORT_HEADER);
        }
        for (name, value) in &add {
            raw::add_header(MapType::HttpResponseHeaders, name, value.as_bytes());
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        self.take_resumed();
        match &self.phase {
            // Forwarded but no response headers ever came: the upstream never answered.
            Phase::Forwarded { nanos, pending } => {
                let mut st = self.state.borrow_mut();
                st.scratch.tally.add(Counter::UpstreamErrors);
                if let Some(f) = pending.in_flight {
                    st.scratch.load.finished(f);
                }
                st.maybe_flush(nanos / 1_000_000);
            }
            // The request no longer counts in its node's load.
            Phase::Done(Some(f)) => self.state.borrow_mut().scratch.load.finished(*f),
            _ => {}
        }
    }
}
