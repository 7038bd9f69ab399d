//! `openloop`: a fixed-rate (open-loop) HTTP/1.1 load generator for `make bench`, the
//! `-R` of wrk2 that Debian's `wrk` lacks.
//!
//! ```text
//! openloop --addr 127.0.0.1:10000 --rate 8000 --duration 4 [--warmup 1] [--connections 64]
//!          [--path /] [--header "name: value"]...
//! ```
//!
//! Why its latencies are honest:
//!
//! - Requests are due on a fixed schedule, one every `1/rate` seconds, decided before the
//!   run; the schedule never waits for responses.
//! - A request's latency runs from the moment it was *due* to the end of its response,
//!   so any wait (for a free connection, for this program's own event loop, for a late
//!   timer) counts against the server: no coordinated omission. `late_p99_us` reports
//!   how late sends actually left, to show the generator kept up.
//! - Keep-alive connections, one request in flight per connection (no pipelining), like
//!   wrk; a due request takes any idle connection, FIFO.
//! - One thread, epoll and a `timerfd` armed at the next due time (absolute
//!   `CLOCK_MONOTONIC`, nanoseconds, timer slack set to 1 ns): no sleeping or spinning
//!   between sends.
//!
//! Prints one JSON object: counts, achieved rate, and latency percentiles in µs.

#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

struct Conn {
    stream: TcpStream,
    /// Due time of the request in flight.
    due: Option<u64>,
    buf: Vec<u8>,
}

struct Args {
    addr: String,
    rate: f64,
    duration: f64,
    warmup: f64,
    connections: usize,
    path: String,
    headers: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        addr: String::new(),
        rate: 0.0,
        duration: 4.0,
        warmup: 1.0,
        connections: 64,
        path: "/".into(),
        headers: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => a.addr = val()?,
            "--rate" => a.rate = val()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--duration" => a.duration = val()?.parse().map_err(|e| format!("--duration: {e}"))?,
            "--warmup" => a.warmup = val()?.parse().map_err(|e| format!("--warmup: {e}"))?,
            "--connections" => a.connections = val()?.parse().map_err(|e| format!("--connections: {e}"))?,
            "--path" => a.path = val()?,
            "--header" => a.headers.push(val()?),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.addr.is_empty() || a.rate <= 0.0 || a.connections == 0 {
        return Err("usage: openloop --addr HOST:PORT --rate R [--duration S] [--warmup S] [--connections N] \
                    [--path P] [--header 'k: v']..."
            .into());
    }
    Ok(a)
}

/// Length of a complete response at the start of `buf` (headers + content-length body).
fn response_len(buf: &[u8]) -> Option<Result<(usize, u16), String>> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let status = head.get(9..12).and_then(|s| s.parse::<u16>().ok()).unwrap_or(0);
    let mut length = None;
    for line in head.split("\r\n").skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                return Some(Err("chunked responses are not supported".into()));
            }
        }
    }
    let total = end + length.unwrap_or(0);
    (buf.len() >= total).then_some(Ok((total, status)))
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("openloop: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("openloop: {e}");
        std::process::exit(1);
    }
}

fn connect(addr: &str) -> Result<TcpStream, String> {
    let s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(s)
}

fn epoll_add(ep: i32, fd: i32, token: u64) -> Result<(), String> {
    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
    // SAFETY: valid epoll fd, fd and event.
    if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
        return Err(format!("epoll_ctl: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn run(a: &Args) -> Result<(), String> {
    let mut request = format!("GET {} HTTP/1.1\r\nhost: bench\r\n", a.path);
    for h in &a.headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let request = request.into_bytes();

    // Timers fire up to 50 µs late by default (timer slack); we want them on time.
    // SAFETY: plain syscalls; fds are checked.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    let tfd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
    if ep < 0 || tfd < 0 {
        return Err("epoll/timerfd unavailable".into());
    }
    const TIMER: u64 = u64::MAX;
    epoll_add(ep, tfd, TIMER)?;
    let mut conns = Vec::with_capacity(a.connections);
    for i in 0..a.connections {
        let stream = connect(&a.addr)?;
        epoll_add(ep, stream.as_raw_fd(), i as u64)?;
        conns.push(Conn { stream, due: None, buf: Vec::with_capacity(4096) });
    }
    let mut idle: VecDeque<usize> = (0..a.connections).collect();
    let mut waiting: VecDeque<u64> = VecDeque::new();

    let interval = 1e9 / a.rate;
    let start = now_ns() + 50_000_000; // let the connections settle
    let measure_from = start + (a.warmup * 1e9) as u64;
    let total = ((a.warmup + a.duration) * a.rate).round() as u64;
    let end = start + ((a.warmup + a.duration) * 1e9) as u64;
    let due_of = |k: u64| start + (k as f64 * interval) as u64;

    let mut next = 0u64; // index of the next scheduled request
    let mut latencies: Vec<u64> = Vec::with_capacity((a.duration * a.rate) as usize + 16);
    let mut lateness: Vec<u64> = Vec::with_capacity((a.duration * a.rate) as usize + 16);
    let (mut sent, mut done, mut errors, mut non2xx, mut reconnects) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut chunk = [0u8; 16384];

    loop {
        let now = now_ns();
        while next < total && due_of(next) <= now {
            waiting.push_back(due_of(next));
            next += 1;
        }
        while let (Some(&due), Some(&c)) = (waiting.front(), idle.front()) {
            waiting.pop_front();
            idle.pop_front();
            let conn = &mut conns[c];
            match conn.stream.write(&request) {
                Ok(n) if n == request.len() => {
                    conn.due = Some(due);
                    sent += 1;
                    if due >= measure_from {
                        lateness.push(now_ns().saturating_sub(due));
                    }
                }
                _ => {
                    errors += 1;
                    reconnects += 1;
                    conn.stream = connect(&a.addr)?;
                    epoll_add(ep, conn.stream.as_raw_fd(), c as u64)?;
                    idle.push_back(c);
                }
            }
        }
        let in_flight = conns.iter().filter(|c| c.due.is_some()).count();
        if next >= total && waiting.is_empty() && (in_flight == 0 || now > end + 2_000_000_000) {
            break;
        }
        if next < total {
            let due = due_of(next);
            let spec = libc::itimerspec {
                it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
                it_value: libc::timespec {
                    tv_sec: (due / 1_000_000_000) as i64,
                    tv_nsec: (due % 1_000_000_000) as i64,
                },
            };
            // SAFETY: valid timerfd and spec.
            unsafe { libc::timerfd_settime(tfd, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut()) };
        }
        let timeout_ms = if next >= total { 100 } else { -1 };
        // SAFETY: events buffer is valid for its length.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("epoll_wait: {e}"));
        }
        for ev in &events[..n as usize] {
            let token = ev.u64;
            if token == TIMER {
                let mut b = [0u8; 8];
                // SAFETY: reading the 8-byte expiration count of the timerfd.
                unsafe { libc::read(tfd, b.as_mut_ptr().cast(), 8) };
                continue;
            }
            let c = token as usize;
            let conn = &mut conns[c];
            let mut closed = false;
            loop {
                match conn.stream.read(&mut chunk) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(k) => conn.buf.extend_from_slice(&chunk[..k]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            let finished = now_ns();
            match response_len(&conn.buf) {
                Some(Ok((len, status))) => {
                    conn.buf.drain(..len);
                    if let Some(due) = conn.due.take() {
                        done += 1;
                        if !(200..300).contains(&status) {
                            non2xx += 1;
                        }
                        if due >= measure_from {
                            latencies.push(finished.saturating_sub(due));
                        }
                    }
                    if !closed {
                        idle.push_back(c);
                    }
                }
                Some(Err(e)) => return Err(e),
                None => {}
            }
            if closed {
                if conn.due.take().is_some() {
                    errors += 1;
                }
                reconnects += 1;
                conn.buf.clear();
                conn.stream = connect(&a.addr)?;
                epoll_add(ep, conn.stream.as_raw_fd(), c as u64)?;
                if !idle.contains(&c) {
                    idle.push_back(c);
                }
            }
        }
    }
    latencies.sort_unstable();
    lateness.sort_unstable();
    let measured = latencies.len();
    println!(
        "{{\"rate\":{},\"duration_s\":{},\"warmup_s\":{},\"connections\":{},\"sent\":{},\"completed\":{},\
         \"errors\":{},\"non2xx\":{},\"reconnects\":{},\"measured\":{},\"achieved_rps\":{:.1},\
         \"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1},\
         \"late_p50_us\":{:.1},\"late_p99_us\":{:.1}}}",
        a.rate,
        a.duration,
        a.warmup,
        a.connections,
        sent,
        done,
        errors,
        non2xx,
        reconnects,
        measured,
        measured as f64 / a.duration,
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        percentile(&latencies, 1.0),
        percentile(&lateness, 0.50),
        percentile(&lateness, 0.99),
    );
    Ok(())
}
