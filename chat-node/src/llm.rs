//! Optional forwarding of each turn to an OpenAI-compatible endpoint, through `reqwest`
//! (rustls, so `https://` works; bundled web PKI roots): `POST
//! {LLM_BASE_URL}/v1/chat/completions` with the whole history (system prompt, then
//! alternating user/assistant messages, then the new user message).
//!
//! - [`Llm::complete`]: a plain request; the reply is `choices[0].message.content`.
//! - [`Llm::stream`]: `"stream": true`; the upstream's server-sent events are parsed
//!   (`eventsource-stream`) and each `choices[0].delta.content` is passed on as it
//!   arrives, until `data: [DONE]` (or the end of the body).
//!
//! Request building ([`request_body`]), URL joining ([`endpoint`]) and response parsing
//! ([`parse_completion`], [`parse_delta`]) are pure.

use crate::conversation::Conversation;
use crate::model::ModelError;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use reqwest::Url;
use serde_json::{json, Value};
use std::fmt;
use std::time::Duration;
use tokio::sync::mpsc;

/// Default system prompt.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";

/// `{base}/v1/chat/completions` for an `http://` or `https://` base URL (with an optional
/// path prefix, without query or fragment).
pub fn endpoint(base_url: &str) -> Result<Url, String> {
    let mut url = Url::parse(base_url).map_err(|e| format!("LLM_BASE_URL {base_url:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("LLM_BASE_URL {base_url:?}: expected an http:// or https:// URL"));
    }
    if url.host_str().is_none_or(str::is_empty) || !url.username().is_empty() || url.password().is_some() {
        return Err(format!("LLM_BASE_URL {base_url:?}: expected http(s)://host[:port][/prefix]"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("LLM_BASE_URL {base_url:?}: no query or fragment allowed"));
    }
    let path = format!("{}/v1/chat/completions", url.path().trim_end_matches('/'));
    url.set_path(&path);
    Ok(url)
}

/// An API key, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(pub String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// LLM forwarding settings (from `LLM_*` environment variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmConfig {
    pub url: Url,
    pub model: String,
    pub api_key: Option<ApiKey>,
    pub system_prompt: String,
    pub timeout: Duration,
}

/// The JSON body of a completion request for `history` plus `message`.
pub fn request_body(config: &LlmConfig, history: &Conversation, message: &str, stream: bool) -> Value {
    let mut messages = Vec::with_capacity(history.turn_list().len() * 2 + 2);
    messages.push(json!({"role": "system", "content": config.system_prompt}));
    for (role, content) in history.messages() {
        messages.push(json!({"role": role, "content": content}));
    }
    messages.push(json!({"role": "user", "content": message}));
    let mut body = json!({"model": config.model, "messages": messages});
    if stream {
        body["stream"] = Value::Bool(true);
    }
    body
}

/// `choices[0].message.content` of a completion response.
pub fn parse_completion(body: &[u8]) -> Result<String, ModelError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ModelError::BadResponse(format!("not JSON: {e}")))?;
    value
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| ModelError::BadResponse("no choices[0].message.content string".into()))
}

/// The text of one streamed chunk (`choices[0].delta.content`; absent or null is
/// empty: role-only and final chunks carry none).
pub fn parse_delta(data: &str) -> Result<String, ModelError> {
    let value: Value =
        serde_json::from_str(data).map_err(|e| ModelError::BadResponse(format!("stream event not JSON: {e}")))?;
    if let Some(err) = value.get("error") {
        return Err(ModelError::BadResponse(format!("stream error event: {err}")));
    }
    Ok(value.pointer("/choices/0/delta/content").and_then(Value::as_str).unwrap_or_default().to_owned())
}

/// The forwarding model.
#[derive(Debug, Clone)]
pub struct Llm {
    config: LlmConfig,
    client: reqwest::Client,
}

impl Llm {
    pub fn new(config: LlmConfig) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.timeout)
            .read_timeout(config.timeout)
            .build()
            .map_err(|e| format!("cannot build the LLM client: {e}"))?;
        Ok(Self { config, client })
    }

    pub fn config(&self) -> &LlmConfig {
        &self.config
    }

    async fn post(&self, body: &Value, stream: bool) -> Result<reqwest::Response, ModelError> {
        let mut request = self
            .client
            .post(self.config.url.clone())
            .header("content-type", "application/json")
            .header("accept", if stream { "text/event-stream" } else { "application/json" })
            .body(body.to_string());
        if !stream {
            request = request.timeout(self.config.timeout);
        }
        if let Some(ApiKey(key)) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| ModelError::Unreachable(error_chain(&e)))?;
        if !response.status().is_success() {
            return Err(ModelError::Status(response.status().as_u16()));
        }
        Ok(response)
    }

    /// The whole reply at once.
    pub async fn complete(&self, history: &Conversation, message: &str) -> Result<String, ModelError> {
        let response = self.post(&request_body(&self.config, history, message, false), false).await?;
        let body = response.bytes().await.map_err(|e| ModelError::Unreachable(error_chain(&e)))?;
        parse_completion(&body)
    }

    /// The reply streamed: each piece is sent to `sink` as the upstream sends it; the
    /// whole reply is returned at the end. A closed `sink` (the client went away) does not
    /// stop the turn.
    pub async fn stream(
        &self,
        history: &Conversation,
        message: &str,
        sink: &mpsc::Sender<String>,
    ) -> Result<String, ModelError> {
        let response = self.post(&request_body(&self.config, history, message, true), true).await?;
        let mut events = response.bytes_stream().eventsource();
        let mut reply = String::new();
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| ModelError::Unreachable(format!("reading the stream: {e}")))?;
            let data = event.data.trim();
            if data == "[DONE]" {
                break;
            }
            if data.is_empty() {
                continue;
            }
            let piece = parse_delta(data)?;
            if !piece.is_empty() {
                reply.push_str(&piece);
                let _ = sink.send(piece).await;
            }
        }
        Ok(reply)
    }
}

/// An error with its sources (reqwest's top-level message alone hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::conversation::Turn;

    #[test]
    fn joins_base_urls() {
        let table = [
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080/v1/chat/completions"),
            ("http://localhost", "http://localhost/v1/chat/completions"),
            ("http://h:1/proxy/", "http://h:1/proxy/v1/chat/completions"),
            ("http://[::1]:9000/a", "http://[::1]:9000/a/v1/chat/completions"),
            ("https://api.example/openai", "https://api.example/openai/v1/chat/completions"),
        ];
        for (base, want) in table {
            assert_eq!(endpoint(base).unwrap().as_str(), want, "{base}");
        }
        for bad in ["ftp://x", "http://", "http://u@h/", "h:80", "http://h/?q", "http://h/#f", "nope"] {
            assert!(endpoint(bad).is_err(), "{bad}");
        }
    }

    fn config() -> LlmConfig {
        LlmConfig {
            url: endpoint("http://127.0.0.1:1").unwrap(),
            model: "m".into(),
            api_key: Some(ApiKey("secret".into())),
            system_prompt: "sys".into(),
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn request_carries_whole_history() {
        let history = Conversation::new().with_turn(Turn { user: "u1".into(), reply: "a1".into(), id: "x".into() });
        let body = request_body(&config(), &history, "u2", false);
        assert_eq!(
            body,
            json!({"model": "m", "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "u2"},
            ]})
        );
        assert_eq!(request_body(&config(), &history, "u2", true)["stream"], true);
    }

    #[test]
    fn parses_completions_and_deltas() {
        let ok = br#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}]}"#;
        assert_eq!(parse_completion(ok).unwrap(), "hi");
        for bad in [&b"nope"[..], br#"{"choices":[]}"#, br#"{"choices":[{"message":{"content":1}}]}"#] {
            assert!(matches!(parse_completion(bad), Err(ModelError::BadResponse(_))));
        }
        assert_eq!(parse_delta(r#"{"choices":[{"delta":{"content":"to"}}]}"#).unwrap(), "to");
        assert_eq!(parse_delta(r#"{"choices":[{"delta":{"role":"assistant"}}]}"#).unwrap(), "");
        assert_eq!(parse_delta(r#"{"choices":[{"delta":{"content":null},"finish_reason":"stop"}]}"#).unwrap(), "");
        assert!(parse_delta("{").is_err());
        assert!(parse_delta(r#"{"error":{"message":"boom"}}"#).is_err());
    }

    #[test]
    fn api_key_is_redacted() {
        assert!(!format!("{:?}", config()).contains("secret"));
    }
}
