//! The "model" that writes replies: the built-in deterministic one ([`Builtin`]), so
//! tests need no LLM, or the OpenAI-compatible forwarder in [`crate::llm`].
//!
//! Invariant of [`Builtin`]: the reply is a pure function of the history and the new
//! message (and so of the turn number); nothing else (time, node, randomness) enters it.

use crate::conversation::Conversation;
use std::fmt;

/// Why a reply could not be produced (only the LLM forwarder fails).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelError {
    /// Could not connect, send or receive (includes timeouts).
    Unreachable(String),
    /// The endpoint answered with a non-2xx status.
    Status(u16),
    /// The answer was not an OpenAI-compatible chat completion.
    BadResponse(String),
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::Unreachable(why) => write!(f, "LLM endpoint unreachable: {why}"),
            ModelError::Status(code) => write!(f, "LLM endpoint answered HTTP {code}"),
            ModelError::BadResponse(why) => write!(f, "LLM endpoint gave a bad response: {why}"),
        }
    }
}

/// Deterministic stand-in for an LLM.
#[derive(Debug, Clone, Copy, Default)]
pub struct Builtin;

/// Longest quote of a message in a built-in reply, in characters.
const QUOTE_CHARS: usize = 60;

impl Builtin {
    /// The reply to `message` after `history`.
    pub fn reply(&self, history: &Conversation, message: &str) -> String {
        let turn = history.turns() + 1;
        let said = quote(message);
        let reply = match history.user_messages().next() {
            None => format!("turn 1: you said '{said}'; this is the start of our conversation"),
            Some(first) => format!(
                "turn {turn}: you said '{said}'; earlier you mentioned '{}' ({} earlier message{})",
                quote(first),
                turn - 1,
                if turn == 2 { "" } else { "s" }
            ),
        };
        reply
    }
}

/// At most [`QUOTE_CHARS`] characters of `text`, with `...` when cut (never splits a
/// UTF-8 character).
fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE_CHARS) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}...", &text[..cut]),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::conversation::Turn;

    #[test]
    fn builtin_replies_are_deterministic_and_use_history() {
        let turn = |user: &str, reply: &str| Turn { user: user.into(), reply: reply.into(), id: String::new() };
        let empty = Conversation::new();
        let r1 = Builtin.reply(&empty, "first message");
        assert_eq!(r1, "turn 1: you said 'first message'; this is the start of our conversation");
        let h1 = empty.with_turn(turn("first message", &r1));
        let r2 = Builtin.reply(&h1, "x");
        assert_eq!(r2, "turn 2: you said 'x'; earlier you mentioned 'first message' (1 earlier message)");
        let h2 = h1.with_turn(turn("x", &r2));
        assert_eq!(
            Builtin.reply(&h2, "y"),
            "turn 3: you said 'y'; earlier you mentioned 'first message' (2 earlier messages)"
        );
        assert_eq!(Builtin.reply(&h2, "y"), Builtin.reply(&h2, "y"));
    }

    #[test]
    fn quotes_are_cut_on_char_boundaries() {
        let long = "é".repeat(100);
        let q = quote(&long);
        assert_eq!(q.chars().count(), QUOTE_CHARS + 3);
        assert!(q.ends_with("..."));
        assert_eq!(quote("short"), "short");
        assert_eq!(quote(""), "");
        let exact = "a".repeat(QUOTE_CHARS);
        assert_eq!(quote(&exact), exact);
    }
}
