//! Compact JWS with HMAC: the shared layer of session tokens (`token`) and affinity
//! tickets (`ticket`).
//!
//! - [`split`] turns `b64(header).b64(payload).b64(signature)` into decoded parts. It is
//!   strict: exactly three segments, the URL-safe alphabet only, no padding, no length
//!   that cannot be base64 (4n+1), header and payload JSON objects without duplicate
//!   member names (`{"sid":"a","sid":"b"}` is refused, not read as either). Unused
//!   trailing bits of a final group are ignored, as RFC 4648 decoders commonly do: the
//!   reference vectors expect a truncated signature to be a `bad_signature`, not
//!   `malformed`. (The MAC covers the segments as sent, so this admits no forgery.)
//! - [`MacKey`] is an HMAC key processed once at configuration time; signing and
//!   verifying clone it (cheap) instead of re-deriving the key per request. Verification
//!   uses `verify_slice`, a constant-time comparison that also refuses wrong lengths.
//! - Secrets never appear in `Debug` output.

use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, Visitor};
use serde_json::{Map, Value};
use sha2::{Sha256, Sha384, Sha512};

/// The HMAC algorithms of RFC 7518 section 3.2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
pub enum Alg {
    HS256,
    HS384,
    HS512,
}

impl Alg {
    /// The JOSE name.
    pub fn name(self) -> &'static str {
        match self {
            Alg::HS256 => "HS256",
            Alg::HS384 => "HS384",
            Alg::HS512 => "HS512",
        }
    }

    pub fn from_name(name: &str) -> Option<Alg> {
        match name {
            "HS256" => Some(Alg::HS256),
            "HS384" => Some(Alg::HS384),
            "HS512" => Some(Alg::HS512),
            _ => None,
        }
    }

    /// Minimum key length in bytes: the hash output size (RFC 7518 section 3.2).
    pub fn min_key_len(self) -> usize {
        match self {
            Alg::HS256 => 32,
            Alg::HS384 => 48,
            Alg::HS512 => 64,
        }
    }
}

/// A keyed HMAC, ready to clone per use. Its `Debug` never shows key material.
#[derive(Clone)]
pub enum MacKey {
    S256(Hmac<Sha256>),
    S384(Hmac<Sha384>),
    S512(Hmac<Sha512>),
}

impl fmt::Debug for MacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacKey({}, <redacted>)", self.alg().name())
    }
}

impl MacKey {
    /// Keys an HMAC. HMAC takes keys of any length, so `None` is not expected; minimum
    /// lengths are a configuration rule checked by the caller.
    pub fn new(alg: Alg, secret: &[u8]) -> Option<MacKey> {
        Some(match alg {
            Alg::HS256 => MacKey::S256(Hmac::<Sha256>::new_from_slice(secret).ok()?),
            Alg::HS384 => MacKey::S384(Hmac::<Sha384>::new_from_slice(secret).ok()?),
            Alg::HS512 => MacKey::S512(Hmac::<Sha512>::new_from_slice(secret).ok()?),
        })
    }

    pub fn alg(&self) -> Alg {
        match self {
            MacKey::S256(_) => Alg::HS256,
            MacKey::S384(_) => Alg::HS384,
            MacKey::S512(_) => Alg::HS512,
        }
    }

    /// Constant-time check of `signature` over `input`.
    pub fn verify(&self, input: &[u8], signature: &[u8]) -> bool {
        match self {
            MacKey::S256(m) => m.clone().chain_update(input).verify_slice(signature).is_ok(),
            MacKey::S384(m) => m.clone().chain_update(input).verify_slice(signature).is_ok(),
            MacKey::S512(m) => m.clone().chain_update(input).verify_slice(signature).is_ok(),
        }
    }

    /// The MAC of `input`.
    pub fn sign(&self, input: &[u8]) -> Vec<u8> {
        match self {
            MacKey::S256(m) => m.clone().chain_update(input).finalize().into_bytes().to_vec(),
            MacKey::S384(m) => m.clone().chain_update(input).finalize().into_bytes().to_vec(),
            MacKey::S512(m) => m.clone().chain_update(input).finalize().into_bytes().to_vec(),
        }
    }
}

/// A JSON object with no repeated member name.
#[derive(Debug)]
pub struct Object(pub Map<String, Value>);

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Object, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Object;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Object, A::Error> {
                let mut map = Map::new();
                while let Some(k) = a.next_key::<String>()? {
                    if map.contains_key(&k) {
                        return Err(A::Error::custom("duplicate member"));
                    }
                    let v: Value = a.next_value()?;
                    map.insert(k, v);
                }
                Ok(Object(map))
            }
        }
        d.deserialize_map(V)
    }
}

/// A compact JWS split and decoded, signature not yet checked.
#[derive(Debug)]
pub struct Parts<'a> {
    pub header: Map<String, Value>,
    pub payload: Map<String, Value>,
    /// `b64(header).b64(payload)`: the bytes the MAC covers.
    pub signing_input: &'a [u8],
    pub signature: Vec<u8>,
}

/// base64url, no padding accepted or produced, trailing bits ignored on decode.
const B64: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, NO_PAD.with_decode_allow_trailing_bits(true));

/// Decodes one base64url segment.
pub fn b64_decode(segment: &[u8]) -> Option<Vec<u8>> {
    B64.decode(segment).ok()
}

pub fn b64_encode(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// Splits and decodes a compact JWS. `None` means malformed.
pub fn split(token: &[u8]) -> Option<Parts<'_>> {
    let mut dots = token.iter().enumerate().filter(|(_, b)| **b == b'.').map(|(i, _)| i);
    let first = dots.next()?;
    let second = dots.next()?;
    if dots.next().is_some() {
        return None;
    }
    let header = b64_decode(token.get(..first)?)?;
    let payload = b64_decode(token.get(first + 1..second)?)?;
    let signature = b64_decode(token.get(second + 1..)?)?;
    let header: Object = serde_json::from_slice(&header).ok()?;
    let payload: Object = serde_json::from_slice(&payload).ok()?;
    Some(Parts { header: header.0, payload: payload.0, signing_input: token.get(..second)?, signature })
}

/// Signs `header` and `payload` (already serialized JSON) into a compact JWS.
pub fn sign(key: &MacKey, header: &[u8], payload: &[u8]) -> String {
    let mut out = b64_encode(header);
    out.push('.');
    out.push_str(&b64_encode(payload));
    let mac = key.sign(out.as_bytes());
    out.push('.');
    out.push_str(&b64_encode(&mac));
    out
}

/// Reads a JSON number as `f64` (NumericDate may carry fractions).
pub fn numeric(v: &Value) -> Option<f64> {
    v.as_f64().filter(|f| f.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_strict() {
        let key = MacKey::new(Alg::HS256, &[7u8; 32]).unwrap();
        let t = sign(&key, br#"{"alg":"HS256"}"#, br#"{"a":1}"#);
        let p = split(t.as_bytes()).unwrap();
        assert!(key.verify(p.signing_input, &p.signature));
        assert_eq!(p.payload["a"], 1);
        // padding, bad alphabet, extra or missing segments
        assert!(split(format!("{t}=").as_bytes()).is_none());
        assert!(split(t.replace('.', ".+").as_bytes()).is_none());
        assert!(split(format!("{t}.").as_bytes()).is_none());
        assert!(split(b"a.b").is_none());
        assert!(split(b"").is_none());
        // trailing bits of a final group are ignored; impossible lengths are not
        let one = b64_encode(b"{}"); // 2 bytes -> 3 chars with 2 trailing bits
        let mut odd = one.clone().into_bytes();
        odd[2] = b'1';
        assert_eq!(b64_decode(&odd), Some(b"{}".to_vec()));
        assert!(b64_decode(b"abcde").is_none());
        assert!(b64_decode(b"ab=").is_none());
        assert!(b64_decode(b"a b").is_none());
        // duplicate members
        let dup = format!("{}.{}.", b64_encode(br#"{"alg":"HS256"}"#), b64_encode(br#"{"sid":"a","sid":"b"}"#));
        assert!(split(dup.as_bytes()).is_none());
        // not objects
        let arr = format!("{}.{}.", b64_encode(b"[]"), b64_encode(b"{}"));
        assert!(split(arr.as_bytes()).is_none());
    }

    #[test]
    fn debug_redacts() {
        let key = MacKey::new(Alg::HS384, b"super-secret-super-secret-super-secret-1234567").unwrap();
        let s = format!("{key:?}");
        assert!(!s.contains("super"));
        assert!(s.contains("HS384"));
    }

    #[test]
    fn verify_refuses_truncated_and_empty() {
        let key = MacKey::new(Alg::HS512, &[1u8; 64]).unwrap();
        let mac = key.sign(b"x");
        assert!(key.verify(b"x", &mac));
        assert!(!key.verify(b"x", &mac[..mac.len() - 1]));
        assert!(!key.verify(b"x", &[]));
        assert!(!key.verify(b"y", &mac));
    }
}
