//! Conversations: the ordered turns of one session, the turn count, the
//! `history_digest` of the public API, the Redis keys, and the stored form of a turn.
//!
//! Invariants: a conversation is a sequence of complete turns, each a user message and
//! the assistant's reply; `turns()` counts them; the digest is the lowercase hex SHA-256
//! of the user messages in order, each followed by `"\n"` (UTF-8), so a client can
//! recompute it and any lost turn shows.
//!
//! Stored form (docs/chat-node.md, "Storage layout"): one Redis list per session,
//! `sa:turns:{<session id>}`, one JSON entry per turn, appended by a compare-and-append
//! script (see [`crate::redis_store`]). Entry `n` (1-based) carries `"n": n`, so a list
//! whose entries are not numbered 1, 2, 3, … is refused as corrupt rather than misread.
//! Each entry also carries a write id, unique per write, so a retried append whose
//! earlier attempt landed is recognised (its entry is already there) and not applied
//! twice. The whole-value string key of the previous layout, `sa:conv:{<session id>}`,
//! is still read ([`decode_legacy`]) so upgraded nodes keep old conversations.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Version tag of a stored turn entry (`"v"`).
pub const ENTRY_VERSION: u32 = 2;
/// Version tag of the previous layout's whole-conversation value.
pub const LEGACY_VERSION: u32 = 1;

/// Redis key of a session's list of turns. The `{session id}` hash tag keeps every key
/// of a session in one Redis Cluster slot.
pub fn turns_key(session_id: &str) -> String {
    format!("sa:turns:{{{session_id}}}")
}

/// Redis key of the previous layout (one JSON string holding the whole conversation).
pub fn legacy_key(session_id: &str) -> String {
    format!("sa:conv:{{{session_id}}}")
}

/// One turn: the user's message, the assistant's reply, and the id of the write that
/// stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub user: String,
    pub reply: String,
    pub id: String,
}

/// The turns of one session, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conversation {
    turns: Vec<Turn>,
}

impl Conversation {
    /// An empty conversation (no turn yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// A conversation of these turns.
    pub fn from_turns(turns: Vec<Turn>) -> Self {
        Self { turns }
    }

    /// All turns, oldest first.
    pub fn turn_list(&self) -> &[Turn] {
        &self.turns
    }

    /// Number of completed turns (= user messages).
    pub fn turns(&self) -> u64 {
        self.turns.len() as u64
    }

    /// User messages, oldest first.
    pub fn user_messages(&self) -> impl Iterator<Item = &str> {
        self.turns.iter().map(|t| t.user.as_str())
    }

    /// `(role, content)` of every message, oldest first: user, assistant, user, …
    pub fn messages(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.turns.iter().flat_map(|t| [("user", t.user.as_str()), ("assistant", t.reply.as_str())])
    }

    /// The last turn, if any.
    pub fn last(&self) -> Option<&Turn> {
        self.turns.last()
    }

    /// `history_digest` of the public API over the user messages so far.
    pub fn digest(&self) -> String {
        digest_of(self.user_messages())
    }

    /// A copy with one more turn appended.
    pub fn with_turn(&self, turn: Turn) -> Conversation {
        let mut turns = Vec::with_capacity(self.turns.len() + 1);
        turns.extend_from_slice(&self.turns);
        turns.push(turn);
        Conversation { turns }
    }

    /// Whether `self` is `other`'s first `self.turns()` turns (same write ids).
    pub fn is_prefix_of(&self, other: &Conversation) -> bool {
        self.turns.len() <= other.turns.len() && self.turns.iter().zip(&other.turns).all(|(a, b)| a == b)
    }

    /// Message bytes (user messages and replies), used to bound one session.
    pub fn content_bytes(&self) -> usize {
        self.turns.iter().map(|t| t.user.len() + t.reply.len()).sum()
    }
}

/// The stored JSON entry of turn number `n` (1-based).
pub fn encode_entry(n: u64, turn: &Turn, written_by: &str, unix_now: u64) -> String {
    let entry = EntryRef {
        v: ENTRY_VERSION,
        n,
        id: &turn.id,
        by: written_by,
        at: unix_now,
        user: &turn.user,
        reply: &turn.reply,
    };
    // Serializing plain strings and integers cannot fail; an empty string would only
    // make the entry undecodable, which `decode_entries` reports, never a panic.
    serde_json::to_string(&entry).unwrap_or_default()
}

/// Decodes a stored list of entries, checking each entry's version and number.
pub fn decode_entries<B: AsRef<[u8]>>(entries: &[B]) -> Result<Conversation, DecodeError> {
    let mut turns = Vec::with_capacity(entries.len());
    for (i, raw) in entries.iter().enumerate() {
        let entry: Entry = serde_json::from_slice(raw.as_ref()).map_err(|_| DecodeError::NotJson)?;
        if entry.v != ENTRY_VERSION {
            return Err(DecodeError::Version(entry.v));
        }
        if entry.n != i as u64 + 1 {
            return Err(DecodeError::TurnMismatch);
        }
        turns.push(Turn { user: entry.user, reply: entry.reply, id: entry.id });
    }
    Ok(Conversation { turns })
}

/// Decodes a value of the previous layout (`sa:conv:{sid}`, one JSON object with every
/// message) and checks it belongs to `session_id` and is whole turns. Its turns get the
/// write ids `legacy-<n>`, the same on every node, so two nodes migrating one
/// conversation at once write identical entries.
pub fn decode_legacy(bytes: &[u8], session_id: &str) -> Result<Conversation, DecodeError> {
    let stored: Legacy = serde_json::from_slice(bytes).map_err(|_| DecodeError::NotJson)?;
    if stored.v != LEGACY_VERSION {
        return Err(DecodeError::Version(stored.v));
    }
    if stored.session != session_id {
        return Err(DecodeError::OtherSession);
    }
    if !stored.messages.len().is_multiple_of(2) {
        return Err(DecodeError::NotWholeTurns);
    }
    let mut turns = Vec::with_capacity(stored.messages.len() / 2);
    for (i, pair) in stored.messages.chunks_exact(2).enumerate() {
        if pair[0].role != "user" || pair[1].role != "assistant" {
            return Err(DecodeError::NotWholeTurns);
        }
        turns.push(Turn {
            user: pair[0].content.clone(),
            reply: pair[1].content.clone(),
            id: format!("legacy-{}", i + 1),
        });
    }
    if turns.len() as u64 != stored.turns {
        return Err(DecodeError::TurnMismatch);
    }
    Ok(Conversation { turns })
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
                write!(f, "stored conversation's turn numbers disagree with its entries")
            }
        }
    }
}

#[derive(Serialize)]
struct EntryRef<'a> {
    v: u32,
    n: u64,
    id: &'a str,
    by: &'a str,
    at: u64,
    user: &'a str,
    reply: &'a str,
}

#[derive(Deserialize)]
struct Entry {
    v: u32,
    n: u64,
    id: String,
    user: String,
    reply: String,
}

#[derive(Deserialize)]
struct LegacyMessage {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct Legacy {
    v: u32,
    session: String,
    turns: u64,
    messages: Vec<LegacyMessage>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn turn(user: &str, reply: &str) -> Turn {
        Turn { user: user.into(), reply: reply.into(), id: format!("id-{user}") }
    }

    fn conv(users: &[&str]) -> Conversation {
        users.iter().fold(Conversation::new(), |c, u| c.with_turn(turn(u, "reply")))
    }

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
            assert_eq!(conv(messages).digest(), want);
            assert_eq!(digest_of(messages.iter().copied()), want);
        }
    }

    #[test]
    fn digest_ignores_replies_and_is_order_sensitive() {
        let a = Conversation::new().with_turn(turn("x", "r1")).with_turn(turn("y", "r2"));
        let b = Conversation::new().with_turn(turn("x", "other")).with_turn(turn("y", "r"));
        let c = Conversation::new().with_turn(turn("y", "r1")).with_turn(turn("x", "r2"));
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), c.digest());
        // The contract's framing is ambiguous: one message "a\nb" hashes like the two
        // messages "a", "b". Harmless, since `turn` tells them apart.
        assert_eq!(digest_of(["a\nb"]), digest_of(["a", "b"]));
    }

    #[test]
    fn turns_and_messages() {
        let c = conv(&["1", "2", "3"]);
        assert_eq!(c.turns(), 3);
        assert_eq!(c.user_messages().collect::<Vec<_>>(), ["1", "2", "3"]);
        let m: Vec<_> = c.messages().collect();
        assert_eq!(m.len(), 6);
        assert_eq!((m[0], m[1]), (("user", "1"), ("assistant", "reply")));
        assert_eq!(c.last().unwrap().user, "3");
    }

    #[test]
    fn keys_carry_the_hash_tag() {
        assert_eq!(turns_key("abc"), "sa:turns:{abc}");
        assert_eq!(legacy_key("abc"), "sa:conv:{abc}");
    }

    #[test]
    fn entries_round_trip_and_are_numbered() {
        let c = Conversation::new().with_turn(turn("héllo \"q\"\n", "r1")).with_turn(turn("", "r2"));
        let entries: Vec<String> =
            c.turn_list().iter().enumerate().map(|(i, t)| encode_entry(i as u64 + 1, t, "node-1", 7)).collect();
        assert!(entries[0].starts_with("{\"v\":2,\"n\":1,\"id\":\"id-héllo"), "{}", entries[0]);
        assert_eq!(decode_entries(&entries).unwrap(), c);
        // Out of order, a gap, a duplicate: refused.
        for bad in [
            vec![entries[1].clone()],
            vec![entries[1].clone(), entries[0].clone()],
            vec![entries[0].clone(), entries[0].clone()],
        ] {
            assert_eq!(decode_entries(&bad), Err(DecodeError::TurnMismatch));
        }
        assert_eq!(decode_entries(&["nope"]), Err(DecodeError::NotJson));
        let v3 = r#"{"v":3,"n":1,"id":"x","user":"a","reply":"b"}"#;
        assert_eq!(decode_entries(&[v3]), Err(DecodeError::Version(3)));
        assert_eq!(decode_entries::<&str>(&[]).unwrap(), Conversation::new());
    }

    #[test]
    fn prefix() {
        let (a, ab) = (conv(&["a"]), conv(&["a", "b"]));
        assert!(a.is_prefix_of(&ab) && ab.is_prefix_of(&ab) && Conversation::new().is_prefix_of(&a));
        assert!(!ab.is_prefix_of(&a));
        assert!(!conv(&["x"]).is_prefix_of(&ab));
    }

    #[test]
    fn legacy_values_decode_with_stable_ids() {
        let v = br#"{"v":1,"session":"s","turns":2,"written_by":"node-1","written_at":0,"messages":[
            {"role":"user","content":"a"},{"role":"assistant","content":"ra"},
            {"role":"user","content":"b"},{"role":"assistant","content":"rb"}]}"#;
        let c = decode_legacy(v, "s").unwrap();
        assert_eq!(c.turns(), 2);
        assert_eq!(c.turn_list()[1], Turn { user: "b".into(), reply: "rb".into(), id: "legacy-2".into() });
        assert_eq!(decode_legacy(v, "other"), Err(DecodeError::OtherSession));
        let cases: Vec<(&[u8], DecodeError)> = vec![
            (b"nope", DecodeError::NotJson),
            (br#"{"v":2,"session":"s","turns":0,"messages":[]}"#, DecodeError::Version(2)),
            (br#"{"v":1,"session":"s","turns":1,"messages":[{"role":"user","content":"a"}]}"#, DecodeError::NotWholeTurns),
            (
                br#"{"v":1,"session":"s","turns":1,"messages":[{"role":"assistant","content":"a"},{"role":"user","content":"b"}]}"#,
                DecodeError::NotWholeTurns,
            ),
            (
                br#"{"v":1,"session":"s","turns":3,"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#,
                DecodeError::TurnMismatch,
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(decode_legacy(bytes, "s"), Err(want));
        }
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0x00, 0xab, 0xff, 0x10]), "00abff10");
    }
}
