//! End-to-end tests of the built `chat-node` binary against a real, standalone
//! `redis-server` on a free loopback port: conversations across nodes, `moved` reloads,
//! a Redis restart in the middle of a turn, outages beyond the retry budget, and LLM
//! forwarding to a fake OpenAI-compatible endpoint.
//!
//! `redis-server` must be installed (`apt-get install redis-server`); without it these
//! tests fail, they never skip.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const NODE_BIN: &str = env!("CARGO_BIN_EXE_chat-node");

// ---------------------------------------------------------------- helpers

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn digest(messages: &[&str]) -> String {
    let mut h = Sha256::new();
    for m in messages {
        h.update(m.as_bytes());
        h.update(b"\n");
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A standalone redis-server with an append-only file fsynced on every write, so a
/// SIGKILL loses nothing that was acknowledged.
struct Redis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    fn start() -> Redis {
        match Command::new("redis-server").arg("--version").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!("redis-server --version failed: {out:?}"),
            Err(e) => panic!(
                "redis-server is required for these tests but could not be run ({e}); \
                 install it with `apt-get install redis-server`"
            ),
        }
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("chat-node-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Redis { port, dir, child: None };
        redis.restart();
        redis
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        assert!(self.child.is_none(), "redis already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
            .args(["--save", "", "--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping() {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(self.addr()) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// One command through `redis-cli`; its raw output.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--raw"])
            .args(args)
            .output()
            .expect("redis-cli (apt-get install redis-tools)");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// SIGKILL, as a crash would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `chat-node` on a port it picked itself (`--listen 127.0.0.1:0`).
struct Node {
    addr: String,
    child: Child,
    log: mpsc::Receiver<String>,
}

impl Node {
    fn start(id: &str, redis: &str, extra: &[&str], env: &[(&str, &str)]) -> Node {
        let mut cmd = Command::new(NODE_BIN);
        cmd.args(["--listen", "127.0.0.1:0", "--node-id", id, "--redis", redis])
            .args(extra)
            .env_remove("LLM_BASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start chat-node");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| panic!("chat-node {id} did not report its address"));
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split(';').next().unwrap().to_string();
            }
        };
        Node { addr, child, log: rx }
    }

    fn chat(&self, sid: &str, affinity: Option<&str>, message: &str) -> (u16, Value) {
        self.chat_with(sid, affinity, &[], message)
    }

    /// A turn with extra request headers (e.g. Envoy's override header).
    fn chat_with(&self, sid: &str, affinity: Option<&str>, extra: &[(&str, String)], message: &str) -> (u16, Value) {
        let mut headers = vec![("x-session-id", sid.to_string())];
        headers.extend(extra.iter().cloned());
        if let Some(a) = affinity {
            headers.push(("x-session-affinity", a.to_string()));
        }
        if affinity == Some("moved") {
            headers.push(("x-session-previous-node", "somewhere".to_string()));
        }
        let body = json!({ "message": message }).to_string();
        let (status, resp_headers, body) = request(&self.addr, "POST", "/v1/chat", &headers, &body);
        let served_by = header(&resp_headers, "x-served-by");
        assert!(served_by.is_some(), "no x-served-by header");
        (status, serde_json::from_slice(&body).unwrap())
    }

    fn stats(&self) -> Value {
        let (status, _, body) = request(&self.addr, "GET", "/stats", &[], "");
        assert_eq!(status, 200);
        serde_json::from_slice(&body).unwrap()
    }

    fn log_lines(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Headers = Vec<(String, String)>;

/// One request on a fresh connection (`connection: close`).
fn request(addr: &str, method: &str, path: &str, headers: &[(&str, String)], body: &str) -> (u16, Headers, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let (status, headers, body) = read_response(&mut reader);
    (status, headers, body)
}

/// Reads one response framed by content-length.
fn read_response<R: BufRead>(r: &mut R) -> (u16, Headers, Vec<u8>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line.split(' ').nth(1).unwrap_or_else(|| panic!("bad status line {line:?}")).parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').unwrap();
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = header(&headers, "content-length").unwrap().parse().unwrap();
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    (status, headers, body)
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn turn_context(v: &Value) -> (u64, String) {
    (v["turn"].as_u64().unwrap_or_else(|| panic!("no turn in {v}")), v["context"].as_str().unwrap().to_string())
}

// ---------------------------------------------------------------- tests

#[test]
fn conversation_moves_between_nodes_without_losing_turns() {
    let redis = Redis::start();
    let a = Node::start("node-1", &redis.addr(), &[], &[]);
    let b = Node::start("node-2", &redis.addr(), &[], &[]);
    let mut said: Vec<&str> = Vec::new();

    for (i, m) in ["first message", "second", "third"].into_iter().enumerate() {
        said.push(m);
        let affinity = if i == 0 { "new" } else { "sticky" };
        let (status, v) = a.chat("conv-1", Some(affinity), m);
        assert_eq!(status, 200, "{v}");
        let want_ctx = if i == 0 { "new" } else { "memory" };
        assert_eq!(turn_context(&v), (i as u64 + 1, want_ctx.to_string()));
        assert_eq!(v["node"], "node-1");
        assert_eq!(v["history_digest"], digest(&said));
    }

    // Another node picks the conversation up from Redis.
    said.push("fourth");
    let (status, v) = b.chat("conv-1", Some("moved"), "fourth");
    assert_eq!(status, 200, "{v}");
    assert_eq!(turn_context(&v), (4, "store".to_string()));
    assert_eq!(v["node"], "node-2");
    assert_eq!(v["history_digest"], digest(&said));
    assert!(v["reply"].as_str().unwrap().contains("earlier you mentioned 'first message'"));

    // Back on node-1, told `moved`: its memory copy (3 turns) must not be trusted.
    said.push("fifth");
    let (_, v) = a.chat("conv-1", Some("moved"), "fifth");
    assert_eq!(turn_context(&v), (5, "store".to_string()));
    assert_eq!(v["history_digest"], digest(&said));

    // And sticky again: memory.
    said.push("sixth");
    let (_, v) = a.chat("conv-1", Some("sticky"), "sixth");
    assert_eq!(turn_context(&v), (6, "memory".to_string()));
    assert_eq!(v["history_digest"], digest(&said));

    let stats = a.stats();
    assert_eq!(stats["turns"], 5);
    assert_eq!(stats["memory_hits"], 3);
    assert_eq!(stats["store_loads"], 1);
    assert_eq!(stats["new_conversations"], 1);
    assert_eq!(stats["moved"], 1);
    assert!(a.log_lines().iter().any(|l| l.contains("moved here from node \"somewhere\"")));
}

#[test]
fn a_sticky_retry_on_a_fallback_node_reloads_from_redis() {
    // The scenario Envoy's retries create: the conversation moved from A to B, B died,
    // and Envoy retried the next turn on A (the override header's second entry). The
    // filter decided before the retry, so A is told `sticky`, yet its memory copy is
    // two turns old. A compares the header's first entry with the local address of the
    // connection and reloads.
    let redis = Redis::start();
    let a = Node::start("node-1", &redis.addr(), &[], &[]);
    let b = Node::start("node-2", &redis.addr(), &[], &[]);
    let via =
        |first: &Node, second: &Node| [("x-gateway-destination-endpoint", format!("{},{}", first.addr, second.addr))];
    let mut said: Vec<&str> = Vec::new();
    for m in ["one", "two"] {
        said.push(m);
        let (status, v) = a.chat_with("conv-f", Some("sticky"), &via(&a, &b), m);
        assert_eq!(status, 200, "{v}");
    }
    for (m, ctx) in [("three", "store"), ("four", "memory")] {
        said.push(m);
        let affinity = if m == "three" { "moved" } else { "sticky" };
        let (_, v) = b.chat_with("conv-f", Some(affinity), &via(&b, &a), m);
        assert_eq!(turn_context(&v), (said.len() as u64, ctx.to_string()));
    }

    said.push("five");
    let (status, v) = a.chat_with("conv-f", Some("sticky"), &via(&b, &a), "five");
    assert_eq!(status, 200, "{v}");
    assert_eq!(turn_context(&v), (5, "store".to_string()));
    assert_eq!(v["history_digest"], digest(&said));

    // A is the primary again: its refreshed memory copy is used.
    said.push("six");
    let (_, v) = a.chat_with("conv-f", Some("sticky"), &via(&a, &b), "six");
    assert_eq!(turn_context(&v), (6, "memory".to_string()));
    assert_eq!(v["history_digest"], digest(&said));
    assert_eq!(a.stats()["fallback"], 1);
    assert_eq!(b.stats()["fallback"], 0);
    assert!(a.log_lines().iter().any(|l| l.contains("retried here as a fallback")));
}

#[test]
fn redis_restart_mid_turn_blocks_then_succeeds() {
    let mut redis = Redis::start();
    let a = Node::start("node-1", &redis.addr(), &[], &[]);
    for (i, m) in ["one", "two"].into_iter().enumerate() {
        let (status, v) = a.chat("conv-r", None, m);
        assert_eq!((status, v["turn"].as_u64()), (200, Some(i as u64 + 1)));
    }

    redis.kill();
    let addr = a.addr.clone();
    let started = Instant::now();
    let turn = thread::spawn(move || {
        let body = json!({"message": "three"}).to_string();
        let headers = [("x-session-id", "conv-r".to_string())];
        let (status, _, body) = request(&addr, "POST", "/v1/chat", &headers, &body);
        (status, serde_json::from_slice::<Value>(&body).unwrap(), started.elapsed())
    });
    thread::sleep(Duration::from_millis(1500));
    redis.restart();
    let (status, v, took) = turn.join().unwrap();
    assert_eq!(status, 200, "{v}");
    assert!(took >= Duration::from_millis(1400), "did not wait for redis: {took:?}");
    assert_eq!(turn_context(&v), (3, "memory".to_string()));
    assert_eq!(v["history_digest"], digest(&["one", "two", "three"]));
    let stats = a.stats();
    assert!(stats["redis_retries"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(stats["store_failures"], 0);

    // A fresh node sees every acknowledged turn in Redis.
    let b = Node::start("node-2", &redis.addr(), &[], &[]);
    let (status, v) = b.chat("conv-r", Some("moved"), "four");
    assert_eq!(status, 200, "{v}");
    assert_eq!(turn_context(&v), (4, "store".to_string()));
    assert_eq!(v["history_digest"], digest(&["one", "two", "three", "four"]));
}

#[test]
fn redis_down_beyond_budget_is_503_and_not_acknowledged() {
    let mut redis = Redis::start();
    let a = Node::start("node-1", &redis.addr(), &["--redis-retry-ms", "400"], &[]);
    let (status, _) = a.chat("conv-d", None, "one");
    assert_eq!(status, 200);

    redis.kill();
    let started = Instant::now();
    let (status, v) = a.chat("conv-d", None, "two");
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"], "store_unavailable");
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(started.elapsed() < Duration::from_secs(5));

    redis.restart();
    // The failed turn was not acknowledged: retrying it is turn 2, not 3.
    let (status, v) = a.chat("conv-d", None, "two");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["turn"], 2);
    assert_eq!(v["history_digest"], digest(&["one", "two"]));
    assert_eq!(a.stats()["store_failures"], 1);
}

#[test]
fn http_surface_errors_health_and_keep_alive() {
    let redis = Redis::start();
    let a = Node::start("node-9", &redis.addr(), &[], &[]);

    let (status, headers, body) = request(&a.addr, "GET", "/healthz", &[], "");
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
    assert_eq!(header(&headers, "x-served-by"), Some("node-9"));

    let ok_body = r#"{"message":"hi"}"#;
    type Case<'a> = (&'a [(&'a str, String)], &'a str, u16, &'a str);
    let cases: [Case; 5] = [
        (&[], ok_body, 400, "missing_session_id"),
        (&[("x-session-id", String::new())], ok_body, 400, "missing_session_id"),
        (&[("x-session-id", "s".into())], "{oops", 400, "bad_request"),
        (&[("x-session-id", "s".into())], r#"{"text":"hi"}"#, 400, "bad_request"),
        (&[("x-session-id", "s".into())], "[]", 400, "bad_request"),
    ];
    for (headers, body, want_status, want_error) in cases {
        let (status, resp_headers, resp) = request(&a.addr, "POST", "/v1/chat", headers, body);
        assert_eq!(status, want_status, "{body}");
        assert_eq!(header(&resp_headers, "content-type"), Some("application/json"));
        let v: Value = serde_json::from_slice(&resp).unwrap();
        assert_eq!(v["error"], want_error, "{body}");
    }

    // Oversized body: 413.
    let big = format!(r#"{{"message":"{}"}}"#, "x".repeat(1024 * 1024 + 10));
    let headers = [("x-session-id", "s".to_string())];
    let (status, _, _) = request(&a.addr, "POST", "/v1/chat", &headers, &big);
    assert_eq!(status, 413);

    // Several requests on one keep-alive connection.
    let mut stream = TcpStream::connect(&a.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    for i in 1..=3u64 {
        let body = json!({ "message": format!("m{i}") }).to_string();
        write!(
            stream,
            "POST /v1/chat HTTP/1.1\r\nhost: t\r\nx-session-id: ka\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let (status, headers, body) = read_response(&mut reader);
        assert_eq!(status, 200);
        assert_ne!(header(&headers, "connection"), Some("close"));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["turn"], i);
    }

    // Stored under the hash-tagged key, one entry per turn, with the configured TTL.
    let ttl: i64 = redis.cli(&["TTL", "sa:turns:{ka}"]).trim().parse().unwrap();
    assert!(ttl > 86_000 && ttl <= 86_400, "ttl {ttl}");
    assert_eq!(redis.cli(&["LLEN", "sa:turns:{ka}"]).trim(), "3");
}

#[test]
fn sigterm_lets_the_in_flight_turn_finish() {
    let mut redis = Redis::start();
    let mut a = Node::start("node-1", &redis.addr(), &[], &[]);
    assert_eq!(a.chat("conv-t", None, "one").0, 200);

    redis.kill();
    let addr = a.addr.clone();
    let turn = thread::spawn(move || {
        let body = json!({"message": "two"}).to_string();
        let headers = [("x-session-id", "conv-t".to_string())];
        request(&addr, "POST", "/v1/chat", &headers, &body)
    });
    // The turn is in flight (it has reached the node, which waits for Redis).
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.stats()["chat_requests"].as_u64().unwrap() < 2 {
        assert!(Instant::now() < deadline, "the second turn never reached the node");
        thread::sleep(Duration::from_millis(20));
    }
    let killed = Command::new("kill").args(["-TERM", &a.child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    thread::sleep(Duration::from_millis(500));
    assert!(a.child.try_wait().unwrap().is_none(), "exited with a turn in flight");
    // No new connections once shutting down.
    assert!(TcpStream::connect(&a.addr).is_err());

    redis.restart();
    let (status, headers, body) = turn.join().unwrap();
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "connection"), Some("close"));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["turn"], 2);

    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(status) = a.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "chat-node did not exit after SIGTERM");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn idle_keep_alive_connections_make_room_at_the_thread_cap() {
    let redis = Redis::start();
    let a = Node::start("node-1", &redis.addr(), &["--threads", "2"], &[]);
    // Two keep-alive connections, each served once and then left idle: the cap is full.
    let idle: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(&a.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n").unwrap();
            let (status, headers, _) = read_response(&mut BufReader::new(s.try_clone().unwrap()));
            assert_eq!(status, 200);
            assert_ne!(header(&headers, "connection"), Some("close"));
            s
        })
        .collect();
    let started = Instant::now();
    let (status, _, _) = request(&a.addr, "GET", "/healthz", &[], "");
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    drop(idle);
}

#[test]
fn concurrent_sessions_on_many_connections() {
    let redis = Redis::start();
    let a = Node::start("node-1", &redis.addr(), &[], &[]);
    let addr = a.addr.clone();
    let workers: Vec<_> = (0..16)
        .map(|w| {
            let addr = addr.clone();
            thread::spawn(move || {
                let sid = format!("conc-{w}");
                let mut said = Vec::new();
                for t in 1..=5u64 {
                    let m = format!("w{w} t{t}");
                    said.push(m.clone());
                    let body = json!({ "message": m }).to_string();
                    let headers = [("x-session-id", sid.clone())];
                    let (status, _, body) = request(&addr, "POST", "/v1/chat", &headers, &body);
                    assert_eq!(status, 200);
                    let v: Value = serde_json::from_slice(&body).unwrap();
                    assert_eq!(v["turn"], t);
                    let refs: Vec<&str> = said.iter().map(String::as_str).collect();
                    assert_eq!(v["history_digest"], digest(&refs));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(a.stats()["turns"], 80);
}

#[test]
fn forwards_history_to_an_openai_compatible_endpoint() {
    let redis = Redis::start();
    // A fake LLM: answers each request with the number of messages it received.
    let llm = TcpListener::bind("127.0.0.1:0").unwrap();
    let llm_addr = llm.local_addr().unwrap().to_string();
    let (seen_tx, seen_rx) = mpsc::channel::<(String, Option<String>, Value)>();
    thread::spawn(move || {
        for stream in llm.incoming() {
            let Ok(stream) = stream else { break };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut len = 0usize;
            let mut auth = None;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                let (k, v) = line.split_once(':').unwrap();
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap(),
                    "authorization" => auth = Some(v.trim().to_string()),
                    _ => {}
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let request: Value = serde_json::from_slice(&body).unwrap();
            let n = request["messages"].as_array().unwrap().len();
            let answer = json!({"choices": [{"index": 0, "message":
                {"role": "assistant", "content": format!("llm saw {n} messages")}}]})
            .to_string();
            let mut out = stream;
            write!(
                out,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                answer.len()
            )
            .unwrap();
            seen_tx.send((request_line, auth, request)).unwrap();
        }
    });

    let base = format!("http://{llm_addr}/prefix");
    let env = [
        ("LLM_BASE_URL", base.as_str()),
        ("LLM_MODEL", "test-model"),
        ("LLM_API_KEY", "sk-test"),
        ("LLM_SYSTEM_PROMPT", "be brief"),
    ];
    let a = Node::start("node-1", &redis.addr(), &[], &env);
    let (status, v) = a.chat("conv-llm", None, "hello");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["reply"], "llm saw 2 messages");
    let (_, v) = a.chat("conv-llm", None, "again");
    assert_eq!(v["reply"], "llm saw 4 messages");
    assert_eq!(v["turn"], 2);

    let (line, auth, first) = seen_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(line.starts_with("POST /prefix/v1/chat/completions HTTP/1.1"), "{line}");
    assert_eq!(auth.as_deref(), Some("Bearer sk-test"));
    assert_eq!(first["model"], "test-model");
    let (_, _, second) = seen_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        second["messages"],
        json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "llm saw 2 messages"},
            {"role": "user", "content": "again"},
        ])
    );
}

#[test]
fn command_line_help_and_errors() {
    let out = Command::new(NODE_BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--node-id",
        "--redis",
        "--store",
        "--cache-size",
        "--ttl-seconds",
        "--redis-retry-ms",
        "--threads",
        "--slots",
        "--prefill-us-per-token",
        "--decode-us-per-token",
        "--kv-capacity-tokens",
        "--admin-listen",
        "LLM_BASE_URL",
    ] {
        assert!(text.contains(flag), "help lacks {flag}");
    }
    for bad in [&["--bogus"][..], &["--threads", "zero"], &["--listen"]] {
        let out = Command::new(NODE_BIN).args(bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(!out.stderr.is_empty());
    }
    // Environment fallbacks are checked too (one process per case: the environment is
    // process-wide).
    for env in [
        &[("LLM_BASE_URL", "ftp://api.example"), ("LLM_MODEL", "m")][..],
        &[("LLM_BASE_URL", "https://api.example")],
        &[("CHAT_THREADS", "0")],
        &[("CHAT_STORE", "disk")],
        &[("CHAT_NODE_ID", "a b")],
    ] {
        let out = Command::new(NODE_BIN).envs(env.iter().copied()).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{env:?}");
    }
}

// ---------------------------------------------------------------- the store contract

/// What a client saw acknowledged: (turn, message, history_digest).
type Acked = Vec<(u64, String, String)>;

/// `workers` client threads per node, all appending to conversation `sid` at once,
/// every request marked `sticky` (each node trusts its own, soon stale, memory copy:
/// the worst case). Without `with_turn` every request is a new turn; with it each
/// client numbers its turn from what it last saw and, on 409, from the `turns` field.
fn hammer(nodes: &[&Node], sid: &str, workers: usize, sends: usize, with_turn: bool) -> (Acked, usize) {
    let mut handles = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for w in 0..workers {
            let addr = node.addr.clone();
            let sid = sid.to_string();
            handles.push(thread::spawn(move || {
                let mut acked = Vec::new();
                let mut conflicts = 0;
                let mut next = 1u64;
                for t in 0..sends {
                    let m = format!("node{n}-client{w}-{t}");
                    let body = if with_turn { json!({"message": m, "turn": next}) } else { json!({"message": m}) };
                    let headers = [("x-session-id", sid.clone()), ("x-session-affinity", "sticky".to_string())];
                    let (status, _, body) = request(&addr, "POST", "/v1/chat", &headers, &body.to_string());
                    let v: Value = serde_json::from_slice(&body).unwrap();
                    match status {
                        200 => {
                            let turn = v["turn"].as_u64().unwrap();
                            acked.push((turn, m, v["history_digest"].as_str().unwrap().to_string()));
                            next = turn + 1;
                        }
                        409 if with_turn => {
                            conflicts += 1;
                            next = v["turns"].as_u64().unwrap() + 1;
                        }
                        _ => panic!("{status} {v}"),
                    }
                }
                (acked, conflicts)
            }));
        }
    }
    let mut all = Vec::new();
    let mut conflicts = 0;
    for h in handles {
        let (a, c) = h.join().unwrap();
        all.extend(a);
        conflicts += c;
    }
    (all, conflicts)
}

/// The stored user messages of `sid`, checked entry by entry.
fn stored_messages(redis: &Redis, sid: &str) -> Vec<String> {
    let raw = redis.cli(&["LRANGE", &format!("sa:turns:{{{sid}}}"), "0", "-1"]);
    raw.lines()
        .enumerate()
        .map(|(i, line)| {
            let e: Value = serde_json::from_str(line).unwrap();
            assert_eq!(e["n"], i as u64 + 1, "entry {i}: {line}");
            e["user"].as_str().unwrap().to_string()
        })
        .collect()
}

/// Stored == acknowledged, in the order the replies reported, nothing twice.
fn check_store_matches(redis: &Redis, sid: &str, acked: &Acked) {
    let stored = stored_messages(redis, sid);
    assert_eq!(stored.len(), acked.len(), "stored {} turns, acknowledged {}", stored.len(), acked.len());
    let mut seen = std::collections::HashSet::new();
    for m in &stored {
        assert!(seen.insert(m), "{m} stored twice");
    }
    for (turn, m, d) in acked {
        assert_eq!(&stored[*turn as usize - 1], m, "turn {turn}");
        let prefix: Vec<&str> = stored[..*turn as usize].iter().map(String::as_str).collect();
        assert_eq!(d, &digest(&prefix), "digest of turn {turn}");
    }
}

#[test]
fn concurrent_appends_from_two_and_three_nodes_lose_and_duplicate_nothing() {
    let redis = Redis::start();
    let nodes: Vec<Node> = (1..=3).map(|i| Node::start(&format!("node-{i}"), &redis.addr(), &[], &[])).collect();
    for (count, with_turn) in [(2, false), (3, false), (2, true), (3, true)] {
        let sid = format!("shared-{count}-{with_turn}");
        let group: Vec<&Node> = nodes.iter().take(count).collect();
        let (acked, conflicts) = hammer(&group, &sid, 3, 20, with_turn);
        check_store_matches(&redis, &sid, &acked);
        if !with_turn {
            assert_eq!(acked.len(), count * 3 * 20);
        }
        eprintln!("{count} nodes, turn {with_turn}: {} acknowledged = stored, {conflicts} client 409s", acked.len());
    }
    let reloads: u64 = nodes.iter().map(|n| n.stats()["append_conflicts"].as_u64().unwrap()).sum();
    assert!(reloads > 0, "the nodes never raced: the test proves nothing");
}

#[test]
fn the_previous_layout_is_migrated_when_first_read() {
    let redis = Redis::start();
    let old = r#"{"v":1,"session":"old","turns":2,"written_by":"node-1","written_at":0,"messages":[{"role":"user","content":"one"},{"role":"assistant","content":"r1"},{"role":"user","content":"two"},{"role":"assistant","content":"r2"}]}"#;
    redis.cli(&["SET", "sa:conv:{old}", old]);
    let a = Node::start("node-1", &redis.addr(), &[], &[]);
    let (status, v) = a.chat("old", Some("moved"), "three");
    assert_eq!(status, 200, "{v}");
    assert_eq!(turn_context(&v), (3, "store".to_string()));
    assert_eq!(v["history_digest"], digest(&["one", "two", "three"]));
    assert_eq!(stored_messages(&redis, "old"), ["one", "two", "three"]);
    assert_eq!(redis.cli(&["EXISTS", "sa:conv:{old}"]).trim(), "0");
    assert_eq!(a.stats()["migrated"], 1);
}

fn engine_headers(headers: &Headers) -> (u64, u64, u64) {
    let num = |name: &str| header(headers, name).unwrap_or_else(|| panic!("no {name}")).parse::<u64>().unwrap();
    (num("x-engine-cached-tokens"), num("x-engine-prefill-tokens"), num("x-engine-prefill-us"))
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

#[test]
fn a_moved_conversation_pays_the_modelled_prefill_of_its_whole_history() {
    // 2 ms per uncached prompt token. The sticky turn prefills its message only; the
    // same turn on the node the conversation moves to prefills the whole history. Exact
    // token counts from the replies; the elapsed time only as a lower bound (a sleep is
    // never shorter), never an upper one.
    let redis = Redis::start();
    let engine = ["--prefill-us-per-token", "2000", "--decode-us-per-token", "0"];
    let a = Node::start("node-1", &redis.addr(), &engine, &[]);
    let b = Node::start("node-2", &redis.addr(), &engine, &[]);
    let mut history = 0u64;
    for (i, m) in ["tell me about lisbon", "and its trams", "what about food there"].iter().enumerate() {
        let (status, v) = a.chat("slow", Some(if i == 0 { "new" } else { "sticky" }), m);
        assert_eq!(status, 200);
        history += words(m) + words(v["reply"].as_str().unwrap());
    }
    let message = "and the weather in spring";
    let send = |node: &Node, affinity: &str| {
        let headers = [("x-session-id", "slow".to_string()), ("x-session-affinity", affinity.to_string())];
        let started = Instant::now();
        let (status, h, body) =
            request(&node.addr, "POST", "/v1/chat", &headers, &json!({"message": message, "turn": 4}).to_string());
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        (h, started.elapsed(), serde_json::from_slice::<Value>(&body).unwrap())
    };
    let (sticky, sticky_took, v) = send(&a, "sticky");
    assert_eq!(turn_context(&v), (4, "memory".to_string()));
    assert_eq!(engine_headers(&sticky), (history, words(message), 2000 * words(message)));
    assert!(sticky_took >= Duration::from_micros(2000 * words(message)));
    // The same turn 4 sent to B as if the conversation had moved there (a replay: B
    // answers from the store) costs nothing; turn 5 moved to B pays the whole history.
    let history = history + words(message) + words(v["reply"].as_str().unwrap());
    let headers = [("x-session-id", "slow".to_string()), ("x-session-affinity", "moved".to_string())];
    let started = Instant::now();
    let (status, moved, body) =
        request(&b.addr, "POST", "/v1/chat", &headers, &json!({"message": "one more", "turn": 5}).to_string());
    let moved_took = started.elapsed();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(turn_context(&v), (5, "store".to_string()));
    let prefill = history + words("one more");
    assert_eq!(engine_headers(&moved), (0, prefill, 2000 * prefill));
    assert_eq!(v["engine"]["prefill_tokens"], prefill);
    assert!(moved_took >= Duration::from_micros(2000 * prefill), "{moved_took:?}");
    // The moved turn's modelled prefill exceeds a sticky one's by the cached history.
    let sticky_on_b = {
        let headers = [("x-session-id", "slow".to_string()), ("x-session-affinity", "sticky".to_string())];
        let (status, h, _) =
            request(&b.addr, "POST", "/v1/chat", &headers, &json!({"message": "one more", "turn": 6}).to_string());
        assert_eq!(status, 200);
        engine_headers(&h)
    };
    assert_eq!(sticky_on_b.1, words("one more"));
    eprintln!("sticky turn took {sticky_took:?}, moved turn {moved_took:?} (modelled prefill {} us)", 2000 * prefill);
}

#[test]
fn memory_store_needs_no_redis() {
    let a = Node::start("solo", "127.0.0.1:1", &["--store", "memory"], &[]);
    for (i, m) in ["one", "two"].iter().enumerate() {
        let (status, v) = a.chat("m", None, m);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["turn"], i as u64 + 1);
    }
    let (_, v) = a.chat("m", Some("moved"), "three");
    assert_eq!(turn_context(&v), (3, "store".to_string()));
    assert_eq!(v["history_digest"], digest(&["one", "two", "three"]));
    assert_eq!(a.stats()["redis_errors"], 0);
}
