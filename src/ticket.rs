//! Affinity tickets (DESIGN section 4, a public contract): which node last served a
//! session, signed so that any proxy replica can trust it without shared state.
//!
//! A ticket is a compact JWT, `HS256` with `ticket.secret`, claims
//! `{"sid", "node", "iat", "exp"}`. `node` is a node id (hex of `h64(host key)`), never an
//! address. A ticket is usable only with a valid signature, an unexpired `exp` and the
//! same `sid` as the request's session token; anything else is ignored (and counted).

use crate::hosts;
use crate::jws::{self, Alg, Claim, JsonValue, MacKey};

/// A ticket that verified and belongs to the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// `h64` of the node that served the session last.
    pub node: u64,
    pub iat: i64,
    pub exp: i64,
}

/// Ticket signing and checking, prepared at configuration time.
#[derive(Clone, Debug)]
pub struct Tickets {
    pub mac: MacKey,
    pub ttl_seconds: i64,
}

impl Tickets {
    /// Checks `raw` for `session` at `now`. `None` means unusable (forged, malformed,
    /// expired, or another session's ticket).
    pub fn verify(&self, raw: &[u8], session: &str, now: i64) -> Option<Ticket> {
        if raw.len() > MAX_TICKET_BYTES {
            return None;
        }
        let parts = jws::split(raw)?;
        let [alg] = jws::members(&parts.header, ["alg"])?;
        if alg.as_ref().and_then(Claim::as_str) != Some(Alg::HS256.name()) {
            return None;
        }
        if !self.mac.verify(parts.signing_input, &parts.signature) {
            return None;
        }
        let [sid, node, iat, exp] = jws::members(&parts.payload, ["sid", "node", "iat", "exp"])?;
        if sid.as_ref().and_then(Claim::as_str) != Some(session) {
            return None;
        }
        let node = hosts::parse_node_id(node.as_ref().and_then(Claim::as_str)?)?;
        let exp = exp.as_ref().and_then(Claim::as_num)?;
        let iat = iat.as_ref().and_then(Claim::as_num)?;
        if (now as f64) >= exp {
            return None;
        }
        Some(Ticket { node, iat: iat as i64, exp: exp as i64 })
    }

    /// Issues a ticket naming `node` for `session`.
    pub fn issue(&self, session: &str, node: u64, now: i64) -> String {
        let node_id = hosts::node_id(node);
        let payload = jws::json_object(&[
            ("sid", JsonValue::Str(session)),
            ("node", JsonValue::Str(&node_id)),
            ("iat", JsonValue::Int(now)),
            ("exp", JsonValue::Int(now.saturating_add(self.ttl_seconds))),
        ]);
        jws::sign(&self.mac, br#"{"alg":"HS256","typ":"JWT"}"#, payload.as_bytes())
    }

    /// True when a still-valid ticket is past half of its lifetime and should be
    /// refreshed, so that an active conversation never loses its ticket to expiry.
    pub fn needs_refresh(&self, ticket: &Ticket, now: i64) -> bool {
        let lifetime = ticket.exp.saturating_sub(ticket.iat).max(1);
        now.saturating_sub(ticket.iat).saturating_mul(2) >= lifetime
    }
}

/// Tickets are small (about 150 bytes); anything much larger is not ours.
pub const MAX_TICKET_BYTES: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn tickets() -> Tickets {
        Tickets { mac: MacKey::new(Alg::HS256, &[9; 32]).unwrap(), ttl_seconds: 100 }
    }

    #[test]
    fn round_trip_and_binding() {
        let t = tickets();
        let raw = t.issue("s1", 0xabc, 1000);
        assert_eq!(t.verify(raw.as_bytes(), "s1", 1000), Some(Ticket { node: 0xabc, iat: 1000, exp: 1100 }));
        assert_eq!(t.verify(raw.as_bytes(), "s2", 1000), None, "other session");
        assert_eq!(t.verify(raw.as_bytes(), "s1", 1100), None, "expired");
        let other = Tickets { mac: MacKey::new(Alg::HS256, &[8; 32]).unwrap(), ttl_seconds: 100 };
        assert_eq!(other.verify(raw.as_bytes(), "s1", 1000), None, "forged");
        assert_eq!(t.verify(b"garbage", "s1", 1000), None);
        // Node ids travel as hex, never as addresses.
        let payload = jws::split(raw.as_bytes()).unwrap().payload;
        assert_eq!(jws::members(&payload, ["node"]).unwrap()[0].as_ref().unwrap().as_str(), Some("0000000000000abc"));
    }

    #[test]
    fn refresh_after_half_life() {
        let t = tickets();
        let ticket = Ticket { node: 1, iat: 1000, exp: 1100 };
        assert!(!t.needs_refresh(&ticket, 1049));
        assert!(t.needs_refresh(&ticket, 1050));
    }
}
