//! The HTTP layer on axum (hyper, tokio) with tower middleware: routes, request reading,
//! JSON errors, server-sent events, and [`serve`], which takes its shutdown as a future so
//! a test can start and stop a node in-process.
//!
//! Routes (docs/chat-node.md): `POST /v1/chat`, `POST /v1/chat/completions`,
//! `GET /healthz`, `GET /stats`; on the optional admin listener `GET|PUT /admin/engine`
//! and `GET /stats`.
//!
//! Every response carries `x-served-by: <node id>`; a request with
//! `endpoint-load-metrics-format: TEXT` (or `JSON`) gets the ORCA load report header
//! `endpoint-load-metrics` (computed when the response starts). Middleware, outermost
//! first: those headers and JSON bodies for axum's bare 404/405/408 → a request
//! timeout (`--request-timeout-ms`, until the response starts: a stream's events are not
//! cut) → a concurrency limit (`--threads`: requests served at once; the others wait).

use crate::engine::Costs;
use crate::openai::{self, CompletionRequest};
use crate::service::{
    session_id, Affinity, ApiError, Begun, Pending, Placement, Service, TurnReply, TurnRequest, OVERRIDE_HEADER,
};
use crate::stats::Stats;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::Router;
use futures_util::StreamExt;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tower::limit::ConcurrencyLimitLayer;
use tower_http::timeout::TimeoutLayer;

/// Largest request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Request header asking for a load report, and the report's header (ORCA, as vLLM).
pub const LOAD_FORMAT_HEADER: &str = "endpoint-load-metrics-format";
pub const LOAD_REPORT_HEADER: &str = "endpoint-load-metrics";

/// HTTP-level limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests served at once (`--threads`).
    pub concurrency: usize,
    /// Time until a response starts (`--request-timeout-ms`).
    pub request_timeout: Duration,
}

/// What each handler sees of the connection: its local address (the `ip:port` Envoy
/// connected to), compared with the override header's first entry.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub local: Option<SocketAddr>,
}

impl Connected<IncomingStream<'_, TcpListener>> for ConnInfo {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        ConnInfo { local: stream.io().local_addr().ok() }
    }
}

type Svc = Arc<Service>;

/// The node's public router.
pub fn router(svc: Svc, limits: Limits) -> Router {
    Router::new()
        .route("/v1/chat", post(chat))
        .route("/v1/chat/completions", post(completions))
        .route("/healthz", get(|| async { "ok" }))
        .route("/stats", get(stats))
        .fallback(|| async { error_response(&ApiError::bad(404, "not_found", "no such resource")) })
        .layer(ConcurrencyLimitLayer::new(limits.concurrency.max(1)))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, limits.request_timeout))
        .layer(middleware::from_fn_with_state(Arc::clone(&svc), common_headers))
        .with_state(svc)
}

/// The admin router (`--admin-listen`): engine costs at run time, and the stats.
pub fn admin_router(svc: Svc) -> Router {
    Router::new()
        .route("/admin/engine", get(engine_get).put(engine_put))
        .route("/stats", get(stats))
        .fallback(|| async { error_response(&ApiError::bad(404, "not_found", "no such resource")) })
        .layer(middleware::from_fn_with_state(Arc::clone(&svc), common_headers))
        .with_state(svc)
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting (the
/// listener is closed), lets in-flight requests and streams finish, and returns.
pub async fn serve<F>(listener: TcpListener, router: Router, shutdown: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    axum::serve(listener, router.into_make_service_with_connect_info::<ConnInfo>())
        .with_graceful_shutdown(shutdown)
        .await
}

/// `x-served-by`, the load report, and JSON bodies for axum's own bare errors.
async fn common_headers(State(svc): State<Svc>, request: Request, next: Next) -> Response {
    let format = request.headers().get(LOAD_FORMAT_HEADER).map(|v| v.as_bytes().to_vec());
    let method = request.method().clone();
    let mut response = next.run(request).await;
    let bare = response.headers().get(header::CONTENT_TYPE).is_none();
    let status = response.status();
    if bare && method != Method::HEAD {
        let replacement = match status {
            StatusCode::METHOD_NOT_ALLOWED => Some(ApiError::bad(405, "method_not_allowed", "method not allowed here")),
            StatusCode::REQUEST_TIMEOUT => Some(ApiError::server(408, "request_timeout", "the request took too long")),
            _ => None,
        };
        if let Some(e) = replacement {
            let allow = response.headers().get(header::ALLOW).cloned();
            response = error_response(&e);
            if let Some(allow) = allow {
                response.headers_mut().insert(header::ALLOW, allow);
            }
        }
    }
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(svc.node_id()) {
        headers.insert(HeaderName::from_static("x-served-by"), v);
    }
    if let Some(report) = format.and_then(|f| svc.engine().load_report(&f)) {
        if let Ok(v) = HeaderValue::from_str(&report) {
            headers.insert(HeaderName::from_static(LOAD_REPORT_HEADER), v);
        }
    }
    response
}

/// `{"error": code, "detail": detail}` with the error's status (the `/v1/chat` shape).
pub fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut body = json!({"error": e.code, "detail": e.detail});
    if let Some(turns) = e.turns {
        body["turns"] = json!(turns);
    }
    let mut r = (status, axum::Json(body)).into_response();
    if e.status == 503 {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// The completions endpoint's error shape (OpenAI's).
fn openai_error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, axum::Json(openai::error_body(e))).into_response();
    if e.status == 503 {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// The request body, at most [`MAX_BODY_BYTES`].
async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::bad(413, "body_too_large", "the body is over 1 MiB")),
        Err(e) => Err(ApiError::bad(400, "bad_request", &format!("reading the body: {e}"))),
    }
}

/// The conversation part of a turn request, from the filter's headers.
fn turn_request(
    headers: &HeaderMap,
    local: Option<SocketAddr>,
    message: String,
    turn: Option<u64>,
) -> Result<TurnRequest, ApiError> {
    let get = |name: &str| headers.get(name).map(HeaderValue::as_bytes);
    let lossy = |name: &str| get(name).map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
    Ok(TurnRequest {
        session_id: session_id(get("x-session-id"))?,
        message,
        turn,
        affinity: Affinity::from_header(get("x-session-affinity")),
        placement: Placement::of(get(OVERRIDE_HEADER), local),
        previous_node: lossy("x-session-previous-node"),
        override_header: lossy(OVERRIDE_HEADER),
    })
}

#[derive(Deserialize)]
struct ChatBody {
    message: String,
    /// The turn number the client expects this message to become. Optional.
    #[serde(default)]
    turn: Option<u64>,
}

/// Headers reporting a turn's modelled engine cost.
fn engine_headers(response: &mut Response, reply: &TurnReply) {
    let e = &reply.engine;
    let pairs = [
        ("x-engine-queued-us", e.queued_us),
        ("x-engine-cached-tokens", e.cached_tokens),
        ("x-engine-prefill-tokens", e.prefill_tokens),
        ("x-engine-prefill-us", e.prefill_us),
        ("x-engine-decode-tokens", e.decode_tokens),
        ("x-engine-decode-us", e.decode_us),
    ];
    for (name, value) in pairs {
        response.headers_mut().insert(HeaderName::from_static(name), HeaderValue::from(value));
    }
}

async fn chat(
    State(svc): State<Svc>,
    ConnectInfo(conn): ConnectInfo<ConnInfo>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match chat_turn(&svc, conn, &headers, body).await {
        Ok(reply) => {
            let mut r = axum::Json(openai::chat_body(&reply, svc.node_id())).into_response();
            engine_headers(&mut r, &reply);
            r
        }
        Err(e) => error_response(&e),
    }
}

async fn chat_turn(svc: &Svc, conn: ConnInfo, headers: &HeaderMap, body: Body) -> Result<TurnReply, ApiError> {
    let bytes = read_body(body).await.map_err(|e| svc.refused(e))?;
    // The session is checked before the body, as the contract's error table orders them.
    let sid_check = session_id(headers.get("x-session-id").map(HeaderValue::as_bytes));
    if let Err(e) = sid_check {
        Stats::inc(&svc.stats().chat_requests);
        return Err(svc.refused(e));
    }
    let body: ChatBody = serde_json::from_slice(&bytes).map_err(|e| {
        Stats::inc(&svc.stats().chat_requests);
        svc.refused(ApiError::bad(400, "bad_request", &format!("body: {e}")))
    })?;
    let req = turn_request(headers, conn.local, body.message, body.turn)?;
    match svc.begin(req).await? {
        Begun::Replay(reply) => Ok(reply),
        Begun::Run(pending) => pending.run(None).await,
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn completions(
    State(svc): State<Svc>,
    ConnectInfo(conn): ConnectInfo<ConnInfo>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    Stats::inc(&svc.stats().completions);
    let parsed = async {
        let bytes = read_body(body).await?;
        let sid = session_id(headers.get("x-session-id").map(HeaderValue::as_bytes));
        let request = openai::parse_request(&bytes).map_err(|d| ApiError::bad(400, "bad_request", &d))?;
        sid?;
        let turn = turn_request(&headers, conn.local, request.message.clone(), request.turn)?;
        Ok::<_, ApiError>((request, turn))
    }
    .await;
    let (request, turn) = match parsed {
        Ok(p) => p,
        Err(e) => {
            Stats::inc(&svc.stats().chat_requests);
            return openai_error_response(&svc.refused(e));
        }
    };
    let session = turn.session_id.clone();
    let begun = match svc.begin(turn).await {
        Ok(b) => b,
        Err(e) => return openai_error_response(&e),
    };
    let created = unix_now();
    if !request.stream {
        let reply = match begun {
            Begun::Replay(reply) => reply,
            Begun::Run(pending) => match pending.run(None).await {
                Ok(r) => r,
                Err(e) => return openai_error_response(&e),
            },
        };
        let id = openai::completion_id(&session, reply.turn);
        let mut r = axum::Json(openai::completion(&id, created, &request.model, &reply, svc.node_id())).into_response();
        engine_headers(&mut r, &reply);
        return r;
    }
    Stats::inc(&svc.stats().streams);
    stream_response(svc, request, session, created, begun)
}

/// A `text/event-stream` of `chat.completion.chunk` events: a role chunk at once, one
/// chunk per reply piece as it is produced, the final chunk once the turn is stored,
/// then `data: [DONE]`. A failure after the stream started is an error event, and no
/// `[DONE]`: the turn was not acknowledged.
fn stream_response(svc: Svc, request: CompletionRequest, session: String, created: u64, begun: Begun) -> Response {
    let (events, rx) = mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let model = request.model.as_str();
        let node = svc.node_id().to_owned();
        // The id names the turn this stream will be: known once it is stored, so it is
        // derived from the turn the conversation is at now.
        let expected_turn = match &begun {
            Begun::Replay(r) => r.turn,
            Begun::Run(p) => p.next_turn(),
        };
        let id = openai::completion_id(&session, expected_turn);
        let send = |events: &mpsc::Sender<String>, v: Value| {
            let events = events.clone();
            async move {
                // A client that went away does not stop the turn.
                let _ = events.send(openai::sse(&v)).await;
            }
        };
        send(&events, openai::chunk(&id, created, model, json!({"role": "assistant", "content": ""}))).await;
        let result = match begun {
            Begun::Replay(reply) => {
                send(&events, openai::chunk(&id, created, model, json!({"content": reply.reply}))).await;
                Ok(reply)
            }
            Begun::Run(pending) => run_streaming(pending, &events, &id, created, model).await,
        };
        match result {
            Ok(reply) => {
                send(&events, openai::final_chunk(&id, created, model, &reply, &node)).await;
                let _ = events.send(openai::SSE_DONE.to_owned()).await;
            }
            Err(e) => send(&events, openai::error_body(&e)).await,
        }
    });
    let body = Body::from_stream(ReceiverStream::new(rx).map(|s| Ok::<_, Infallible>(Bytes::from(s))));
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no"));
    r
}

/// Runs a turn, forwarding each reply piece as a content chunk while it runs.
async fn run_streaming(
    pending: Pending,
    events: &mpsc::Sender<String>,
    id: &str,
    created: u64,
    model: &str,
) -> Result<TurnReply, ApiError> {
    let (pieces, mut pieces_rx) = mpsc::channel::<String>(64);
    let run = pending.run(Some(pieces));
    tokio::pin!(run);
    let forward = |piece: String| {
        let v = openai::chunk(id, created, model, json!({"content": piece}));
        let events = events.clone();
        async move {
            let _ = events.send(openai::sse(&v)).await;
        }
    };
    let result = loop {
        tokio::select! {
            biased;
            Some(piece) = pieces_rx.recv() => forward(piece).await,
            result = &mut run => break result,
        }
    };
    while let Ok(piece) = pieces_rx.try_recv() {
        forward(piece).await;
    }
    result
}

async fn stats(State(svc): State<Svc>) -> Response {
    let mut v = svc.stats().to_json(svc.node_id(), svc.cache_len());
    let engine = svc.engine();
    let costs = engine.costs();
    v["engine"] = json!({
        "slots": engine.slot_count(),
        "running": engine.running(),
        "waiting": engine.waiting(),
        "kv_cache_tokens": engine.kv().used(),
        "kv_cache_capacity": engine.kv().capacity(),
        "kv_cache_usage_perc": engine.kv_usage(),
        "prefill_us_per_token": costs.prefill_us_per_token,
        "decode_us_per_token": costs.decode_us_per_token,
    });
    axum::Json(v).into_response()
}

async fn engine_get(State(svc): State<Svc>) -> Response {
    axum::Json(svc.engine().costs()).into_response()
}

/// `PUT /admin/engine {"prefill_us_per_token": n, "decode_us_per_token": n}` (either
/// may be left out): the new costs apply to turns that start from now on.
async fn engine_put(State(svc): State<Svc>, body: Body) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Patch {
        prefill_us_per_token: Option<u64>,
        decode_us_per_token: Option<u64>,
    }
    let bytes = match read_body(body).await {
        Ok(b) => b,
        Err(e) => return error_response(&e),
    };
    let patch: Patch = match serde_json::from_slice(&bytes) {
        Ok(p) => p,
        Err(e) => return error_response(&ApiError::bad(400, "bad_request", &format!("body: {e}"))),
    };
    let old = svc.engine().costs();
    let new = Costs {
        prefill_us_per_token: patch.prefill_us_per_token.unwrap_or(old.prefill_us_per_token),
        decode_us_per_token: patch.decode_us_per_token.unwrap_or(old.decode_us_per_token),
    };
    svc.engine().set_costs(new);
    eprintln!(
        "node {}: engine costs now prefill {} us/token, decode {} us/token",
        svc.node_id(),
        new.prefill_us_per_token,
        new.decode_us_per_token
    );
    axum::Json(new).into_response()
}
