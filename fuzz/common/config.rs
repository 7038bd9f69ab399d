//! Configuration fuzzing helpers: the secrets seeded into configurations (none may ever
//! appear in an error or in `Debug` output), the VM environment, and the invariants.

use session_affinity::config::{Action, Config, ConfigError, Hosts, MAX_FALLBACKS, MAX_STARTUP_WAIT_MS};

/// Secrets used by the seeds, the structured generator and the environment.
pub const SECRETS: &[&str] = &[
    "ZHyFaEazbRm+DDoK9WnS0KR5CpfWH4fC5OOVI3Bh6os=",
    "nBYDAVya04QtPEYa03ebldmm+FIHyQfCwF2oLr3ILHc=",
    "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoOEhYaHiImKi4yNjo+QkZKT",
    "BwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyAhIiMkJSYnKCkqKywtLi8wMTIzNDU2Nzg5Ojs8PT4/QEFCQ0RFRg==",
];

/// The VM environment: the reference config's variables, plus one that is not base64.
pub fn env(name: &str) -> Option<String> {
    match name {
        "SA_TOKEN_KEY_K1" => Some(SECRETS[0].into()),
        "SA_TICKET_KEY" => Some(SECRETS[1].into()),
        "SA_KEY_K0" => Some(SECRETS[2].into()),
        "SA_BAD" => Some("not base64 at all!".into()),
        _ => None,
    }
}

/// A secret, or a long enough piece of one to identify it.
fn leaks(text: &str) -> Option<&'static str> {
    SECRETS.iter().copied().find(|s| {
        let core = s.trim_end_matches('=');
        text.contains(core) || core.as_bytes().windows(24).any(|w| text.as_bytes().windows(24).any(|t| t == w))
    })
}

/// Everything of a configuration but the host set's hash maps (whose `Debug` order
/// varies from one map to another).
fn summary(c: &Config) -> String {
    let hosts = match &c.hosts {
        Hosts::Static(set) => format!("{:?}", set.hosts()),
        Hosts::Discovery(d) => format!("{d:?}"),
    };
    format!(
        "{:?} {:?} {:?} {:?} {} {} {:?} {:?} {} {} {} {hosts}",
        c.sources,
        c.validator,
        c.on_missing,
        c.on_invalid,
        c.mint_ttl_seconds,
        c.mint_cookie,
        c.ticket,
        c.mode,
        c.override_header,
        c.fallbacks,
        c.metrics_flush_ms
    )
}

/// Checks a document.
pub fn check(bytes: &[u8]) {
    let first = Config::parse(bytes, &env);
    let again = Config::parse(bytes, &env);
    match (&first, &again) {
        (Err(a), Err(b)) => assert_eq!(a, b, "errors differ between two parses"),
        (Ok(a), Ok(b)) => assert_eq!(summary(a), summary(b)),
        _ => panic!("parse is not deterministic"),
    }
    match first {
        Err(e) => check_error(&e),
        Ok(c) => {
            let debug = format!("{c:?}");
            assert!(leaks(&debug).is_none(), "Debug shows a secret: {debug}");
            assert!(!c.sources.is_empty());
            assert!(!c.validator.keys.is_empty());
            assert!(c.fallbacks <= MAX_FALLBACKS as usize);
            assert!(c.mint_ttl_seconds >= 1);
            assert_eq!(c.override_header, c.override_header.to_ascii_lowercase());
            for reserved in
                ["x-session-id", "x-session-affinity", "x-session-previous-node", "x-session-ticket", "x-session-token"]
            {
                assert_ne!(c.override_header, reserved);
            }
            for k in &c.validator.keys {
                assert!(k.kid.as_deref() != Some(""));
            }
            match &c.hosts {
                Hosts::Static(set) => assert!(!set.is_empty()),
                Hosts::Discovery(d) => assert!(d.startup_wait_ms <= MAX_STARTUP_WAIT_MS),
            }
            assert_ne!(c.on_invalid, Action::ClientAddress, "an invalid token is never downgraded");
        }
    }
}

/// An error is one log line, and shows no secret outside of names: member names (the
/// field path, serde's `unknown field \`…\``) and environment variable names are echoed on
/// purpose, and mutations do move secret text into names.
pub fn check_error(e: &ConfigError) {
    let text = e.to_string();
    assert!(!text.contains('\n') && !text.contains('\r'), "error is not one log line: {text:?}");
    if let Some(s) = leaks(&values_of(&e.message)) {
        panic!("error message shows secret {s}: {text}");
    }
}

/// `message` without the names it quotes.
fn values_of(message: &str) -> String {
    // A name may itself hold backticks: `unknown field `a`b`, expected ...`.
    let message = match (message.find('`'), message.rfind("`, expected")) {
        (Some(i), Some(j)) if i < j => format!("{}{}", &message[..i], &message[j + 1..]),
        _ => message.to_string(),
    };
    let mut m: String = message.split('`').step_by(2).collect::<Vec<_>>().join("");
    if let Some(rest) = m.strip_prefix("environment variable ") {
        m = rest.find(" is not").map_or(String::new(), |i| rest[i..].to_string());
    }
    m
}
