//! In-process tests of the HTTP layer: a node (the in-memory store) started and stopped
//! inside the test process with `app::serve(listener, router, shutdown)`, driven with
//! reqwest. The OpenAI-compatible endpoint (plain and streamed, sharing the
//! conversation with `/v1/chat`), the ORCA load report, the admin listener, graceful
//! shutdown with a stream in flight, and streaming from an OpenAI-compatible upstream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use chat_node::app::{self, Limits};
use chat_node::config::{Args, Config};
use chat_node::service::Service;
use clap::Parser;
use futures_util::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A node serving on a free port until dropped (or `stop`ped).
struct TestNode {
    url: String,
    svc: Arc<Service>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestNode {
    async fn start(flags: &[&str]) -> TestNode {
        let args = Args::try_parse_from(
            ["chat-node", "--store", "memory", "--node-id", "node-t"].into_iter().chain(flags.iter().copied()),
        )
        .unwrap();
        let config = Config::try_from(args).unwrap();
        let svc = chat_node::build(&config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let limits = Limits { concurrency: 64, request_timeout: Duration::from_secs(60) };
        let router = app::router(Arc::clone(&svc), limits);
        let task = tokio::spawn(app::serve(listener, router, async move {
            let _ = stopped.await;
        }));
        TestNode { url, svc, stop: Some(stop), task: Some(task) }
    }

    /// Signals shutdown and waits for the server to return.
    async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn digest(messages: &[&str]) -> String {
    let mut h = Sha256::new();
    for m in messages {
        h.update(m.as_bytes());
        h.update(b"\n");
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

async fn chat(node: &TestNode, sid: &str, message: &str) -> Value {
    let r = client()
        .post(format!("{}/v1/chat", node.url))
        .header("x-session-id", sid)
        .json(&json!({"message": message}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-served-by"], "node-t");
    r.json().await.unwrap()
}

async fn complete(node: &TestNode, sid: &str, message: &str) -> (reqwest::header::HeaderMap, Value) {
    let r = client()
        .post(format!("{}/v1/chat/completions", node.url))
        .header("x-session-id", sid)
        .json(&json!({"model": "m", "messages": [{"role": "system", "content": "ignored"}, {"role": "user", "content": message}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    (r.headers().clone(), r.json().await.unwrap())
}

/// One received server-sent event: its data and when it arrived.
struct Event {
    data: String,
    at: Instant,
}

/// A streamed completion, read event by event as the bytes come in.
struct Sse {
    headers: reqwest::header::HeaderMap,
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>>,
    buf: String,
}

impl Sse {
    async fn open(url: &str, sid: &str, message: &str) -> Sse {
        let r = client()
            .post(format!("{url}/v1/chat/completions"))
            .header("x-session-id", sid)
            .json(&json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": message}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let headers = r.headers().clone();
        assert_eq!(headers["content-type"], "text/event-stream");
        Sse { headers, body: Box::pin(r.bytes_stream()), buf: String::new() }
    }

    /// The next event, or None at the end of the stream.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                let data = event.trim_end().strip_prefix("data: ").unwrap_or_else(|| panic!("{event:?}")).to_string();
                return Some(Event { data, at: Instant::now() });
            }
            match self.body.next().await {
                Some(chunk) => self.buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap()),
                None => {
                    assert!(self.buf.is_empty(), "trailing bytes {:?}", self.buf);
                    return None;
                }
            }
        }
    }
}

fn is_content(e: &Event) -> bool {
    e.data != "[DONE]"
        && serde_json::from_str::<Value>(&e.data).unwrap()["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
}

/// Streams a completion; returns the response headers and every event with its
/// arrival time, read as the bytes come in.
async fn stream(url: &str, sid: &str, message: &str) -> (reqwest::header::HeaderMap, Vec<Event>) {
    let mut sse = Sse::open(url, sid, message).await;
    let mut events = Vec::new();
    while let Some(e) = sse.next().await {
        events.push(e);
    }
    (sse.headers, events)
}

/// The node's `turns` counter (turns stored and answered).
async fn turns_stored(url: &str) -> u64 {
    let v: Value = client().get(format!("{url}/stats")).send().await.unwrap().json().await.unwrap();
    v["turns"].as_u64().unwrap()
}

fn content(events: &[Event]) -> String {
    events
        .iter()
        .filter(|e| e.data != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(&e.data).unwrap())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn chat_and_completions_share_one_conversation() {
    let mut node = TestNode::start(&[]).await;
    let v = chat(&node, "s", "hello").await;
    assert_eq!((v["turn"].as_u64(), v["context"].as_str()), (Some(1), Some("new")));

    let (headers, c) = complete(&node, "s", "second").await;
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["model"], "m");
    let reply = c["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(reply.starts_with("turn 2: you said 'second'; earlier you mentioned 'hello'"), "{reply}");
    assert_eq!(c["session_affinity"]["turn"], 2);
    assert_eq!(c["session_affinity"]["history_digest"], digest(&["hello", "second"]));
    assert_eq!(c["usage"]["completion_tokens"], reply.split_whitespace().count());
    assert!(headers.contains_key("x-engine-prefill-tokens"));

    let (_, events) = stream(&node.url, "s", "third").await;
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(&e.data).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["session_affinity"]["turn"], 3);
    assert_eq!(last["session_affinity"]["history_digest"], digest(&["hello", "second", "third"]));
    let text = content(&events);
    assert!(text.starts_with("turn 3: you said 'third'"), "{text}");
    // One chunk per token (word) of the reply, between the role chunk and the final one.
    assert_eq!(chunks.len() - 2, text.split_whitespace().count());

    let v = chat(&node, "s", "fourth").await;
    assert_eq!(v["turn"], 4);
    assert_eq!(v["history_digest"], digest(&["hello", "second", "third", "fourth"]));

    // Errors in OpenAI's shape.
    let r = client()
        .post(format!("{}/v1/chat/completions", node.url))
        .header("x-session-id", "s")
        .json(&json!({"messages": [{"role": "assistant", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "bad_request");
    node.stop().await;
}

#[tokio::test]
async fn streamed_tokens_arrive_paced_by_the_modelled_decode() {
    // 400 ms per reply token. Incremental, shown by events rather than by timing: when
    // the first content chunk has arrived, the turn is not stored yet (the node stores
    // it only after the last token, seconds later), so the chunk was not held back until
    // the end. Paced: the last chunk cannot arrive before every token's decode time has
    // passed since the request was sent (a sleep is never shorter; no upper bound).
    let mut node = TestNode::start(&["--decode-us-per-token", "400000"]).await;
    let sent = Instant::now();
    let mut sse = Sse::open(&node.url, "paced", "hello there").await;
    let mut events = Vec::new();
    while let Some(e) = sse.next().await {
        if is_content(&e) && !events.iter().any(is_content) {
            assert_eq!(turns_stored(&node.url).await, 0, "the whole reply was generated before the first chunk");
        }
        events.push(e);
    }
    let content_events: Vec<&Event> = events.iter().filter(|e| is_content(e)).collect();
    let tokens = content(&events).split_whitespace().count();
    assert!(tokens >= 4, "{tokens}");
    assert_eq!(content_events.len(), tokens);
    let elapsed = content_events.last().unwrap().at - sent;
    assert!(elapsed >= Duration::from_millis(400 * tokens as u64), "{elapsed:?} for {tokens} tokens");
    assert_eq!(turns_stored(&node.url).await, 1);
    let fin: Value = serde_json::from_str(&events[events.len() - 2].data).unwrap();
    assert_eq!(fin["session_affinity"]["engine"]["decode_tokens"], tokens);
    assert_eq!(fin["session_affinity"]["engine"]["decode_us"], 400_000 * tokens as u64);
    node.stop().await;
}

#[tokio::test]
async fn load_report_follows_vllm_and_counts_the_queue() {
    // One slot, 1 s of prefill per token: the first turn (one token) holds the
    // slot, the second waits. Both states are awaited through /stats, not slept for.
    let mut node =
        TestNode::start(&["--slots", "1", "--prefill-us-per-token", "1000000", "--kv-capacity-tokens", "1000"]).await;
    let report = |url: String| async move {
        let r =
            client().get(format!("{url}/healthz")).header("endpoint-load-metrics-format", "TEXT").send().await.unwrap();
        r.headers()["endpoint-load-metrics"].to_str().unwrap().to_string()
    };
    assert_eq!(
        report(node.url.clone()).await,
        "TEXT named_metrics.kv_cache_usage_perc=0.0, named_metrics.num_requests_waiting=0.0"
    );
    // No header asked, none given.
    let r = client().get(format!("{}/healthz", node.url)).send().await.unwrap();
    assert!(!r.headers().contains_key("endpoint-load-metrics"));

    let url = node.url.clone();
    let first = tokio::spawn(async move {
        client().post(format!("{url}/v1/chat")).header("x-session-id", "a").json(&json!({"message": "x"})).send().await
    });
    let stats = |url: String| async move {
        client().get(format!("{url}/stats")).send().await.unwrap().json::<Value>().await.unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats(node.url.clone()).await["engine"]["running"] != 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let url = node.url.clone();
    let second = tokio::spawn(async move {
        client().post(format!("{url}/v1/chat")).header("x-session-id", "b").json(&json!({"message": "y"})).send().await
    });
    while stats(node.url.clone()).await["engine"]["waiting"] != 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        report(node.url.clone()).await,
        "TEXT named_metrics.kv_cache_usage_perc=0.0, named_metrics.num_requests_waiting=1.0"
    );
    let a: Value = first.await.unwrap().unwrap().json().await.unwrap();
    let b: Value = second.await.unwrap().unwrap().json().await.unwrap();
    assert!(b["engine"]["queued_us"].as_u64().unwrap() >= 900_000, "{b}");
    // Both conversations are cached: their tokens / 1000.
    let cached = ["a", "b"]
        .iter()
        .zip([&a, &b])
        .map(|(_, v)| 1 + v["reply"].as_str().unwrap().split_whitespace().count())
        .sum::<usize>();
    let want = format!("{}", cached as f64 / 1000.0);
    let got = report(node.url.clone()).await;
    assert_eq!(got, format!("TEXT named_metrics.kv_cache_usage_perc={want}, named_metrics.num_requests_waiting=0.0"));
    let r = client()
        .get(format!("{}/healthz", node.url))
        .header("endpoint-load-metrics-format", "JSON")
        .send()
        .await
        .unwrap();
    let json_report = r.headers()["endpoint-load-metrics"].to_str().unwrap().to_string();
    assert!(json_report.starts_with("JSON {\"named_metrics\":"), "{json_report}");
    node.stop().await;
}

#[tokio::test]
async fn the_admin_listener_changes_engine_costs_at_run_time() {
    let node = TestNode::start(&["--prefill-us-per-token", "10"]).await;
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_url = format!("http://{}", admin.local_addr().unwrap());
    tokio::spawn(app::serve(admin, app::admin_router(Arc::clone(&node.svc)), std::future::pending()));
    let v: Value = client().get(format!("{admin_url}/admin/engine")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v, json!({"prefill_us_per_token": 10, "decode_us_per_token": 0}));
    let r = client()
        .put(format!("{admin_url}/admin/engine"))
        .json(&json!({"prefill_us_per_token": 5000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = chat(&node, "s", "three words here").await;
    assert_eq!(v["engine"]["prefill_us"], 15_000);
    let r = client().put(format!("{admin_url}/admin/engine")).json(&json!({"slots": 3})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    // The admin routes are not on the public listener.
    let r = client().get(format!("{}/admin/engine", node.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn shutdown_lets_a_stream_in_flight_finish_and_refuses_new_connections() {
    let mut node = TestNode::start(&["--decode-us-per-token", "50000"]).await;
    let url = node.url.clone();
    let streaming = tokio::spawn(async move { stream(&url, "s", "a message").await });
    // Wait until the turn runs, then shut down.
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.svc.engine().running() != 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = node.stop.take().unwrap().send(());
    let (_, events) = streaming.await.unwrap();
    assert_eq!(events.last().unwrap().data, "[DONE]");
    node.task.take().unwrap().await.unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(node.url.trim_start_matches("http://")).await.is_err());
}

#[tokio::test]
async fn streams_an_openai_compatible_upstream_through_as_it_arrives() {
    // A fake upstream that sends its first delta, then waits for the test's go (given
    // only once that first delta has reached the client through the node) before the
    // other two. A node that buffered the upstream's stream would never pass the first
    // delta on, and the test would time out: pass-through shown by an event, not timing.
    let gate = Arc::new(tokio::sync::Notify::new());
    let upstream_gate = Arc::clone(&gate);
    let upstream = Router::new().route(
        "/prefix/v1/chat/completions",
        post(move |body: axum::Json<Value>| async move {
            let n = body["messages"].as_array().unwrap().len();
            if body["stream"] != true {
                let answer = json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": format!("you sent {n} messages")}}]});
                return axum::Json(answer).into_response();
            }
            let pieces = vec!["you ".to_string(), "sent ".to_string(), format!("{n} messages")];
            let gate = Arc::clone(&upstream_gate);
            let events = futures_util::stream::iter(pieces.into_iter().enumerate()).then(move |(i, p)| {
                let gate = Arc::clone(&gate);
                async move {
                if i == 1 {
                    gate.notified().await;
                }
                Ok::<_, std::convert::Infallible>(format!(
                    "data: {}\n\n",
                    json!({"choices": [{"index": 0, "delta": {"content": p}}]})
                ))
                }
            });
            let done = futures_util::stream::once(async { Ok("data: [DONE]\n\n".to_string()) });
            axum::response::Response::builder()
                .header("content-type", "text/event-stream")
                .body(axum::body::Body::from_stream(events.chain(done)))
                .unwrap()
                .into_response()
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/prefix", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, upstream).await });

    let mut node = TestNode::start(&["--llm-base-url", &base, "--llm-model", "up"]).await;
    let mut sse = Sse::open(&node.url, "s", "hi").await;
    let mut events = Vec::new();
    let read = async {
        while let Some(e) = sse.next().await {
            if is_content(&e) && !events.iter().any(is_content) {
                gate.notify_one(); // the first delta is here: let the upstream go on
            }
            events.push(e);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.expect("the node held the upstream's first delta back");
    assert_eq!(content(&events), "you sent 2 messages");
    assert_eq!(events.iter().filter(|e| is_content(e)).count(), 3);
    // The stored turn is the whole streamed reply: the next turn's upstream sees it.
    let v = chat(&node, "s", "again").await;
    assert_eq!(v["turn"], 2);
    assert_eq!(v["reply"], "you sent 4 messages");
    node.stop().await;
}
