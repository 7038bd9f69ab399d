//! Optional forwarding of each turn to an OpenAI-compatible endpoint:
//! `POST {LLM_BASE_URL}/v1/chat/completions` with the whole history (system prompt, then
//! alternating user/assistant messages, then the new user message); the reply is
//! `choices[0].message.content`.
//!
//! Plain `http://` only: TLS would add a large dependency tree for a test backend. Put a
//! local TLS-terminating proxy in front of a remote endpoint if needed.
//!
//! Request building ([`request_body`]), response parsing ([`parse_completion`]) and URL
//! parsing ([`Endpoint::parse`]) are pure; [`Llm::reply`] only does the I/O.

use crate::conversation::Conversation;
use crate::http;
use crate::model::{Model, ModelError};
use serde_json::{json, Value};
use std::fmt;
use std::io::{BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Largest completion response accepted.
const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// Default system prompt.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";

/// Where completions are requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port` to connect to (IPv6 in brackets).
    pub authority: String,
    /// Path of the completions resource, e.g. `/v1/chat/completions`.
    pub path: String,
}

impl Endpoint {
    /// Parses `http://host[:port][/prefix]` and appends `/v1/chat/completions`.
    pub fn parse(base_url: &str) -> Result<Endpoint, String> {
        let rest = if let Some(rest) = base_url.strip_prefix("http://") {
            rest
        } else if base_url.starts_with("https://") {
            return Err("LLM_BASE_URL: https is not supported (plain http only; use a local TLS proxy)".into());
        } else {
            return Err(format!("LLM_BASE_URL: expected http://host[:port][/path], got {base_url:?}"));
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') || authority.contains(['?', '#']) {
            return Err(format!("LLM_BASE_URL: bad host in {base_url:?}"));
        }
        if prefix.contains(['?', '#']) || prefix.bytes().any(|b| b <= b' ') {
            return Err(format!("LLM_BASE_URL: bad path in {base_url:?}"));
        }
        let has_port = match authority.rfind(']') {
            Some(close) => authority[close..].contains(':'),
            None => authority.contains(':'),
        };
        let authority = if has_port { authority.to_owned() } else { format!("{authority}:80") };
        Ok(Endpoint { authority, path: format!("{}/v1/chat/completions", prefix.trim_end_matches('/')) })
    }
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
    pub endpoint: Endpoint,
    pub model: String,
    pub api_key: Option<ApiKey>,
    pub system_prompt: String,
    pub timeout: Duration,
}

/// The JSON body of a completion request for `history` plus `message`.
pub fn request_body(config: &LlmConfig, history: &Conversation, message: &str) -> Value {
    let mut messages = Vec::with_capacity(history.messages().len() + 2);
    messages.push(json!({"role": "system", "content": config.system_prompt}));
    for m in history.messages() {
        messages.push(json!({"role": m.role, "content": m.content}));
    }
    messages.push(json!({"role": "user", "content": message}));
    json!({"model": config.model, "messages": messages})
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

/// The forwarding model.
#[derive(Debug, Clone)]
pub struct Llm {
    config: LlmConfig,
}

impl Llm {
    pub fn new(config: LlmConfig) -> Self {
        Self { config }
    }

    fn post(&self, body: &[u8]) -> Result<http::ClientResponse, ModelError> {
        let unreachable = |e: std::io::Error| ModelError::Unreachable(e.to_string());
        let endpoint = &self.config.endpoint;
        let addrs = endpoint
            .authority
            .to_socket_addrs()
            .map_err(|e| ModelError::Unreachable(format!("resolve {}: {e}", endpoint.authority)))?;
        let mut stream = None;
        let mut last = format!("{} resolves to no address", endpoint.authority);
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, self.config.timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = format!("connect {addr}: {e}"),
            }
        }
        let mut stream = stream.ok_or(ModelError::Unreachable(last))?;
        stream
            .set_read_timeout(Some(self.config.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.config.timeout)))
            .map_err(unreachable)?;
        let mut head = format!(
            "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\naccept: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
            endpoint.path,
            endpoint.authority,
            body.len()
        );
        if let Some(ApiKey(key)) = &self.config.api_key {
            head.push_str(&format!("authorization: Bearer {key}\r\n"));
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body))
            .and_then(|()| stream.flush())
            .map_err(unreachable)?;
        http::read_response(&mut BufReader::new(stream), MAX_RESPONSE_BYTES)
            .map_err(|e| ModelError::Unreachable(e.to_string()))
    }
}

impl Model for Llm {
    fn reply(&self, history: &Conversation, message: &str) -> Result<String, ModelError> {
        let body = request_body(&self.config, history, message).to_string();
        let response = self.post(body.as_bytes())?;
        if !(200..300).contains(&response.status) {
            return Err(ModelError::Status(response.status));
        }
        parse_completion(&response.body)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn parses_base_urls() {
        let table = [
            ("http://127.0.0.1:8080", "127.0.0.1:8080", "/v1/chat/completions"),
            ("http://localhost", "localhost:80", "/v1/chat/completions"),
            ("http://h:1/proxy/", "h:1", "/proxy/v1/chat/completions"),
            ("http://[::1]:9000/a", "[::1]:9000", "/a/v1/chat/completions"),
            ("http://[::1]", "[::1]:80", "/v1/chat/completions"),
        ];
        for (url, authority, path) in table {
            let e = Endpoint::parse(url).unwrap();
            assert_eq!((e.authority.as_str(), e.path.as_str()), (authority, path), "{url}");
        }
        for bad in ["https://api.example", "ftp://x", "http://", "http://u@h/", "h:80", "http://h/?q"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    fn config() -> LlmConfig {
        LlmConfig {
            endpoint: Endpoint::parse("http://127.0.0.1:1").unwrap(),
            model: "m".into(),
            api_key: Some(ApiKey("secret".into())),
            system_prompt: "sys".into(),
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn request_carries_whole_history() {
        let history = Conversation::new().with_turn("u1", "a1");
        let body = request_body(&config(), &history, "u2");
        assert_eq!(
            body,
            json!({"model": "m", "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "u2"},
            ]})
        );
    }

    #[test]
    fn parses_completions() {
        let ok = br#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}]}"#;
        assert_eq!(parse_completion(ok).unwrap(), "hi");
        for bad in [&b"nope"[..], br#"{"choices":[]}"#, br#"{"choices":[{"message":{"content":1}}]}"#] {
            assert!(matches!(parse_completion(bad), Err(ModelError::BadResponse(_))));
        }
    }

    #[test]
    fn api_key_is_redacted() {
        assert!(!format!("{:?}", config()).contains("secret"));
    }
}
