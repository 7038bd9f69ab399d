//! Benchmark baseline filters for `make bench` (see `docs/benchmarks.md`).
//!
//! Arm B of the per-request benchmark is the floor of any Rust proxy-wasm filter: it
//! reads one request header and sets one. Nothing else happens in the VM, so the
//! difference between arm A (no filter) and arm B is the price of the wasm ABI itself
//! (VM entry per callback, context creation, two host calls).
//!
//! The plugin configuration picks a variant, so the analysis can split session-affinity's
//! cost into "host calls" and "logic inside the VM":
//!
//! - `noop` (default, arm B): `get header` + `replace header`.
//! - `hostcalls|<override>|<session>` (arm B8): exactly the host calls session-affinity
//!   makes on a sticky request (read `src/filter/mod.rs`), with the values it would set:
//!   request path `get_header_map_pairs`, `get_current_time`, three `replace_header`
//!   (`x-gateway-destination-endpoint: <override>`, `x-session-id: <session>`,
//!   `x-session-affinity: sticky`); response path `get_property upstream.address`,
//!   `get_header :status` (the request's time is reused). The returned buffers are taken and dropped;
//!   no parsing, hashing or HMAC. Behind an `override_host` cluster, Envoy then routes
//!   exactly as it does for session-affinity.
//! - `repeat|<call>|<n>`: `noop`, plus one kind of host call made `n` times per request,
//!   so the price of a single call stands out of the noise: `pairs` (the whole request
//!   header map), `get` (one request header), `replace` (set a request header), `time`
//!   (current time), all on request headers; `property` (`upstream.address`) on response
//!   headers.
//!
//! The glue is compiled only for wasm32, so `cargo test --workspace` builds this crate
//! natively as an empty library.

#[cfg(target_arch = "wasm32")]
mod filter;

/// The variants, by their plugin-configuration spelling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Variant {
    Noop,
    /// The header values to set: the override list and the session id.
    HostCalls {
        override_value: String,
        session: String,
    },
    /// `noop` plus `n` calls of one kind.
    Repeat {
        call: Call,
        n: u32,
    },
}

/// The host calls `repeat` can make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Pairs,
    Get,
    Replace,
    Time,
    Property,
}

impl Call {
    pub fn parse(s: &str) -> Option<Call> {
        Some(match s {
            "pairs" => Call::Pairs,
            "get" => Call::Get,
            "replace" => Call::Replace,
            "time" => Call::Time,
            "property" => Call::Property,
            _ => return None,
        })
    }
}

impl Variant {
    /// Parses the plugin configuration (surrounding whitespace and quotes ignored); an
    /// empty configuration is `noop`.
    pub fn parse(config: &[u8]) -> Option<Variant> {
        let s = std::str::from_utf8(config).ok()?.trim().trim_matches('"');
        let mut parts = s.split('|');
        match parts.next()? {
            "" | "noop" if parts.next().is_none() => Some(Variant::Noop),
            "hostcalls" => {
                let override_value = parts.next().unwrap_or("127.0.0.1:1").to_string();
                let session = parts.next().unwrap_or("bench-session").to_string();
                Some(Variant::HostCalls { override_value, session })
            }
            "repeat" => {
                let call = Call::parse(parts.next()?)?;
                let n = parts.next()?.parse().ok()?;
                Some(Variant::Repeat { call, n })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants() {
        assert_eq!(Variant::parse(b""), Some(Variant::Noop));
        assert_eq!(Variant::parse(b" \"noop\" "), Some(Variant::Noop));
        assert_eq!(
            Variant::parse(b"hostcalls|10.0.0.1:80,10.0.0.2:80|s1"),
            Some(Variant::HostCalls { override_value: "10.0.0.1:80,10.0.0.2:80".into(), session: "s1".into() })
        );
        assert!(matches!(Variant::parse(b"hostcalls"), Some(Variant::HostCalls { .. })));
        assert_eq!(Variant::parse(b"other"), None);
        assert_eq!(Variant::parse(b"noop|x"), None);
        assert_eq!(Variant::parse(b"repeat|pairs|16"), Some(Variant::Repeat { call: Call::Pairs, n: 16 }));
        assert_eq!(Variant::parse(b"repeat|pairs"), None);
        assert_eq!(Variant::parse(b"repeat|nope|3"), None);
    }
}
