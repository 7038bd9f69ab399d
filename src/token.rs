//! Session tokens (DESIGN section 3, a public contract): validation and minting.
//!
//! Checks run in the contract's order and the first failure wins:
//! size (`oversized`) → three strict base64url segments with JSON object header and
//! payload (`malformed`) → algorithm (`disallowed_alg`) → key (`unknown_key`) →
//! signature (`bad_signature`) → claims (`expired`, `not_yet_valid`, `bad_claims`).
//! No claim is read before the signature has been verified.
//!
//! Claims are checked in this order: `exp`, `nbf`, `iat` (type only), `iss`, `aud`, the
//! session claim. A claim of the wrong type is `bad_claims` at its turn.

use std::fmt;

use crate::jws::{self, Alg, Claim, JsonValue, MacKey};

/// Why a token was refused. The variants are the metric labels and the 401 reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenError {
    Malformed,
    Oversized,
    DisallowedAlg,
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    BadClaims,
}

impl TokenError {
    pub const ALL: [TokenError; 8] = [
        TokenError::Malformed,
        TokenError::Oversized,
        TokenError::DisallowedAlg,
        TokenError::UnknownKey,
        TokenError::BadSignature,
        TokenError::Expired,
        TokenError::NotYetValid,
        TokenError::BadClaims,
    ];

    /// The reason as it appears in metric names and in the 401 body.
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::Oversized => "oversized",
            TokenError::DisallowedAlg => "disallowed_alg",
            TokenError::UnknownKey => "unknown_key",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::BadClaims => "bad_claims",
        }
    }

    /// Position in [`TokenError::ALL`], for counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// One verification key: an algorithm pinned to a secret, optionally named by `kid`.
#[derive(Clone, Debug)]
pub struct Key {
    pub kid: Option<String>,
    pub mac: MacKey,
}

impl Key {
    pub fn alg(&self) -> Alg {
        self.mac.alg()
    }
}

/// Everything token validation needs, checked and prepared at configuration time.
#[derive(Clone, Debug)]
pub struct Validator {
    /// In configuration order; the first signs minted tokens. Never empty.
    pub keys: Vec<Key>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub session_claim: String,
    pub leeway_seconds: i64,
    pub require_exp: bool,
    pub max_token_bytes: usize,
}

/// A token that passed every check.
#[derive(Clone, Debug, PartialEq)]
pub struct Valid {
    pub session: String,
    /// The time claims, for re-checking a memoized token (see [`crate::memo`]).
    pub exp: Option<f64>,
    pub nbf: Option<f64>,
}

impl Validator {
    /// Validates `token` at unix time `now` (seconds).
    pub fn validate(&self, token: &[u8], now: i64) -> Result<Valid, TokenError> {
        if token.len() > self.max_token_bytes {
            return Err(TokenError::Oversized);
        }
        let parts = jws::split(token).ok_or(TokenError::Malformed)?;
        let [alg, kid, crit] = jws::members(&parts.header, ["alg", "kid", "crit"]).ok_or(TokenError::Malformed)?;
        let [exp, nbf, iat, iss, aud, session] =
            jws::members(&parts.payload, ["exp", "nbf", "iat", "iss", "aud", self.session_claim.as_str()])
                .ok_or(TokenError::Malformed)?;

        // Algorithm: an HMAC algorithm that at least one key is pinned to.
        let alg = alg
            .as_ref()
            .and_then(Claim::as_str)
            .and_then(Alg::from_name)
            .filter(|alg| self.keys.iter().any(|k| k.alg() == *alg))
            .ok_or(TokenError::DisallowedAlg)?;
        if crit.is_some() {
            // RFC 7515 4.1.11: extensions we do not understand must be refused.
            return Err(TokenError::Malformed);
        }

        // Key: by kid, or every key of this algorithm in configuration order.
        let verified = match kid {
            Some(Claim::Str(kid)) => {
                let key = self.keys.iter().find(|k| k.kid.as_deref() == Some(&*kid)).ok_or(TokenError::UnknownKey)?;
                if key.alg() != alg {
                    return Err(TokenError::DisallowedAlg);
                }
                key.mac.verify(parts.signing_input, &parts.signature)
            }
            Some(_) => return Err(TokenError::Malformed),
            None => {
                self.keys.iter().filter(|k| k.alg() == alg).any(|k| k.mac.verify(parts.signing_input, &parts.signature))
            }
        };
        if !verified {
            return Err(TokenError::BadSignature);
        }

        let leeway = self.leeway_seconds as f64;
        let now_f = now as f64;
        let exp = match exp {
            Some(v) => {
                let exp = v.as_num().ok_or(TokenError::BadClaims)?;
                if now_f >= exp + leeway {
                    return Err(TokenError::Expired);
                }
                Some(exp)
            }
            None if self.require_exp => return Err(TokenError::BadClaims),
            None => None,
        };
        let nbf = match nbf {
            Some(v) => {
                let nbf = v.as_num().ok_or(TokenError::BadClaims)?;
                if nbf > now_f + leeway {
                    return Err(TokenError::NotYetValid);
                }
                Some(nbf)
            }
            None => None,
        };
        if let Some(v) = iat {
            v.as_num().ok_or(TokenError::BadClaims)?;
        }
        if let Some(issuer) = &self.issuer {
            if iss.as_ref().and_then(Claim::as_str) != Some(issuer.as_str()) {
                return Err(TokenError::BadClaims);
            }
        }
        if let Some(audience) = &self.audience {
            let ok = match &aud {
                Some(Claim::Str(a)) => a == audience,
                Some(Claim::Arr { strings, .. }) => strings.iter().any(|a| a == audience),
                _ => false,
            };
            if !ok {
                return Err(TokenError::BadClaims);
            }
        }
        match session {
            Some(Claim::Str(s)) if valid_session_id(&s) => Ok(Valid { session: s.into_owned(), exp, nbf }),
            _ => Err(TokenError::BadClaims),
        }
    }

    /// Mints a token for a new session with the first key: `exp = now + ttl`, plus the
    /// configured `iss`/`aud` so that the token validates here and at every replica.
    pub fn mint(&self, session: &str, now: i64, ttl_seconds: i64) -> Option<String> {
        let key = self.keys.first()?;
        let mut header = vec![("alg", JsonValue::Str(key.alg().name())), ("typ", JsonValue::Str("JWT"))];
        if let Some(kid) = &key.kid {
            header.push(("kid", JsonValue::Str(kid)));
        }
        let mut payload = Vec::with_capacity(5);
        if let Some(iss) = &self.issuer {
            payload.push(("iss", JsonValue::Str(iss)));
        }
        if let Some(aud) = &self.audience {
            payload.push(("aud", JsonValue::Str(aud)));
        }
        payload.push((self.session_claim.as_str(), JsonValue::Str(session)));
        payload.push(("iat", JsonValue::Int(now)));
        payload.push(("exp", JsonValue::Int(now.saturating_add(ttl_seconds))));
        let header = jws::json_object(&header);
        let payload = jws::json_object(&payload);
        Some(jws::sign(&key.mac, header.as_bytes(), payload.as_bytes()))
    }
}

/// A session id must be non-empty and safe to forward in a header: no control bytes
/// (CR and LF would split the upstream request).
pub fn valid_session_id(s: &str) -> bool {
    !s.is_empty() && !s.bytes().any(|b| b < 0x20 || b == 0x7f)
}

/// A new session id: 128 random bits, base64url without padding (22 characters).
pub fn new_session_id(random: &[u8; 16]) -> String {
    jws::b64_encode(random)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn validator() -> Validator {
        Validator {
            keys: vec![
                Key { kid: Some("a".into()), mac: MacKey::new(Alg::HS256, &[1; 32]).unwrap() },
                Key { kid: None, mac: MacKey::new(Alg::HS256, &[2; 32]).unwrap() },
                Key { kid: Some("c".into()), mac: MacKey::new(Alg::HS512, &[3; 64]).unwrap() },
            ],
            issuer: None,
            audience: None,
            session_claim: "sid".into(),
            leeway_seconds: 0,
            require_exp: true,
            max_token_bytes: 4096,
        }
    }

    fn make(key: &MacKey, header: Value, payload: Value) -> String {
        jws::sign(key, &serde_json::to_vec(&header).unwrap(), &serde_json::to_vec(&payload).unwrap())
    }

    #[test]
    fn expiry_at_the_exact_second() {
        let v = validator();
        let k = &v.keys[0].mac;
        let t = make(k, json!({"alg":"HS256","kid":"a"}), json!({"sid":"s","exp":100}));
        assert_eq!(v.validate(t.as_bytes(), 99).map(|v| v.session), Ok("s".into()));
        assert_eq!(v.validate(t.as_bytes(), 100), Err(TokenError::Expired));
        let mut lenient = validator();
        lenient.leeway_seconds = 5;
        assert!(lenient.validate(t.as_bytes(), 104).is_ok());
        assert_eq!(lenient.validate(t.as_bytes(), 105), Err(TokenError::Expired));
        let nbf = make(k, json!({"alg":"HS256","kid":"a"}), json!({"sid":"s","exp":1000,"nbf":50}));
        assert_eq!(lenient.validate(nbf.as_bytes(), 44), Err(TokenError::NotYetValid));
        assert!(lenient.validate(nbf.as_bytes(), 45).is_ok());
        let frac = make(k, json!({"alg":"HS256","kid":"a"}), json!({"sid":"s","exp":100.5}));
        assert!(v.validate(frac.as_bytes(), 100).is_ok());
        assert_eq!(v.validate(frac.as_bytes(), 101), Err(TokenError::Expired));
    }

    #[test]
    fn key_selection() {
        let v = validator();
        // No kid: every HS256 key is tried in order, so the second key works.
        let t = make(&v.keys[1].mac, json!({"alg":"HS256"}), json!({"sid":"s","exp":100}));
        assert!(v.validate(t.as_bytes(), 0).is_ok());
        // With a kid, only that key is tried.
        let t = make(&v.keys[1].mac, json!({"alg":"HS256","kid":"a"}), json!({"sid":"s","exp":100}));
        assert_eq!(v.validate(t.as_bytes(), 0), Err(TokenError::BadSignature));
        // An algorithm no key uses is disallowed before the kid is looked at.
        let t = make(&v.keys[0].mac, json!({"alg":"HS384","kid":"zz"}), json!({"sid":"s","exp":100}));
        assert_eq!(v.validate(t.as_bytes(), 0), Err(TokenError::DisallowedAlg));
        let t = make(&v.keys[0].mac, json!({"alg":"HS256","kid":"zz"}), json!({"sid":"s","exp":100}));
        assert_eq!(v.validate(t.as_bytes(), 0), Err(TokenError::UnknownKey));
        let t = make(&v.keys[0].mac, json!({"alg":"HS256","kid":7}), json!({"sid":"s","exp":100}));
        assert_eq!(v.validate(t.as_bytes(), 0), Err(TokenError::Malformed));
        let t = make(&v.keys[0].mac, json!({"kid":"a"}), json!({"sid":"s","exp":100}));
        assert_eq!(v.validate(t.as_bytes(), 0), Err(TokenError::DisallowedAlg));
        let t = make(&v.keys[0].mac, json!({"alg":"HS256","kid":"a","crit":["x"]}), json!({"sid":"s","exp":100}));
        assert_eq!(v.validate(t.as_bytes(), 0), Err(TokenError::Malformed));
    }

    #[test]
    fn claims_are_read_only_after_the_signature() {
        let v = validator();
        // An expired token with a bad signature reports the signature.
        let t = make(&v.keys[2].mac, json!({"alg":"HS256","kid":"a"}), json!({"sid":"s","exp":1}));
        assert_eq!(v.validate(t.as_bytes(), 100), Err(TokenError::BadSignature));
    }

    #[test]
    fn claim_types() {
        let v = validator();
        let k = &v.keys[0].mac;
        for payload in [
            json!({"sid":"s","exp":"100"}),
            json!({"sid":"s","exp":100,"nbf":true}),
            json!({"sid":"s","exp":100,"iat":"x"}),
            json!({"sid":"","exp":100}),
            json!({"sid":"a\r\nb","exp":100}),
            json!({"sid":["s"],"exp":100}),
        ] {
            let t = make(k, json!({"alg":"HS256","kid":"a"}), payload.clone());
            assert_eq!(v.validate(t.as_bytes(), 0), Err(TokenError::BadClaims), "{payload}");
        }
        let mut no_exp = validator();
        no_exp.require_exp = false;
        let t = make(k, json!({"alg":"HS256","kid":"a"}), json!({"sid":"s"}));
        assert!(no_exp.validate(t.as_bytes(), 0).is_ok());
    }

    #[test]
    fn oversized_comes_first() {
        let mut v = validator();
        v.max_token_bytes = 10;
        assert_eq!(v.validate(b"not a token at all", 0), Err(TokenError::Oversized));
        assert_eq!(v.validate(b"a.b", 0), Err(TokenError::Malformed));
    }

    #[test]
    fn minted_tokens_validate() {
        let mut v = validator();
        v.issuer = Some("iss".into());
        v.audience = Some("aud".into());
        let t = v.mint("abc", 1000, 60).unwrap();
        assert_eq!(v.validate(t.as_bytes(), 1059).map(|v| v.session), Ok("abc".into()));
        assert_eq!(v.validate(t.as_bytes(), 1060), Err(TokenError::Expired));
        assert_eq!(new_session_id(&[0xff; 16]).len(), 22);
    }
}
