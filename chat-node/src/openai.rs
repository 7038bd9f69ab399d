//! The OpenAI-compatible face of a conversation (DESIGN.md section 8,
//! `POST /v1/chat/completions`): request parsing and the JSON shapes of
//! `chat.completion`, `chat.completion.chunk` and error events. Pure.
//!
//! The node's stored history is authoritative: only the last message (role `user`) is
//! read, and it becomes the next turn. Extensions, ignored by OpenAI clients: the
//! optional request field `turn` (as in `/v1/chat`), and a `session_affinity` object in
//! the completion and in the final chunk (`turn`, `node`, `context`, `history_digest`,
//! `engine`).

use crate::conversation::hex;
use crate::service::{ApiError, TurnReply};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Model name reported when the request names none.
pub const DEFAULT_MODEL: &str = "chat-node";

#[derive(Deserialize)]
struct RawRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<RawMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    turn: Option<u64>,
}

#[derive(Deserialize)]
struct RawMessage {
    role: String,
    #[serde(default)]
    content: Value,
}

/// A parsed completion request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletionRequest {
    pub model: String,
    /// The last message's text: the next turn.
    pub message: String,
    pub stream: bool,
    pub turn: Option<u64>,
}

/// Parses a request body; `Err` is the `detail` of a 400.
pub fn parse_request(body: &[u8]) -> Result<CompletionRequest, String> {
    let raw: RawRequest = serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
    let last = raw.messages.last().ok_or("body: messages must not be empty")?;
    if last.role != "user" {
        return Err(format!("body: the last message must have role \"user\", not {:?}", last.role));
    }
    let message = match &last.content {
        Value::String(s) => s.clone(),
        // Content parts: the text parts, concatenated.
        Value::Array(parts) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => return Err("body: only text content parts are supported".into()),
                }
            }
            text
        }
        _ => return Err("body: the last message's content must be a string or text parts".into()),
    };
    Ok(CompletionRequest {
        model: raw.model.filter(|m| !m.is_empty()).unwrap_or_else(|| DEFAULT_MODEL.into()),
        message,
        stream: raw.stream.unwrap_or(false),
        turn: raw.turn,
    })
}

/// A completion id, the same for every attempt at one turn of one session.
pub fn completion_id(session_id: &str, turn: u64) -> String {
    let mut h = Sha256::new();
    h.update(session_id.as_bytes());
    h.update(b"\n");
    h.update(turn.to_string().as_bytes());
    format!("chatcmpl-{}", &hex(h.finalize().as_slice())[..24])
}

/// The conversation fields shared by `/v1/chat` and the `session_affinity` extension.
pub fn turn_fields(reply: &TurnReply, node: &str) -> Value {
    let mut v = json!({
        "turn": reply.turn,
        "node": node,
        "context": reply.context.as_str(),
        "history_digest": reply.history_digest,
        "engine": reply.engine,
    });
    if reply.replayed {
        v["replayed"] = Value::Bool(true);
    }
    v
}

/// The `/v1/chat` reply body.
pub fn chat_body(reply: &TurnReply, node: &str) -> Value {
    let mut v = turn_fields(reply, node);
    v["reply"] = Value::String(reply.reply.clone());
    v
}

fn usage(reply: &TurnReply) -> Value {
    json!({
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    })
}

/// A non-streamed `chat.completion`.
pub fn completion(id: &str, created: u64, model: &str, reply: &TurnReply, node: &str) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply.reply},
            "finish_reason": "stop",
        }],
        "usage": usage(reply),
        "session_affinity": turn_fields(reply, node),
    })
}

/// A `chat.completion.chunk` carrying `delta`.
pub fn chunk(id: &str, created: u64, model: &str, delta: Value) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": null}],
    })
}

/// The last chunk before `[DONE]`: empty delta, `finish_reason: "stop"`, usage and the
/// turn's fields. Sent only once the turn is stored.
pub fn final_chunk(id: &str, created: u64, model: &str, reply: &TurnReply, node: &str) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": usage(reply),
        "session_affinity": turn_fields(reply, node),
    })
}

/// The error object of the completions endpoint (OpenAI's shape), as a body or as an
/// event of a stream that failed after it started.
pub fn error_body(e: &ApiError) -> Value {
    let mut v = json!({"error": {"message": e.detail, "type": e.code, "code": e.code}});
    if let Some(turns) = e.turns {
        v["error"]["turns"] = json!(turns);
    }
    v
}

/// One server-sent event carrying `value`.
pub fn sse(value: &Value) -> String {
    format!("data: {value}\n\n")
}

/// The stream's end marker.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::engine::Report;
    use crate::service::Context;

    #[test]
    fn parses_requests() {
        let r = parse_request(br#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"stream":true,"temperature":0.2}"#).unwrap();
        assert_eq!(r, CompletionRequest { model: "m".into(), message: "hi".into(), stream: true, turn: None });
        let r = parse_request(br#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"turn":3}"#).unwrap();
        assert_eq!((r.model.as_str(), r.message.as_str(), r.stream, r.turn), (DEFAULT_MODEL, "ab", false, Some(3)));
        for bad in [
            &b"{"[..],
            br#"{"messages":[]}"#,
            br#"{"model":"m"}"#,
            br#"{"messages":[{"role":"assistant","content":"x"}]}"#,
            br#"{"messages":[{"role":"user","content":3}]}"#,
            br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#,
            br#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
        ] {
            assert!(parse_request(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn shapes() {
        let reply = TurnReply {
            reply: "hello there".into(),
            turn: 2,
            context: Context::Memory,
            history_digest: "d".into(),
            replayed: false,
            prompt_tokens: 5,
            completion_tokens: 2,
            engine: Report::default(),
        };
        let id = completion_id("s", 2);
        assert_eq!(id.len(), "chatcmpl-".len() + 24);
        assert_eq!(id, completion_id("s", 2));
        assert_ne!(id, completion_id("s", 3));
        let c = completion(&id, 7, "m", &reply, "node-1");
        assert_eq!(c["object"], "chat.completion");
        assert_eq!(c["choices"][0]["message"]["content"], "hello there");
        assert_eq!(c["usage"]["total_tokens"], 7);
        assert_eq!(c["session_affinity"]["turn"], 2);
        assert_eq!(c["session_affinity"]["context"], "memory");
        let f = final_chunk(&id, 7, "m", &reply, "node-1");
        assert_eq!((f["choices"][0]["finish_reason"].as_str(), &f["choices"][0]["delta"]), (Some("stop"), &json!({})));
        let k = chunk(&id, 7, "m", json!({"content": "x"}));
        assert_eq!(k["object"], "chat.completion.chunk");
        assert!(k["choices"][0]["finish_reason"].is_null());
        assert_eq!(sse(&json!({"a": 1})), "data: {\"a\":1}\n\n");
        let chat = chat_body(&reply, "node-1");
        assert_eq!((chat["reply"].as_str(), chat.get("replayed")), (Some("hello there"), None));
        let e = error_body(&ApiError::bad(409, "turn_conflict", "no"));
        assert_eq!(e["error"]["code"], "turn_conflict");
    }
}
