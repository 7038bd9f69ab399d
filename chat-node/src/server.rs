//! The network shell: a listener, one thread per connection (Envoy pools keep-alive
//! connections, so a thread blocks on each one), and graceful shutdown.
//!
//! Invariants: at most `threads` connections are served at once (beyond that, new ones
//! wait in the kernel's accept queue, and idle keep-alive connections close to make
//! room); an idle keep-alive connection is closed after [`IDLE_TIMEOUT`]; on
//! SIGTERM/SIGINT the node stops accepting, lets in-flight requests finish (a turn may be
//! retrying Redis), closes idle connections and exits. A second signal exits at once.
//! Killing the process is safe too: a turn is in Redis before its reply is sent.

use crate::config::Config;
use crate::http::{self, HttpError, Request};
use crate::llm::Llm;
use crate::model::{Builtin, Model};
use crate::redis::RedisStore;
use crate::service::{error, Service};
use crate::stats::Stats;
use crate::store::Store;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Largest request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// An idle keep-alive connection is closed after this long (longer than typical proxy
/// pool idle timeouts would make closes race with reuse less often).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often an idle connection checks for shutdown.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// Time allowed to receive the rest of a request once it has started, and to send a
/// response.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Stack of a connection thread (requests need little; there may be hundreds).
const THREAD_STACK: usize = 512 * 1024;

/// Builds the node from `config` and serves until SIGTERM/SIGINT.
pub fn run(config: Config) -> Result<(), String> {
    let stats = Arc::new(Stats::new());
    let store: Arc<dyn Store> = Arc::new(RedisStore::new(&config.redis, config.redis_retry, Arc::clone(&stats)));
    let (model, model_name): (Box<dyn Model>, String) = match &config.llm {
        Some(llm) => (
            Box::new(Llm::new(llm.clone())),
            format!("LLM {} at http://{}{}", llm.model, llm.endpoint.authority, llm.endpoint.path),
        ),
        None => (Box::new(Builtin), "built-in deterministic model".into()),
    };
    let service = Arc::new(Service::new(&config.node_id, config.cache_size, config.ttl_seconds, store, model, stats));
    let listener = TcpListener::bind(&config.listen).map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let local = listener.local_addr().map_err(|e| format!("cannot read the listening address: {e}"))?;
    // Tests read this line to learn the port when listening on port 0.
    eprintln!("chat-node {}: listening on {local}; redis {}; {model_name}", config.node_id, config.redis);

    let shutdown = Arc::new(AtomicBool::new(false));
    watch_signals(Arc::clone(&shutdown), wake_address(local));
    let slots = Arc::new(Slots::default());

    for incoming in listener.incoming() {
        if shutdown.load(Ordering::SeqCst) {
            break;
        }
        let stream = match incoming {
            Ok(stream) => stream,
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                eprintln!("chat-node {}: accept failed: {e}", config.node_id);
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if !slots.acquire(config.threads, &shutdown) {
            break;
        }
        let (service, shutdown, slots_for_thread) = (Arc::clone(&service), Arc::clone(&shutdown), Arc::clone(&slots));
        let spawned = thread::Builder::new().name("conn".into()).stack_size(THREAD_STACK).spawn(move || {
            serve_connection(stream, &service, &shutdown, &slots_for_thread);
            slots_for_thread.release();
        });
        if let Err(e) = spawned {
            eprintln!("chat-node {}: cannot start a thread: {e}", config.node_id);
            // The closure, and the slot it held, was dropped unrun: give the slot back.
            slots.release();
        }
    }

    // Refuse new connections at once (a proxy then tries another node) while the
    // in-flight requests finish.
    drop(listener);
    let grace = config.redis_retry + Duration::from_secs(5);
    let left = slots.drain(grace);
    eprintln!("chat-node {}: stopped ({left} connection(s) still open)", config.node_id);
    Ok(())
}

/// Counts connection threads, bounding them and letting shutdown wait for them.
/// While the acceptor waits for a slot, `starved` asks idle keep-alive connections to
/// close and make room.
#[derive(Default)]
struct Slots {
    active: Mutex<usize>,
    changed: Condvar,
    starved: AtomicBool,
}

impl Slots {
    /// Waits for a free slot; `false` if shutdown began meanwhile.
    fn acquire(&self, max: usize, shutdown: &AtomicBool) -> bool {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        while *active >= max {
            self.starved.store(true, Ordering::SeqCst);
            if shutdown.load(Ordering::SeqCst) {
                self.starved.store(false, Ordering::SeqCst);
                return false;
            }
            active = self
                .changed
                .wait_timeout(active, IDLE_POLL)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        self.starved.store(false, Ordering::SeqCst);
        *active += 1;
        true
    }

    /// Whether a new connection is waiting for a slot.
    fn starved(&self) -> bool {
        self.starved.load(Ordering::SeqCst)
    }

    fn release(&self) {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        *active = active.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Waits up to `grace` for every connection to end; returns how many are left.
    fn drain(&self, grace: Duration) -> usize {
        let deadline = Instant::now() + grace;
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        while *active > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            active = self
                .changed
                .wait_timeout(active, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        *active
    }
}

/// On the first SIGTERM/SIGINT: set `shutdown` and wake the accept loop by connecting to
/// it. On a second: exit at once.
fn watch_signals(shutdown: Arc<AtomicBool>, wake: SocketAddr) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("chat-node: no graceful shutdown (cannot watch signals: {e})");
            return;
        }
    };
    let spawned = thread::Builder::new().name("signals".into()).spawn(move || {
        for signal in signals.forever() {
            if shutdown.swap(true, Ordering::SeqCst) {
                eprintln!("chat-node: second signal, exiting now");
                std::process::exit(128 + signal);
            }
            eprintln!("chat-node: signal {signal}, finishing in-flight requests");
            let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        }
    });
    if let Err(e) = spawned {
        eprintln!("chat-node: no graceful shutdown (cannot start signal thread: {e})");
    }
}

/// An address that reaches `local` from this host (a wildcard bind is reached on
/// loopback).
fn wake_address(local: SocketAddr) -> SocketAddr {
    match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), local.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), local.port()),
        _ => local,
    }
}

/// Serves requests on one connection until it closes, errs, idles out or shutdown.
fn serve_connection(stream: TcpStream, service: &Service, shutdown: &AtomicBool, slots: &Slots) {
    let stats = service.stats();
    Stats::inc(&stats.connections_total);
    Stats::inc(&stats.connections_open);
    let _ = serve_requests(stream, service, shutdown, slots);
    stats.connections_open.fetch_sub(1, Ordering::Relaxed);
}

fn serve_requests(stream: TcpStream, service: &Service, shutdown: &AtomicBool, slots: &Slots) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    // The address Envoy connected to: tells a primary from a fallback (service::Placement).
    let local = stream.local_addr().ok();
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        if !wait_for_request(&mut reader, shutdown, slots)? {
            return Ok(());
        }
        reader.get_ref().set_read_timeout(Some(IO_TIMEOUT))?;
        let mut req = match http::read_request_head(&mut reader) {
            Ok(req) => req,
            Err(e) => return refuse(&mut writer, service, &e),
        };
        if req.expects_continue() {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            writer.flush()?;
        }
        if let Err(e) = http::read_request_body(&mut reader, &mut req, MAX_BODY_BYTES) {
            return refuse(&mut writer, service, &e);
        }
        let resp = service.handle(&req, local, unix_now());
        let keep_alive = req.keep_alive() && !shutdown.load(Ordering::SeqCst);
        http::write_response(&mut writer, &resp, keep_alive, is_head(&req))?;
        if !keep_alive {
            return Ok(());
        }
    }
}

/// Waits for the first byte of the next request, polling for shutdown; `false` when the
/// connection should close (peer closed, idle too long, shutting down, or idle while a
/// new connection waits for a slot).
fn wait_for_request(reader: &mut BufReader<TcpStream>, shutdown: &AtomicBool, slots: &Slots) -> io::Result<bool> {
    if !reader.buffer().is_empty() {
        return Ok(true);
    }
    reader.get_ref().set_read_timeout(Some(IDLE_POLL))?;
    let idle_since = Instant::now();
    loop {
        match reader.fill_buf() {
            Ok(buf) => return Ok(!buf.is_empty()),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if shutdown.load(Ordering::SeqCst) || slots.starved() || idle_since.elapsed() >= IDLE_TIMEOUT {
                    return Ok(false);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Answers a request that could not be read (if an answer is possible), then closes.
fn refuse(writer: &mut TcpStream, service: &Service, e: &HttpError) -> io::Result<()> {
    let Some(status) = e.status() else {
        return Ok(());
    };
    Stats::inc(&service.stats().bad_requests);
    let code = match status {
        413 => "body_too_large",
        431 => "headers_too_large",
        501 => "not_implemented",
        _ => "bad_request",
    };
    let resp = error(status, code, &e.to_string()).with_header("x-served-by", service.node_id());
    http::write_response(writer, &resp, false, false)?;
    linger(writer);
    Ok(())
}

/// Closes gracefully after an early error reply: the client may still be sending the
/// body we refused, and closing with unread input would reset the connection and can
/// destroy our reply before the client reads it. So stop writing, then read and drop
/// what is still coming, for a bounded time and amount.
fn linger(stream: &mut TcpStream) {
    const LINGER_TIME: Duration = Duration::from_secs(2);
    const LINGER_BYTES: usize = 4 * MAX_BODY_BYTES;
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER_TIME;
    let mut drained = 0usize;
    let mut buf = [0u8; 16 * 1024];
    while drained < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

fn is_head(req: &Request) -> bool {
    req.method == "HEAD"
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn wake_address_maps_wildcards_to_loopback() {
        let table = [("0.0.0.0:80", "127.0.0.1:80"), ("[::]:81", "[::1]:81"), ("10.1.2.3:82", "10.1.2.3:82")];
        for (local, want) in table {
            assert_eq!(wake_address(local.parse().unwrap()).to_string(), want);
        }
    }

    #[test]
    fn slots_bound_and_drain() {
        let slots = Arc::new(Slots::default());
        let shutdown = AtomicBool::new(false);
        assert!(slots.acquire(2, &shutdown));
        assert!(slots.acquire(2, &shutdown));
        let releaser = {
            let slots = Arc::clone(&slots);
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(50));
                slots.release();
            })
        };
        assert!(!slots.starved());
        assert!(slots.acquire(2, &shutdown)); // waits for the release
        assert!(!slots.starved());
        releaser.join().unwrap();
        shutdown.store(true, Ordering::SeqCst);
        assert!(!slots.acquire(2, &shutdown));
        assert_eq!(slots.drain(Duration::from_millis(10)), 2);
        slots.release();
        slots.release();
        assert_eq!(slots.drain(Duration::from_millis(10)), 0);
    }
}
