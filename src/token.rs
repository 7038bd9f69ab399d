//! Session tokens (DESIGN section 3, a public contract): validation and minting.
//!
//! Checks run in the contract's order and the first failure wins:
//! size (`oversized`) → three strict base64url segments with JSON object header and
//! payload (`malformed`) → algorithm (`disallowed_alg`) → key (`unknown_key`) →
//! signature (`bad_signature`) → claims (`expired`, `not_yet_valid`, `bad_claims`).
//! No claim is read before the signature has been verified.
//!
//! Claims are checked in this order: `exp`, `nbf`, `iat` (type only), `iss`, `aud`, the
//! session claim. A claim whose type the contract fixes (`exp`, `nbf`, `iat` numbers;
//! `iss` a string; `aud` a string or an array of strings; the session claim a non-empty
//! string) is `bad_claims` at its turn when it has another type, whether or not an
//! issuer or audience is configured.

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
        // `iss` is a string whenever present; it must equal `issuer` when one is set.
        let iss = match iss {
            Some(Claim::Str(s)) => Some(s),
            Some(_) => return Err(TokenError::BadClaims),
            None => None,
        };
        if let Some(issuer) = &self.issuer {
            if iss.as_deref() != Some(issuer.as_str()) {
                return Err(TokenError::BadClaims);
            }
        }
        // `aud` is a string or an array of strings whenever present (`["chat", 5]` is
        // refused even though it contains "chat"); it must contain `audience` when set.
        let aud_ok = match (&aud, &self.audience) {
            (Some(Claim::Str(a)), Some(audience)) => a == audience,
            (Some(Claim::Arr { strings, all_strings: true }), Some(audience)) => strings.iter().any(|a| a == audience),
            (Some(Claim::Str(_)) | Some(Claim::Arr { all_strings: true, .. }), None) => true,
            (Some(_), _) => false,
            (None, audience) => audience.is_none(),
        };
        if !aud_ok {
            return Err(TokenError::BadClaims);
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
            json!({"sid":"s","exp":null}),
            json!({"sid":"s","exp":100,"iat":null}),
            // iss and aud have fixed types even when no issuer or audience is configured.
            json!({"sid":"s","exp":100,"iss":7}),
            json!({"sid":"s","exp":100,"iss":["a"]}),
            json!({"sid":"s","exp":100,"iss":null}),
            json!({"sid":"s","exp":100,"aud":5}),
            json!({"sid":"s","exp":100,"aud":["chat",5]}),
            json!({"sid":"s","exp":100,"aud":[["chat"]]}),
            json!({"sid":"s","exp":100,"aud":{"chat":true}}),
            json!({"sid":"s","exp":100,"aud":null}),
        ] {
            let t = make(k, json!({"alg":"HS256","kid":"a"}), payload.clone());
            assert_eq!(v.validate(t.as_bytes(), 0), Err(TokenError::BadClaims), "{payload}");
        }
        for payload in [
            json!({"sid":"s","exp":100,"iss":"anyone","aud":"anything"}),
            json!({"sid":"s","exp":100,"aud":[]}),
            json!({"sid":"s","exp":100,"aud":["a","b"]}),
        ] {
            let t = make(k, json!({"alg":"HS256","kid":"a"}), payload.clone());
            assert!(v.validate(t.as_bytes(), 0).is_ok(), "{payload}");
        }
        let mut no_exp = validator();
        no_exp.require_exp = false;
        let t = make(k, json!({"alg":"HS256","kid":"a"}), json!({"sid":"s"}));
        assert!(no_exp.validate(t.as_bytes(), 0).is_ok());
    }

    #[test]
    fn configured_issuer_and_audience() {
        let mut v = validator();
        v.issuer = Some("iss".into());
        v.audience = Some("chat".into());
        let k = &v.keys[0].mac;
        let cases = [
            (json!({"sid":"s","exp":100,"iss":"iss","aud":"chat"}), Ok(())),
            (json!({"sid":"s","exp":100,"iss":"iss","aud":["other","chat"]}), Ok(())),
            (json!({"sid":"s","exp":100,"iss":"iss","aud":["chat",5]}), Err(TokenError::BadClaims)),
            (json!({"sid":"s","exp":100,"iss":"iss","aud":[5,"chat"]}), Err(TokenError::BadClaims)),
            (json!({"sid":"s","exp":100,"iss":"iss","aud":["other"]}), Err(TokenError::BadClaims)),
            (json!({"sid":"s","exp":100,"iss":"iss","aud":[]}), Err(TokenError::BadClaims)),
            (json!({"sid":"s","exp":100,"iss":"iss"}), Err(TokenError::BadClaims)),
            (json!({"sid":"s","exp":100,"aud":"chat"}), Err(TokenError::BadClaims)),
            (json!({"sid":"s","exp":100,"iss":"ISS","aud":"chat"}), Err(TokenError::BadClaims)),
            // Order: the time claims come before the others.
            (json!({"sid":"s","exp":1,"iss":7,"aud":5}), Err(TokenError::Expired)),
            (json!({"sid":"s","exp":100,"nbf":50,"aud":5}), Err(TokenError::NotYetValid)),
        ];
        for (payload, want) in cases {
            let t = make(k, json!({"alg":"HS256","kid":"a"}), payload.clone());
            assert_eq!(v.validate(t.as_bytes(), 10).map(|_| ()), want, "{payload}");
        }
    }

    #[test]
    fn header_checks_in_order() {
        // The documented order (docs/protocol.md): alg, then crit, then the kid's type,
        // then the key, then the key's alg.
        let v = validator();
        let k = &v.keys[0].mac;
        let p = json!({"sid":"s","exp":100});
        for (header, want) in [
            (json!({"alg":"none","crit":["x"],"kid":7}), TokenError::DisallowedAlg),
            (json!({"alg":"HS256","crit":["x"],"kid":7}), TokenError::Malformed),
            (json!({"alg":"HS256","crit":[],"kid":"zz"}), TokenError::Malformed),
            (json!({"alg":"HS256","kid":7}), TokenError::Malformed),
            (json!({"alg":"HS256","kid":null}), TokenError::Malformed),
            (json!({"alg":"HS256","kid":"zz"}), TokenError::UnknownKey),
            (json!({"alg":"HS256","kid":"c"}), TokenError::DisallowedAlg),
            (json!({"alg":7}), TokenError::DisallowedAlg),
            (json!({"alg":"HS384"}), TokenError::DisallowedAlg),
        ] {
            let t = make(k, header.clone(), p.clone());
            assert_eq!(v.validate(t.as_bytes(), 0), Err(want), "{header}");
        }
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
