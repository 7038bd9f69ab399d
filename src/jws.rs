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
use std::borrow::Cow;

use serde::de::{Deserialize, DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
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

/// A JSON member value, as far as token and ticket checks care.
#[derive(Clone, Debug, PartialEq)]
pub enum Claim<'a> {
    /// Any JSON number.
    Num(f64),
    Str(Cow<'a, str>),
    /// An array; its string elements (others are dropped, and `all_strings` is false).
    Arr {
        strings: Vec<Cow<'a, str>>,
        all_strings: bool,
    },
    /// `null`, a boolean or an object.
    Other,
}

impl Claim<'_> {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Claim::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A finite number.
    pub fn as_num(&self) -> Option<f64> {
        match self {
            Claim::Num(n) if n.is_finite() => Some(*n),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Claim<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Claim<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Claim<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Claim<'de>, E> {
                Ok(Claim::Num(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Claim<'de>, E> {
                Ok(Claim::Num(v as f64))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Claim<'de>, E> {
                Ok(Claim::Num(v))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Claim<'de>, E> {
                Ok(Claim::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Claim<'de>, E> {
                Ok(Claim::Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Claim<'de>, E> {
                Ok(Claim::Str(Cow::Owned(v)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Claim<'de>, E> {
                Ok(Claim::Other)
            }
            fn visit_unit<E>(self) -> Result<Claim<'de>, E> {
                Ok(Claim::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Claim<'de>, A::Error> {
                let mut strings = Vec::new();
                let mut all_strings = true;
                while let Some(c) = a.next_element::<Claim<'de>>()? {
                    match c {
                        Claim::Str(s) => strings.push(s),
                        _ => all_strings = false,
                    }
                }
                Ok(Claim::Arr { strings, all_strings })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Claim<'de>, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Claim::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads the members `names` of a JSON object, skipping the others without building
/// them. `None` when `json` is not one JSON object, is not UTF-8 (anywhere: serde_json
/// skips an unread member's string without checking it) or repeats a member name (any
/// name: `{"sid":"a","sid":"b"}` is refused, not read as either).
pub fn members<'a, const N: usize>(json: &'a [u8], names: [&str; N]) -> Option<[Option<Claim<'a>>; N]> {
    struct Seed<'n, const N: usize> {
        names: [&'n str; N],
    }
    impl<'de, const N: usize> DeserializeSeed<'de> for Seed<'_, N> {
        type Value = [Option<Claim<'de>>; N];
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de, const N: usize> Visitor<'de> for Seed<'_, N> {
        type Value = [Option<Claim<'de>>; N];
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            let mut out: [Option<Claim<'de>>; N] = std::array::from_fn(|_| None);
            let mut seen: Vec<Cow<'de, str>> = Vec::with_capacity(8);
            while let Some(key) = a.next_key::<Cow<'de, str>>()? {
                if seen.contains(&key) {
                    return Err(A::Error::custom("duplicate member"));
                }
                match self.names.iter().position(|n| *n == key) {
                    Some(i) => out[i] = Some(a.next_value::<Claim<'de>>()?),
                    None => {
                        a.next_value::<IgnoredAny>()?;
                    }
                }
                seen.push(key);
            }
            Ok(out)
        }
    }
    std::str::from_utf8(json).ok()?;
    let mut de = serde_json::Deserializer::from_slice(json);
    let out = Seed { names }.deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(out)
}

/// A compact JWS split and base64-decoded, nothing checked beyond the encoding.
#[derive(Debug)]
pub struct Parts<'a> {
    /// Decoded header JSON.
    pub header: Vec<u8>,
    /// Decoded payload JSON.
    pub payload: Vec<u8>,
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

/// Splits a compact JWS into its three decoded segments. `None` means malformed.
pub fn split(token: &[u8]) -> Option<Parts<'_>> {
    let first = token.iter().position(|b| *b == b'.')?;
    let rest = token.get(first + 1..)?;
    let second = first + 1 + rest.iter().position(|b| *b == b'.')?;
    let tail = token.get(second + 1..)?;
    if tail.contains(&b'.') {
        return None;
    }
    Some(Parts {
        header: b64_decode(token.get(..first)?)?,
        payload: b64_decode(token.get(first + 1..second)?)?,
        signing_input: token.get(..second)?,
        signature: b64_decode(tail)?,
    })
}

/// Appends `s` to `out` as a JSON string literal (quotes and escapes included).
pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let b = c as u32 as usize;
                out.push_str("\\u00");
                out.push(HEX[b >> 4] as char);
                out.push(HEX[b & 15] as char);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Writes a small JSON object of string and integer members, in the given order.
pub fn json_object(members: &[(&str, JsonValue<'_>)]) -> String {
    let mut out = String::with_capacity(64);
    out.push('{');
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(&mut out, k);
        out.push(':');
        match v {
            JsonValue::Str(s) => push_json_str(&mut out, s),
            JsonValue::Int(n) => out.push_str(&n.to_string()),
        }
    }
    out.push('}');
    out
}

/// A member value for [`json_object`].
#[derive(Clone, Copy, Debug)]
pub enum JsonValue<'a> {
    Str(&'a str),
    Int(i64),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_strict() {
        let key = MacKey::new(Alg::HS256, &[7u8; 32]).unwrap();
        let t = sign(&key, br#"{"alg":"HS256"}"#, br#"{"a":1}"#);
        let p = split(t.as_bytes()).unwrap();
        assert!(key.verify(p.signing_input, &p.signature));
        assert_eq!(members(&p.payload, ["a"]).unwrap(), [Some(Claim::Num(1.0))]);
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
    }

    #[test]
    fn members_reads_only_what_is_asked() {
        let json =
            br#"{"sid":"a\u00e9","exp":1.5e9,"aud":["x",2,"y"],"big":{"deep":[1,[2,{"a":null}]]},"n":null,"t":true}"#;
        let [sid, exp, aud, n, t, missing] = members(json, ["sid", "exp", "aud", "n", "t", "zz"]).unwrap();
        assert_eq!(sid.unwrap().as_str(), Some("a\u{e9}"));
        assert_eq!(exp.unwrap().as_num(), Some(1.5e9));
        assert_eq!(aud, Some(Claim::Arr { strings: vec!["x".into(), "y".into()], all_strings: false }));
        assert_eq!(n, Some(Claim::Other));
        assert_eq!(t, Some(Claim::Other));
        assert_eq!(missing, None);
        // duplicates of any member, non-objects, trailing garbage, bad JSON
        assert!(members(br#"{"sid":"a","sid":"b"}"#, ["sid"]).is_none());
        assert!(members(br#"{"x":1,"x":2}"#, ["sid"]).is_none());
        assert!(members(b"[]", ["sid"]).is_none());
        assert!(members(b"{} {}", ["sid"]).is_none());
        assert!(members(b"{\"a\":}", ["sid"]).is_none());
        assert!(members(b"", ["sid"]).is_none());
        assert!(members("{\"a\":\"\u{ff}\"}".as_bytes(), ["a"]).is_some());
        assert!(members(b"{\"a\":\"\xff\"}", ["a"]).is_none(), "invalid UTF-8 is not JSON");
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(5000), "]".repeat(5000));
        assert!(members(deep.as_bytes(), ["a"]).is_none(), "recursion limit, not a stack overflow");
    }

    #[test]
    fn json_writing_round_trips() {
        let nasty = "a\"b\\c\n\u{1}é会";
        let json =
            json_object(&[("sid", JsonValue::Str(nasty)), ("exp", JsonValue::Int(-5)), ("k\"", JsonValue::Int(7))]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["sid"], nasty);
        assert_eq!(v["exp"], -5);
        assert_eq!(v["k\""], 7);
        assert_eq!(json_object(&[]), "{}");
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
