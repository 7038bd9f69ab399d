//! Affinity ticket parse + verify: raw bytes (the tail of the input) checked for a session
//! at a time, and issue/verify round trips with tampering.
//!
//! Invariants: a verified ticket is unexpired, short and verifies again; an issued ticket
//! verifies for its session (same node, `iat`, `exp`), never for another session, never
//! at or after `exp`; changing any byte of it either breaks it or leaves exactly the same
//! claims (base64 trailing bits).
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use session_affinity::jws::{Alg, MacKey};
use session_affinity::ticket::{Ticket, Tickets, MAX_TICKET_BYTES};

const SESSIONS: &[&str] = &["conv-7f3a", "s", "alice", "会话-ü", "a\"b\\c"];

fn run(mut u: Unstructured<'_>) -> arbitrary::Result<()> {
    let sel: u8 = u.arbitrary()?;
    let now = common::NOW + i64::from(u.arbitrary::<i32>()?);
    let node: u64 = u.arbitrary()?;
    let ttl = i64::from(u.arbitrary::<u32>()?.max(1));
    let flip_at: u16 = u.arbitrary()?;
    let flip_to: u8 = u.arbitrary()?;
    let raw = u.take_rest();
    let session = SESSIONS[usize::from(sel) % SESSIONS.len()];
    let tickets = Tickets {
        mac: MacKey::new(Alg::HS256, &common::decode_std(common::TICKET_KEY_B64)).unwrap(),
        ttl_seconds: ttl,
    };

    // Whatever the client sent.
    if let Some(t) = tickets.verify(raw, session, now) {
        assert!(raw.len() <= MAX_TICKET_BYTES);
        assert!(now <= t.exp, "verified but expired: {t:?} at {now}");
        assert_eq!(tickets.verify(raw, session, now), Some(t));
        for other in SESSIONS.iter().filter(|s| **s != session) {
            assert_eq!(tickets.verify(raw, other, now), None, "one ticket, two sessions");
        }
    }
    // The raw bytes as a session id: issue, verify, tamper.
    let session = match std::str::from_utf8(raw) {
        Ok(s) if sel & 0x80 != 0 => s,
        _ => session,
    };
    let issued = tickets.issue(session, node, now);
    if issued.len() > MAX_TICKET_BYTES {
        assert_eq!(tickets.verify(issued.as_bytes(), session, now), None);
        return Ok(());
    }
    let want = Ticket { node, iat: now, exp: now + ttl };
    assert_eq!(tickets.verify(issued.as_bytes(), session, now), Some(want));
    assert_eq!(tickets.verify(issued.as_bytes(), session, want.exp - 1), Some(want));
    assert_eq!(tickets.verify(issued.as_bytes(), session, want.exp), None, "expired at exp");
    let other = format!("{session}x");
    assert_eq!(tickets.verify(issued.as_bytes(), &other, now), None);
    let mut tampered = issued.clone().into_bytes();
    let i = usize::from(flip_at) % tampered.len();
    if tampered[i] != flip_to {
        tampered[i] = flip_to;
        match tickets.verify(&tampered, session, now) {
            None => {}
            Some(t) => assert_eq!(t, want, "a changed ticket verified with other claims"),
        }
    }
    // Another key never verifies it.
    let forger = Tickets { mac: MacKey::new(Alg::HS256, &[0x42; 32]).unwrap(), ttl_seconds: ttl };
    assert_eq!(forger.verify(issued.as_bytes(), session, now), None);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(Unstructured::new(data));
});
