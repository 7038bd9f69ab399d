//! Plugin configuration (DESIGN section 6, a public contract), in two phases.
//!
//! 1. [`RawConfig`]: serde structs with `deny_unknown_fields` and enums for fixed value
//!    sets, so a misspelt key or value is an error that names its path
//!    (`token.keys[1].alg: unknown variant ...`).
//! 2. [`Config::parse`]: checks every rule serde cannot express and does the expensive
//!    work once: decodes secrets, keys the HMACs, hashes the static hosts.
//!
//! Any error is a [`ConfigError`] whose `Display` is one line naming the field; it never
//! contains a secret. The filter logs it and fails `on_configure`, so Envoy refuses the
//! configuration.

use std::fmt;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde::Deserialize;

use crate::hosts::{self, HostSet, HostSpec};
use crate::jws::{Alg, MacKey};
use crate::ticket::Tickets;
use crate::token::{Key, Validator};

/// A configuration error: the field (dotted path) and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    /// One line, always: control characters that came from the document (a key or an
    /// enum value with an escaped newline) are shown escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !(self.field.is_empty() || self.field == ".") {
            write_one_line(f, &self.field)?;
            f.write_str(": ")?;
        }
        write_one_line(f, &self.message)
    }
}

fn write_one_line(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    for c in s.chars() {
        if c.is_control() {
            write!(f, "{}", c.escape_default())?;
        } else {
            fmt::Write::write_char(f, c)?;
        }
    }
    Ok(())
}

/// Removes the string values serde quotes in its messages (`invalid type: string "…",
/// expected struct RawKey`): the value may be a secret put in the wrong place, and
/// errors are logged.
fn redact_strings(msg: &str) -> String {
    const MARK: &str = "string \"";
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find(MARK) {
        out.push_str(&rest[..i + "string".len()]);
        // Skip the quoted value (Debug-escaped: `\"` and `\\` inside).
        let body = &rest[i + MARK.len()..];
        let mut end = body.len();
        let mut escaped = false;
        for (j, c) in body.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    end = j + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = body.get(end..).unwrap_or_default();
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------
// Phase 1: the raw shape.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub token: RawToken,
    #[serde(default)]
    pub on_missing: Option<Action>,
    #[serde(default)]
    pub on_invalid: Option<Action>,
    #[serde(default)]
    pub mint: Option<RawMint>,
    #[serde(default)]
    pub ticket: Option<RawTicket>,
    #[serde(default)]
    pub mode: Option<Mode>,
    pub upstream: RawUpstream,
    #[serde(default)]
    pub placement: Option<RawPlacement>,
    #[serde(default)]
    pub metrics: Option<RawMetrics>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlacement {
    #[serde(default)]
    pub balance_factor: Option<u32>,
    #[serde(default)]
    pub saturation: Option<RawSaturation>,
    #[serde(default)]
    pub drain: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSaturation {
    #[serde(default)]
    pub metric: Option<String>,
    #[serde(default)]
    pub threshold: Option<f64>,
    #[serde(default)]
    pub stale_ms: Option<u32>,
    #[serde(default)]
    pub spill: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawToken {
    #[serde(default)]
    pub sources: Option<Vec<RawSource>>,
    pub keys: Vec<RawKey>,
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default)]
    pub session_claim: Option<String>,
    #[serde(default)]
    pub leeway_seconds: Option<u32>,
    #[serde(default)]
    pub require_exp: Option<bool>,
    #[serde(default)]
    pub max_token_bytes: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub cookie: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub unsigned: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    #[serde(default)]
    pub kid: Option<String>,
    pub alg: Alg,
    #[serde(default)]
    pub secret_base64: Option<String>,
    #[serde(default)]
    pub secret_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMint {
    #[serde(default)]
    pub ttl_seconds: Option<u32>,
    #[serde(default)]
    pub cookie: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTicket {
    #[serde(default)]
    pub secret_base64: Option<String>,
    #[serde(default)]
    pub secret_env: Option<String>,
    #[serde(default)]
    pub cookie: Option<String>,
    #[serde(default)]
    pub ttl_seconds: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    #[serde(default)]
    pub override_header: Option<String>,
    #[serde(default)]
    pub fallbacks: Option<u32>,
    #[serde(default)]
    pub hosts: Option<Vec<RawHost>>,
    #[serde(default)]
    pub discovery: Option<RawDiscovery>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHost {
    pub address: String,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscovery {
    pub admin_cluster: String,
    pub cluster: String,
    #[serde(default)]
    pub refresh_ms: Option<u32>,
    #[serde(default)]
    pub timeout_ms: Option<u32>,
    #[serde(default)]
    pub startup_wait_ms: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    #[serde(default)]
    pub flush_ms: Option<u32>,
}

/// What to do with a request whose token is missing or invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Start a new session: a fresh id and a token signed with the first key.
    Mint,
    /// Local reply 401.
    Reject,
    /// Forward without affinity; Envoy's fallback policy places the request.
    Pass,
    /// The session id `addr:<client IP>` (DESIGN section 3a): IP-hash stickiness for
    /// clients without tokens. `on_missing` only: an invalid token is never downgraded.
    #[serde(rename = "client_address")]
    ClientAddress,
}

/// How the ticket's node is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The ticket's node while it is healthy; otherwise the ranking.
    Pinned,
    /// Always the ranking; the ticket only detects moves.
    Rendezvous,
}

// ---------------------------------------------------------------------------------------
// Phase 2: the checked configuration.

/// Where a session token (or, `unsigned`, a session id itself) may be found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A request header (lowercase name), optionally after a case-insensitive prefix
    /// such as `Bearer `.
    Header { name: String, prefix: Option<String>, unsigned: bool },
    /// A cookie.
    Cookie { name: String, unsigned: bool },
}

impl Source {
    /// True when the source carries the session id itself, not a signed token (DESIGN
    /// section 3a): for trusted callers only.
    pub fn unsigned(&self) -> bool {
        match self {
            Source::Header { unsigned, .. } | Source::Cookie { unsigned, .. } => *unsigned,
        }
    }
}

/// Live host discovery through Envoy's admin API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovery {
    pub admin_cluster: String,
    pub cluster: String,
    pub refresh_ms: u32,
    pub timeout_ms: u32,
    /// How long a request that arrives before the first host set is held (0: never).
    pub startup_wait_ms: u32,
}

/// Where the healthy host set comes from.
#[derive(Clone, Debug)]
pub enum Hosts {
    Static(HostSet),
    Discovery(Discovery),
}

/// Ticket settings.
#[derive(Clone, Debug)]
pub struct TicketConfig {
    pub tickets: Tickets,
    pub cookie: String,
}

/// The checked configuration. Built once per `on_configure`, read by every request.
#[derive(Clone, Debug)]
pub struct Config {
    pub sources: Vec<Source>,
    pub validator: Validator,
    pub on_missing: Action,
    pub on_invalid: Action,
    pub mint_ttl_seconds: i64,
    pub mint_cookie: String,
    pub ticket: Option<TicketConfig>,
    pub mode: Mode,
    pub override_header: String,
    pub fallbacks: usize,
    pub hosts: Hosts,
    /// Placement under load (DESIGN section 10); `None`: placement by the ranking alone.
    pub placement: Option<Placement>,
    /// Counters are accumulated in VM memory and flushed this often (0: every request).
    pub metrics_flush_ms: u32,
}

/// Placement under load (DESIGN section 10).
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    /// Bounded loads: `c` in `load + 1 ≤ ⌈c/100 × (L + 1) × w / W⌉` (101–1000).
    pub balance_factor: Option<u32>,
    pub saturation: Option<Saturation>,
    /// Draining hosts keep their pinned sessions and take no new ones.
    pub drain: bool,
}

/// Saturation from the nodes' own ORCA load reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Saturation {
    /// The named metric (`named_metrics.<metric>` of the report).
    pub metric: String,
    /// Saturated while the last report is at least this.
    pub threshold: f64,
    /// A report older than this no longer counts.
    pub stale_ms: u64,
    /// Pinned sessions leave a saturated node.
    pub spill: bool,
}

pub const DEFAULT_OVERRIDE_HEADER: &str = "x-gateway-destination-endpoint";
pub const DEFAULT_MINT_COOKIE: &str = "session_token";
pub const DEFAULT_TICKET_COOKIE: &str = "sa_ticket";
pub const DEFAULT_TTL_SECONDS: u32 = 86_400;
pub const DEFAULT_LEEWAY_SECONDS: u32 = 30;
pub const DEFAULT_MAX_TOKEN_BYTES: u32 = 4096;
pub const DEFAULT_FALLBACKS: u32 = 2;
pub const MAX_FALLBACKS: u32 = 16;
pub const DEFAULT_REFRESH_MS: u32 = 1000;
pub const DEFAULT_TIMEOUT_MS: u32 = 500;
pub const DEFAULT_STARTUP_WAIT_MS: u32 = 2000;
pub const MAX_STARTUP_WAIT_MS: u32 = 60_000;
pub const DEFAULT_FLUSH_MS: u32 = 250;
/// Headers the filter sets upstream; a client's copies are always removed.
pub const SESSION_ID_HEADER: &str = "x-session-id";
pub const AFFINITY_HEADER: &str = "x-session-affinity";
pub const PREVIOUS_NODE_HEADER: &str = "x-session-previous-node";
/// Request and response header that carries a ticket for clients without cookies.
pub const TICKET_HEADER: &str = "x-session-ticket";
/// Response header that carries a minted token.
pub const TOKEN_HEADER: &str = "x-session-token";

/// Reads an environment variable; the filter passes `std::env::var`, tests a map.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Config {
    /// Parses and checks a plugin configuration (JSON bytes).
    pub fn parse(bytes: &[u8], env: EnvLookup<'_>) -> Result<Config, ConfigError> {
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            None => return Err(ConfigError::new("", "configuration is empty: a JSON object is required")),
            Some(b'{') => {}
            Some(_) => return Err(ConfigError::new("", "configuration must be a JSON object")),
        }
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| {
            // serde_json reports where it failed (line and column), not which field: map
            // the position back to the path of keys and indices that leads there.
            let msg = e.to_string();
            let msg = match msg.rfind(" at line ") {
                Some(i) => msg[..i].to_string(),
                None => msg,
            };
            ConfigError::new(json_path_at(bytes, e.line(), e.column()), redact_strings(&msg))
        })?;
        Config::try_from_raw(raw, env)
    }

    /// Phase 2: every check serde cannot express, and the one-time preparation.
    pub fn try_from_raw(raw: RawConfig, env: EnvLookup<'_>) -> Result<Config, ConfigError> {
        let t = raw.token;

        let sources = match t.sources {
            None => vec![
                Source::Header { name: "x-session-token".into(), prefix: None, unsigned: false },
                Source::Cookie { name: DEFAULT_MINT_COOKIE.into(), unsigned: false },
            ],
            Some(list) => {
                if list.is_empty() {
                    return Err(ConfigError::new("token.sources", "must list at least one source"));
                }
                let mut out = Vec::with_capacity(list.len());
                for (i, s) in list.into_iter().enumerate() {
                    let field = format!("token.sources[{i}]");
                    let unsigned = s.unsigned.unwrap_or(false);
                    out.push(match (s.header, s.cookie, s.prefix) {
                        (Some(h), None, prefix) => {
                            let name = header_name(&h).ok_or_else(|| {
                                ConfigError::new(format!("{field}.header"), "not a valid HTTP header name")
                            })?;
                            if let Some(p) = &prefix {
                                if p.is_empty() || !p.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                                    return Err(ConfigError::new(
                                        format!("{field}.prefix"),
                                        "must be non-empty printable ASCII",
                                    ));
                                }
                            }
                            Source::Header { name, prefix, unsigned }
                        }
                        (None, Some(c), None) => {
                            if !is_token(&c) {
                                return Err(ConfigError::new(format!("{field}.cookie"), "not a valid cookie name"));
                            }
                            Source::Cookie { name: c, unsigned }
                        }
                        (None, Some(_), Some(_)) => {
                            return Err(ConfigError::new(
                                format!("{field}.prefix"),
                                "only header sources take a prefix",
                            ))
                        }
                        _ => {
                            return Err(ConfigError::new(field, "set exactly one of `header` or `cookie`"));
                        }
                    });
                }
                out
            }
        };

        if t.keys.is_empty() {
            return Err(ConfigError::new("token.keys", "must list at least one key"));
        }
        let mut keys: Vec<Key> = Vec::with_capacity(t.keys.len());
        for (i, k) in t.keys.into_iter().enumerate() {
            let field = format!("token.keys[{i}]");
            if let Some(kid) = &k.kid {
                if kid.is_empty() {
                    return Err(ConfigError::new(format!("{field}.kid"), "must not be empty"));
                }
                if keys.iter().any(|other| other.kid.as_deref() == Some(kid.as_str())) {
                    return Err(ConfigError::new(format!("{field}.kid"), format!("duplicate kid {kid:?}")));
                }
            }
            let secret = secret(&field, k.secret_base64.as_deref(), k.secret_env.as_deref(), env)?;
            if secret.len() < k.alg.min_key_len() {
                return Err(ConfigError::new(
                    secret_field(&field, k.secret_env.is_some()),
                    format!("key is {} bytes; {} needs at least {}", secret.len(), k.alg.name(), k.alg.min_key_len()),
                ));
            }
            let mac = MacKey::new(k.alg, &secret)
                .ok_or_else(|| ConfigError::new(format!("{field}.alg"), "cannot key the HMAC"))?;
            keys.push(Key { kid: k.kid, mac });
        }

        let non_empty = |v: Option<String>, field: &str| -> Result<Option<String>, ConfigError> {
            match v {
                Some(s) if s.is_empty() => Err(ConfigError::new(field, "must not be empty (omit it instead)")),
                other => Ok(other),
            }
        };
        let session_claim = non_empty(t.session_claim, "token.session_claim")?.unwrap_or_else(|| "sid".into());
        let max_token_bytes = t.max_token_bytes.unwrap_or(DEFAULT_MAX_TOKEN_BYTES);
        if max_token_bytes == 0 {
            return Err(ConfigError::new("token.max_token_bytes", "must be at least 1"));
        }
        let validator = Validator {
            keys,
            issuer: non_empty(t.issuer, "token.issuer")?,
            audience: non_empty(t.audience, "token.audience")?,
            session_claim,
            leeway_seconds: i64::from(t.leeway_seconds.unwrap_or(DEFAULT_LEEWAY_SECONDS)),
            require_exp: t.require_exp.unwrap_or(true),
            max_token_bytes: max_token_bytes as usize,
        };

        let (mint_ttl, mint_cookie) = match raw.mint {
            None => (DEFAULT_TTL_SECONDS, DEFAULT_MINT_COOKIE.to_string()),
            Some(m) => {
                let ttl = m.ttl_seconds.unwrap_or(DEFAULT_TTL_SECONDS);
                if ttl == 0 {
                    return Err(ConfigError::new("mint.ttl_seconds", "must be at least 1"));
                }
                let cookie = m.cookie.unwrap_or_else(|| DEFAULT_MINT_COOKIE.into());
                if !is_token(&cookie) {
                    return Err(ConfigError::new("mint.cookie", "not a valid cookie name"));
                }
                (ttl, cookie)
            }
        };

        let ticket = match raw.ticket {
            None => None,
            Some(tk) => {
                let secret = secret("ticket", tk.secret_base64.as_deref(), tk.secret_env.as_deref(), env)?;
                if secret.len() < Alg::HS256.min_key_len() {
                    return Err(ConfigError::new(
                        secret_field("ticket", tk.secret_env.is_some()),
                        format!("ticket secret is {} bytes; HS256 needs at least 32", secret.len()),
                    ));
                }
                let ttl = tk.ttl_seconds.unwrap_or(DEFAULT_TTL_SECONDS);
                if ttl == 0 {
                    return Err(ConfigError::new("ticket.ttl_seconds", "must be at least 1"));
                }
                let cookie = tk.cookie.unwrap_or_else(|| DEFAULT_TICKET_COOKIE.into());
                if !is_token(&cookie) {
                    return Err(ConfigError::new("ticket.cookie", "not a valid cookie name"));
                }
                let mac = MacKey::new(Alg::HS256, &secret)
                    .ok_or_else(|| ConfigError::new("ticket", "cannot key the HMAC"))?;
                Some(TicketConfig { tickets: Tickets { mac, ttl_seconds: i64::from(ttl) }, cookie })
            }
        };

        let u = raw.upstream;
        let override_header = match u.override_header {
            None => DEFAULT_OVERRIDE_HEADER.to_string(),
            Some(h) => header_name(&h)
                .filter(|n| !n.starts_with(':'))
                .ok_or_else(|| ConfigError::new("upstream.override_header", "not a valid HTTP header name"))?,
        };
        for reserved in [SESSION_ID_HEADER, AFFINITY_HEADER, PREVIOUS_NODE_HEADER, TICKET_HEADER, TOKEN_HEADER] {
            if override_header == reserved {
                return Err(ConfigError::new(
                    "upstream.override_header",
                    format!("{reserved} is reserved by the filter"),
                ));
            }
        }
        let fallbacks = u.fallbacks.unwrap_or(DEFAULT_FALLBACKS);
        if fallbacks > MAX_FALLBACKS {
            return Err(ConfigError::new("upstream.fallbacks", format!("must be at most {MAX_FALLBACKS}")));
        }
        let hosts = match (u.hosts, u.discovery) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new("upstream", "set either `hosts` or `discovery`, not both"))
            }
            (None, None) => return Err(ConfigError::new("upstream", "set one of `hosts` or `discovery`")),
            (Some(list), None) => Hosts::Static(static_hosts(list)?),
            (None, Some(d)) => {
                let refresh_ms = d.refresh_ms.unwrap_or(DEFAULT_REFRESH_MS);
                let timeout_ms = d.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
                if d.admin_cluster.is_empty() {
                    return Err(ConfigError::new("upstream.discovery.admin_cluster", "must not be empty"));
                }
                if d.cluster.is_empty() {
                    return Err(ConfigError::new("upstream.discovery.cluster", "must not be empty"));
                }
                if refresh_ms < 10 {
                    return Err(ConfigError::new("upstream.discovery.refresh_ms", "must be at least 10"));
                }
                if timeout_ms == 0 {
                    return Err(ConfigError::new("upstream.discovery.timeout_ms", "must be at least 1"));
                }
                let startup_wait_ms = d.startup_wait_ms.unwrap_or(DEFAULT_STARTUP_WAIT_MS);
                if startup_wait_ms > MAX_STARTUP_WAIT_MS {
                    return Err(ConfigError::new(
                        "upstream.discovery.startup_wait_ms",
                        format!("must be at most {MAX_STARTUP_WAIT_MS}"),
                    ));
                }
                Hosts::Discovery(Discovery {
                    admin_cluster: d.admin_cluster,
                    cluster: d.cluster,
                    refresh_ms,
                    timeout_ms,
                    startup_wait_ms,
                })
            }
        };

        let mode = raw.mode.unwrap_or(Mode::Pinned);
        let placement = match raw.placement {
            None => None,
            Some(p) => Some(placement(p, mode, ticket.is_some())?),
        };
        let metrics_flush_ms = raw.metrics.and_then(|m| m.flush_ms).unwrap_or(DEFAULT_FLUSH_MS);
        let on_invalid = raw.on_invalid.unwrap_or(Action::Reject);
        if on_invalid == Action::ClientAddress {
            return Err(ConfigError::new(
                "on_invalid",
                "cannot be `client_address`: an invalid token is never downgraded to the client address \
                 (use `reject`, `mint` or `pass`)",
            ));
        }

        Ok(Config {
            sources,
            validator,
            on_missing: raw.on_missing.unwrap_or(Action::Mint),
            on_invalid,
            mint_ttl_seconds: i64::from(mint_ttl),
            mint_cookie,
            ticket,
            mode,
            override_header,
            fallbacks: fallbacks as usize,
            hosts,
            placement,
            metrics_flush_ms,
        })
    }
}

pub const MIN_BALANCE_FACTOR: u32 = 101;
pub const MAX_BALANCE_FACTOR: u32 = 1000;
pub const DEFAULT_SATURATION_METRIC: &str = "kv_cache_usage_perc";
pub const DEFAULT_SATURATION_THRESHOLD: f64 = 0.9;
pub const DEFAULT_STALE_MS: u32 = 5000;

/// Checks `placement` (DESIGN section 10).
fn placement(p: RawPlacement, mode: Mode, has_ticket: bool) -> Result<Placement, ConfigError> {
    // A load-dependent choice without a ticket to remember it would move a session
    // whenever the loads change.
    if mode != Mode::Pinned || !has_ticket {
        return Err(ConfigError::new(
            "placement",
            "needs `mode: \"pinned\"` and a `ticket` (a load-dependent placement must be remembered by the \
             session's ticket, or sessions would move whenever the loads change)",
        ));
    }
    if p.balance_factor.is_none() && p.saturation.is_none() && p.drain.is_none() {
        return Err(ConfigError::new("placement", "set at least one of `balance_factor`, `saturation` or `drain`"));
    }
    if let Some(c) = p.balance_factor {
        if !(MIN_BALANCE_FACTOR..=MAX_BALANCE_FACTOR).contains(&c) {
            return Err(ConfigError::new(
                "placement.balance_factor",
                format!(
                    "must be {MIN_BALANCE_FACTOR}-{MAX_BALANCE_FACTOR} (a percent of the mean load: 150 allows 1.5x)"
                ),
            ));
        }
    }
    let saturation = match p.saturation {
        None => None,
        Some(s) => {
            let metric = s.metric.unwrap_or_else(|| DEFAULT_SATURATION_METRIC.into());
            if metric.is_empty()
                || metric.len() > 128
                || !metric.bytes().all(|b| b.is_ascii_graphic() && b != b',' && b != b'=')
            {
                return Err(ConfigError::new(
                    "placement.saturation.metric",
                    "must be the name of an ORCA named metric (1-128 visible ASCII characters, no `,` or `=`)",
                ));
            }
            let threshold = s.threshold.unwrap_or(DEFAULT_SATURATION_THRESHOLD);
            if !threshold.is_finite() || threshold <= 0.0 {
                return Err(ConfigError::new("placement.saturation.threshold", "must be a number above 0"));
            }
            let stale_ms = s.stale_ms.unwrap_or(DEFAULT_STALE_MS);
            if stale_ms == 0 {
                return Err(ConfigError::new("placement.saturation.stale_ms", "must be at least 1"));
            }
            Some(Saturation { metric, threshold, stale_ms: u64::from(stale_ms), spill: s.spill.unwrap_or(false) })
        }
    };
    Ok(Placement { balance_factor: p.balance_factor, saturation, drain: p.drain.unwrap_or(false) })
}

/// The path (`token.keys[1].alg`) of the JSON value at 1-based `line` and `column` of
/// `text`, as serde_json reports error positions. Only used to word error messages, so it
/// is lenient: a malformed document yields the path as far as it could follow.
pub fn json_path_at(text: &[u8], line: usize, column: usize) -> String {
    enum Frame {
        Object { key: Option<String> },
        Array { index: usize },
    }
    // Byte offset of (line, column).
    let mut offset = 0usize;
    let mut l = 1usize;
    while l < line && offset < text.len() {
        if text[offset] == b'\n' {
            l += 1;
        }
        offset += 1;
    }
    let end = offset.saturating_add(column).min(text.len());

    let mut stack: Vec<Frame> = Vec::new();
    let mut expect_key = false;
    let mut i = 0usize;
    while i < end {
        match text[i] {
            b'{' => {
                stack.push(Frame::Object { key: None });
                expect_key = true;
            }
            b'[' => stack.push(Frame::Array { index: 0 }),
            b'}' | b']' => {
                stack.pop();
                expect_key = false;
            }
            b',' => match stack.last_mut() {
                Some(Frame::Object { key }) => {
                    *key = None;
                    expect_key = true;
                }
                Some(Frame::Array { index }) => *index += 1,
                None => {}
            },
            b':' => expect_key = false,
            b'"' => {
                let start = i + 1;
                let mut j = start;
                while j < text.len() && text[j] != b'"' {
                    j += if text[j] == b'\\' { 2 } else { 1 };
                }
                // A member name is the one string before a `:`; any other string is a
                // value (never put a value, which may be a secret, into the path).
                let colon_follows =
                    text.get(j + 1..).and_then(|t| t.iter().find(|b| !b.is_ascii_whitespace())) == Some(&b':');
                if let (true, true, Some(Frame::Object { key })) = (expect_key, colon_follows, stack.last_mut()) {
                    *key = Some(String::from_utf8_lossy(text.get(start..j).unwrap_or_default()).into_owned());
                }
                expect_key = false;
                i = j + 1;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    let mut path = String::new();
    for frame in &stack {
        match frame {
            Frame::Object { key: Some(k) } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
            }
            Frame::Object { key: None } => {}
            Frame::Array { index } => {
                path.push('[');
                path.push_str(&index.to_string());
                path.push(']');
            }
        }
    }
    path
}

fn static_hosts(list: Vec<RawHost>) -> Result<HostSet, ConfigError> {
    if list.is_empty() {
        return Err(ConfigError::new("upstream.hosts", "must list at least one host"));
    }
    let mut specs = Vec::with_capacity(list.len());
    for (i, h) in list.into_iter().enumerate() {
        let field = format!("upstream.hosts[{i}]");
        let address = hosts::canonical_address(&h.address).ok_or_else(|| {
            ConfigError::new(
                format!("{field}.address"),
                format!("{:?} is not ip:port (IPv6 as [addr]:port)", h.address),
            )
        })?;
        let weight = h.weight.unwrap_or(1);
        if weight < 1 {
            return Err(ConfigError::new(format!("{field}.weight"), "must be at least 1"));
        }
        let key = match h.key {
            Some(k) if k.is_empty() => return Err(ConfigError::new(format!("{field}.key"), "must not be empty")),
            Some(k) => k,
            None => address.clone(),
        };
        if let Some(j) = specs.iter().position(|s: &HostSpec| s.address == address) {
            return Err(ConfigError::new(
                format!("{field}.address"),
                format!("duplicate of upstream.hosts[{j}] ({address})"),
            ));
        }
        if let Some(j) = specs.iter().position(|s: &HostSpec| s.key == key) {
            return Err(ConfigError::new(field, format!("same host key as upstream.hosts[{j}]")));
        }
        specs.push(HostSpec { address, key, weight, draining: false });
    }
    HostSet::new(specs).map_err(|e| ConfigError::new("upstream.hosts", e.to_string()))
}

fn secret_field(field: &str, from_env: bool) -> String {
    if from_env {
        format!("{field}.secret_env")
    } else {
        format!("{field}.secret_base64")
    }
}

/// Reads a secret from exactly one of `secret_base64` or `secret_env` (whose variable
/// holds the secret base64-encoded). Error messages never include the secret.
fn secret(field: &str, b64: Option<&str>, env_name: Option<&str>, env: EnvLookup<'_>) -> Result<Vec<u8>, ConfigError> {
    match (b64, env_name) {
        (Some(_), Some(_)) | (None, None) => {
            Err(ConfigError::new(field, "set exactly one of `secret_base64` or `secret_env`"))
        }
        (Some(b), None) => {
            decode_secret(b).ok_or_else(|| ConfigError::new(format!("{field}.secret_base64"), "not valid base64"))
        }
        (None, Some(name)) => {
            let value = env(name).filter(|v| !v.is_empty()).ok_or_else(|| {
                ConfigError::new(
                    format!("{field}.secret_env"),
                    format!("environment variable {name} is not set in the VM (vm_config.environment_variables)"),
                )
            })?;
            decode_secret(value.trim()).ok_or_else(|| {
                ConfigError::new(
                    format!("{field}.secret_env"),
                    format!("environment variable {name} is not valid base64"),
                )
            })
        }
    }
}

/// Accepts standard or URL-safe base64, with or without padding.
fn decode_secret(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD].iter().find_map(|e| e.decode(s).ok())
}

/// RFC 7230 `token` characters.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A header name, lowercased as Envoy stores it.
fn header_name(s: &str) -> Option<String> {
    if is_token(s) {
        Some(s.to_ascii_lowercase())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K32: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(json: &str) -> Result<Config, ConfigError> {
        Config::parse(json.as_bytes(), &no_env)
    }

    fn minimal(extra_top: &str) -> String {
        format!(
            r#"{{"token":{{"keys":[{{"kid":"k1","alg":"HS256","secret_base64":"{K32}"}}]}},
               "upstream":{{"hosts":[{{"address":"127.0.0.1:8001"}}]}}{extra_top}}}"#
        )
    }

    #[test]
    fn minimal_config_and_defaults() {
        let c = parse(&minimal("")).unwrap();
        assert_eq!(c.on_missing, Action::Mint);
        assert_eq!(c.on_invalid, Action::Reject);
        assert_eq!(c.mode, Mode::Pinned);
        assert_eq!(c.override_header, DEFAULT_OVERRIDE_HEADER);
        assert_eq!(c.fallbacks, 2);
        assert_eq!(c.validator.session_claim, "sid");
        assert_eq!(c.validator.leeway_seconds, 30);
        assert_eq!(c.validator.max_token_bytes, 4096);
        assert!(c.ticket.is_none());
        assert_eq!(c.sources.len(), 2);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: Vec<(String, &str)> = vec![
            (minimal(r#","bogus":1"#), "bogus: unknown field `bogus`"),
            (minimal(r#","ticket":{"secret_base64":"x","cokie":"a"}"#), "ticket.cokie: unknown field `cokie`"),
            (minimal(r#","upstream":{"hosts":[{"address":"1.2.3.4:1"},{"adress":"x"}]}"#), "upstream: duplicate field"),
            (minimal(r#","mode":"sticky""#), "mode: unknown variant `sticky`"),
            (minimal(r#","on_missing":"allow""#), "on_missing: unknown variant"),
            (minimal(r#","ticket":{"secret_base64":"AAAA"}"#), "ticket.secret_base64: ticket secret is 3 bytes"),
            (minimal(r#","ticket":{"cookie":"x"}"#), "ticket: set exactly one"),
            (
                format!(
                    r#"{{"token":{{"keys":[{{"alg":"HS384","secret_base64":"{K32}"}}]}},"upstream":{{"hosts":[{{"address":"1.2.3.4:1"}}]}}}}"#
                ),
                "token.keys[0].secret_base64: key is 32 bytes; HS384 needs at least 48",
            ),
            (
                format!(
                    r#"{{"token":{{"keys":[{{"alg":"HS999","secret_base64":"{K32}"}}]}},"upstream":{{"hosts":[{{"address":"1.2.3.4:1"}}]}}}}"#
                ),
                "token.keys[0].alg: unknown variant `HS999`",
            ),
            (
                r#"{"token":{"keys":[]},"upstream":{"hosts":[{"address":"1.2.3.4:1"}]}}"#.to_string(),
                "token.keys: must list at least one key",
            ),
            (
                r#"{"token":{"keys":[{"alg":"HS256","secret_env":"NOPE"}]},"upstream":{"hosts":[{"address":"1.2.3.4:1"}]}}"#
                    .to_string(),
                "token.keys[0].secret_env: environment variable NOPE is not set",
            ),
            (
                format!(r#"{{"token":{{"keys":[{{"alg":"HS256","secret_base64":"{K32}"}}]}},"upstream":{{}}}}"#),
                "upstream: set one of `hosts` or `discovery`",
            ),
            (
                format!(
                    r#"{{"token":{{"keys":[{{"alg":"HS256","secret_base64":"{K32}"}}]}},"upstream":{{"hosts":[{{"address":"1.2.3.4:1"}}],"discovery":{{"admin_cluster":"a","cluster":"c"}}}}}}"#
                ),
                "upstream: set either `hosts` or `discovery`, not both",
            ),
            (
                format!(
                    r#"{{"token":{{"keys":[{{"alg":"HS256","secret_base64":"{K32}"}}]}},"upstream":{{"hosts":[{{"address":"1.2.3.4:1"}},{{"address":"1.2.3.4:1"}}]}}}}"#
                ),
                "upstream.hosts[1].address: duplicate of upstream.hosts[0]",
            ),
            (
                format!(
                    r#"{{"token":{{"keys":[{{"alg":"HS256","secret_base64":"{K32}"}}]}},"upstream":{{"hosts":[{{"address":"1.2.3.4:1","weight":0}}]}}}}"#
                ),
                "upstream.hosts[0].weight: must be at least 1",
            ),
            (
                format!(
                    r#"{{"token":{{"keys":[{{"alg":"HS256","secret_base64":"{K32}"}}]}},"upstream":{{"hosts":[{{"address":"example.com:80"}}]}}}}"#
                ),
                "upstream.hosts[0].address",
            ),
            (
                format!(
                    r#"{{"token":{{"keys":[{{"alg":"HS256","secret_base64":"{K32}"}}]}},"upstream":{{"hosts":[{{"address":"1.2.3.4:1","weight":-1}}]}}}}"#
                ),
                "upstream.hosts[0].weight: invalid value",
            ),
            (
                format!(
                    r#"{{"token":{{"keys":[{{"alg":"HS256","secret_base64":"{K32}"}}],"sources":[{{"header":"a","cookie":"b"}}]}},"upstream":{{"hosts":[{{"address":"1.2.3.4:1"}}]}}}}"#
                ),
                "token.sources[0]: set exactly one",
            ),
            (
                format!(
                    r#"{{"token":{{"keys":[{{"kid":"a","alg":"HS256","secret_base64":"{K32}"}},{{"kid":"a","alg":"HS256","secret_base64":"{K32}"}}]}},"upstream":{{"hosts":[{{"address":"1.2.3.4:1"}}]}}}}"#
                ),
                "token.keys[1].kid: duplicate kid",
            ),
            (minimal(r#","upstream":1"#), "upstream: duplicate field `upstream`"),
            (minimal(r#","token":{"keys":[{"alg":"HS256","secret_base64":7}]}"#), "token: duplicate field"),
            (
                "{\"token\":{\"keys\":[{\"kid\":\"a\",\n \"alg\":\"HS256\",\"secret_base64\":7}]}}".to_string(),
                "token.keys[0].secret_base64: invalid type: integer `7`, expected a string",
            ),
            (
                r#"{"upstream":{"hosts":[{"address":"1.2.3.4:1"},{"address":"1.2.3.4:2","wieght":2}]},"token":{"keys":[]}}"#.to_string(),
                "upstream.hosts[1].wieght: unknown field `wieght`",
            ),
            (r#"{"token":{"keys":[]},"upstream":{"hosts":[]},"on_missing":"mint""#.to_string(), "EOF while parsing"),
            (String::new(), "configuration is empty"),
            ("[]".to_string(), "configuration must be a JSON object"),
            (r#"{"upstream":{"hosts":[{"address":"1.2.3.4:1"}]}}"#.to_string(), "missing field `token`"),
        ];
        for (json, want) in cases {
            let err = parse(&json).err().unwrap_or_else(|| panic!("accepted: {json}")).to_string();
            assert!(err.contains(want), "got {err:?}, want {want:?}");
            assert!(!err.contains(K32), "secret leaked in {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn secrets_from_env_and_all_base64_spellings() {
        let env = |name: &str| (name == "SA_K").then(|| "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8".to_string());
        let json = r#"{"token":{"keys":[{"alg":"HS256","secret_env":"SA_K"}]},"upstream":{"hosts":[{"address":"1.2.3.4:1"}]}}"#;
        assert!(Config::parse(json.as_bytes(), &env).is_ok());
        assert_eq!(decode_secret("-_-_"), Some(vec![0xfb, 0xff, 0xbf]));
        assert_eq!(decode_secret("+/+/"), Some(vec![0xfb, 0xff, 0xbf]));
    }

    #[test]
    fn discovery_and_sources() {
        let json = format!(
            r#"{{"token":{{"keys":[{{"alg":"HS256","secret_base64":"{K32}"}}],
                "sources":[{{"header":"Authorization","prefix":"Bearer "}},{{"cookie":"st"}}]}},
               "mode":"rendezvous","on_invalid":"pass",
               "upstream":{{"override_header":"X-Dest","fallbacks":0,
                 "discovery":{{"admin_cluster":"admin","cluster":"chat","refresh_ms":200}}}}}}"#
        );
        let c = parse(&json).unwrap();
        assert_eq!(c.override_header, "x-dest");
        assert_eq!(c.fallbacks, 0);
        assert_eq!(c.mode, Mode::Rendezvous);
        assert_eq!(
            c.sources,
            vec![
                Source::Header { name: "authorization".into(), prefix: Some("Bearer ".into()), unsigned: false },
                Source::Cookie { name: "st".into(), unsigned: false }
            ]
        );
        match c.hosts {
            Hosts::Discovery(d) => assert_eq!((d.refresh_ms, d.timeout_ms, d.startup_wait_ms), (200, 500, 2000)),
            Hosts::Static(_) => panic!("expected discovery"),
        }
    }

    #[test]
    fn other_identities() {
        let json = format!(
            r#"{{"token":{{"keys":[{{"alg":"HS256","secret_base64":"{K32}"}}],
                "sources":[{{"header":"X-Conversation-Id","unsigned":true}},{{"cookie":"conv","unsigned":true}},
                           {{"header":"x-session-token","unsigned":false}}]}},
               "on_missing":"client_address",
               "upstream":{{"hosts":[{{"address":"127.0.0.1:8001"}}]}}}}"#
        );
        let c = parse(&json).unwrap();
        assert_eq!(c.on_missing, Action::ClientAddress);
        assert_eq!(
            c.sources,
            vec![
                Source::Header { name: "x-conversation-id".into(), prefix: None, unsigned: true },
                Source::Cookie { name: "conv".into(), unsigned: true },
                Source::Header { name: "x-session-token".into(), prefix: None, unsigned: false },
            ]
        );
        assert!(c.sources[0].unsigned() && !c.sources[2].unsigned());
        for (doc, want) in [
            (minimal(r#","on_invalid":"client_address""#), "on_invalid: cannot be `client_address`"),
            (minimal(r#","on_missing":"client-address""#), "on_missing: unknown variant `client-address`"),
            (
                format!(
                    r#"{{"token":{{"keys":[{{"alg":"HS256","secret_base64":"{K32}"}}],"sources":[{{"header":"a","unsigned":"yes"}}]}},"upstream":{{"hosts":[{{"address":"1.2.3.4:1"}}]}}}}"#
                ),
                "token.sources[0].unsigned: invalid type",
            ),
            (
                format!(
                    r#"{{"token":{{"keys":[{{"alg":"HS256","secret_base64":"{K32}"}}]}},"upstream":{{"discovery":{{"admin_cluster":"a","cluster":"c","startup_wait_ms":60001}}}}}}"#
                ),
                "upstream.discovery.startup_wait_ms: must be at most 60000",
            ),
            (
                format!(
                    r#"{{"token":{{"keys":[{{"alg":"HS256","secret_base64":"{K32}"}}]}},"upstream":{{"discovery":{{"admin_cluster":"a","cluster":"c","startup_wait_ms":-1}}}}}}"#
                ),
                "upstream.discovery.startup_wait_ms: invalid value",
            ),
        ] {
            let err = parse(&doc).err().unwrap_or_else(|| panic!("accepted: {doc}")).to_string();
            assert!(err.contains(want), "got {err:?}, want {want:?}");
        }
        let json = format!(
            r#"{{"token":{{"keys":[{{"alg":"HS256","secret_base64":"{K32}"}}]}},
               "upstream":{{"discovery":{{"admin_cluster":"a","cluster":"c","startup_wait_ms":0}}}}}}"#
        );
        match parse(&json).unwrap().hosts {
            Hosts::Discovery(d) => assert_eq!(d.startup_wait_ms, 0),
            Hosts::Static(_) => panic!("expected discovery"),
        }
    }
}
