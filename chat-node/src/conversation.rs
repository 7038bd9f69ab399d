//! Conversations: the ordered messages of one session, the turn count, the
//! `history_digest` of the public API, and the form stored in Redis.
//!
//! Invariants: a stored conversation is a sequence of complete turns, each a user message
//! followed by the assistant's reply; `turns()` counts user messages; the digest is the
//! lowercase hex SHA-256 of the user messages in order, each followed by `"\n"` (UTF-8),
//! so a client can recompute it and any lost turn shows.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Version tag of the stored JSON form (`"v"`).
pub const STORED_VERSION: u32 = 1;

/// Redis key of a session's conversation. The `{session id}` hash tag keeps every key of
/// a session in one Redis Cluster slot.
pub fn store_key(session_id: &str) -> String {
    format!("sa:conv:{{{session_id}}}")
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// The messages of one session, always whole turns (user, assistant, user, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conversation {
    messages: Vec<Message>,
}

impl Conversation {
    /// An empty conversation (no turn yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// All messages, oldest first.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Number of user messages, i.e. of completed turns.
    pub fn turns(&self) -> u64 {
        self.user_messages().count() as u64
    }

    /// User messages, oldest first.
    pub fn user_messages(&self) -> impl Iterator<Item = &str> {
        self.messages.iter().filter(|m| m.role == Role::User).map(|m| m.content.as_str())
    }

    /// `history_digest` of the public API over the user messages so far.
    pub fn digest(&self) -> String {
        digest_of(self.user_messages())
    }

    /// A copy with one more turn appended.
    pub fn with_turn(&self, user: &str, reply: &str) -> Conversation {
        let mut messages = Vec::with_capacity(self.messages.len() + 2);
        messages.extend_from_slice(&self.messages);
        messages.push(Message { role: Role::User, content: user.to_owned() });
        messages.push(Message { role: Role::Assistant, content: reply.to_owned() });
        Conversation { messages }
    }

    /// Rough size in bytes (message contents), used to bound what one session stores.
    pub fn content_bytes(&self) -> usize {
        self.messages.iter().map(|m| m.content.len()).sum()
    }

    /// The JSON value stored in Redis.
    pub fn encode(&self, session_id: &str, written_by: &str, unix_now: u64) -> Vec<u8> {
        let stored = StoredRef {
            v: STORED_VERSION,
            session: session_id,
            turns: self.turns(),
            written_by,
            written_at: unix_now,
            messages: &self.messages,
        };
        // Serializing plain strings and integers cannot fail; an empty vector would only
        // make the value undecodable, which `decode` reports, never a panic.
        serde_json::to_vec(&stored).unwrap_or_default()
    }

    /// Parses a stored value and checks it belongs to `session_id` and is whole turns.
    pub fn decode(bytes: &[u8], session_id: &str) -> Result<Conversation, DecodeError> {
        let stored: Stored = serde_json::from_slice(bytes).map_err(|_| DecodeError::NotJson)?;
        if stored.v != STORED_VERSION {
            return Err(DecodeError::Version(stored.v));
        }
        if stored.session != session_id {
            return Err(DecodeError::OtherSession);
        }
        let alternating = stored.messages.iter().enumerate().all(|(i, m)| {
            let expected = if i % 2 == 0 { Role::User } else { Role::Assistant };
            m.role == expected
        });
        if !alternating || !stored.messages.len().is_multiple_of(2) {
            return Err(DecodeError::NotWholeTurns);
        }
        let conversation = Conversation { messages: stored.messages };
        if conversation.turns() != stored.turns {
            return Err(DecodeError::TurnMismatch);
        }
        Ok(conversation)
    }
}

/// Lowercase hex SHA-256 of each message followed by `"\n"`.
pub fn digest_of<'a>(user_messages: impl IntoIterator<Item = &'a str>) -> String {
    let mut hasher = Sha256::new();
    for message in user_messages {
        hasher.update(message.as_bytes());
        hasher.update(b"\n");
    }
    hex(hasher.finalize().as_slice())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Why a stored value could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    NotJson,
    Version(u32),
    OtherSession,
    NotWholeTurns,
    TurnMismatch,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::NotJson => write!(f, "stored conversation is not valid JSON"),
            DecodeError::Version(v) => write!(f, "stored conversation has unknown version {v}"),
            DecodeError::OtherSession => write!(f, "stored conversation names another session"),
            DecodeError::NotWholeTurns => {
                write!(f, "stored conversation is not alternating user/assistant turns")
            }
            DecodeError::TurnMismatch => {
                write!(f, "stored conversation's turn count disagrees with its messages")
            }
        }
    }
}

#[derive(Serialize)]
struct StoredRef<'a> {
    v: u32,
    session: &'a str,
    turns: u64,
    written_by: &'a str,
    written_at: u64,
    messages: &'a [Message],
}

#[derive(Deserialize)]
struct Stored {
    v: u32,
    session: String,
    turns: u64,
    messages: Vec<Message>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn digest_of_nothing_is_sha256_of_empty() {
        assert_eq!(Conversation::new().digest(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn digest_covers_user_messages_with_newlines() {
        // Expected values from coreutils: printf 'hello\n' | sha256sum, etc.
        let table: [(&[&str], &str); 2] = [
            (&["hello"], "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"),
            (&["a", "b"], "911169ddaaf146aff539f58c26c489af3b892dff0fe283c1c264c65ae5aa59a2"),
        ];
        for (messages, want) in table {
            let mut c = Conversation::new();
            for m in messages {
                c = c.with_turn(m, "reply");
            }
            assert_eq!(c.digest(), want);
            assert_eq!(digest_of(messages.iter().copied()), want);
        }
    }

    #[test]
    fn digest_ignores_replies_and_is_order_sensitive() {
        let a = Conversation::new().with_turn("x", "r1").with_turn("y", "r2");
        let b = Conversation::new().with_turn("x", "other").with_turn("y", "r");
        let c = Conversation::new().with_turn("y", "r1").with_turn("x", "r2");
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), c.digest());
        // The contract's framing is ambiguous: one message "a\nb" hashes like the two
        // messages "a", "b". Harmless, since `turn` tells them apart.
        assert_eq!(digest_of(["a\nb"]), digest_of(["a", "b"]));
    }

    #[test]
    fn turns_count_user_messages() {
        let c = Conversation::new().with_turn("1", "a").with_turn("2", "b").with_turn("3", "c");
        assert_eq!(c.turns(), 3);
        assert_eq!(c.messages().len(), 6);
        assert_eq!(c.user_messages().collect::<Vec<_>>(), ["1", "2", "3"]);
    }

    #[test]
    fn key_carries_hash_tag() {
        assert_eq!(store_key("abc"), "sa:conv:{abc}");
    }

    #[test]
    fn stored_form_round_trips() {
        let c = Conversation::new().with_turn("héllo \"q\"\n", "r1").with_turn("", "r2");
        let bytes = c.encode("s1", "node-1", 1_700_000_000);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("{\"v\":1,\"session\":\"s1\",\"turns\":2,"));
        assert_eq!(Conversation::decode(&bytes, "s1").unwrap(), c);
    }

    #[test]
    fn decode_refuses_bad_values() {
        let good = Conversation::new().with_turn("a", "b").encode("s", "n", 0);
        let cases: Vec<(Vec<u8>, &str, DecodeError)> = vec![
            (b"nope".to_vec(), "s", DecodeError::NotJson),
            (good.clone(), "other", DecodeError::OtherSession),
            (
                br#"{"v":2,"session":"s","turns":0,"messages":[]}"#.to_vec(),
                "s",
                DecodeError::Version(2),
            ),
            (
                br#"{"v":1,"session":"s","turns":1,"messages":[{"role":"user","content":"a"}]}"#
                    .to_vec(),
                "s",
                DecodeError::NotWholeTurns,
            ),
            (
                br#"{"v":1,"session":"s","turns":1,"messages":[{"role":"assistant","content":"a"},{"role":"user","content":"b"}]}"#
                    .to_vec(),
                "s",
                DecodeError::NotWholeTurns,
            ),
            (
                br#"{"v":1,"session":"s","turns":3,"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#
                    .to_vec(),
                "s",
                DecodeError::TurnMismatch,
            ),
        ];
        for (bytes, sid, want) in cases {
            assert_eq!(Conversation::decode(&bytes, sid), Err(want));
        }
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0x00, 0xab, 0xff, 0x10]), "00abff10");
    }
}
