//! Request headers as bytes: the proxy-wasm header-map wire format, cookies, and the
//! token and ticket lookups.
//!
//! Everything a client sends is handled as bytes. `proxy-wasm`'s `String` getters
//! `unwrap()` UTF-8 decoding inside the SDK, so a single non-UTF-8 byte would trap the
//! VM; here a non-UTF-8 value is just a value that does not match.
//!
//! Duplicates, documented for users: when a header source appears several times the
//! first copy wins; when a cookie appears several times (in one `cookie` header or
//! across several) the first occurrence wins.

/// One request header: name (lowercase, as Envoy stores it) and value.
pub type Header<'a> = (&'a [u8], &'a [u8]);

/// Parses a proxy-wasm serialized header map:
/// `u32 count`, `count × (u32 name_len, u32 value_len)`, then each name and value
/// followed by a NUL byte. All integers little-endian. `None` on any inconsistency.
pub fn parse_map(buf: &[u8]) -> Option<Vec<Header<'_>>> {
    let count = read_u32(buf, 0)? as usize;
    // Each entry needs 8 bytes of sizes and 2 NULs: a bound before allocating.
    if count > buf.len() / 10 + 1 {
        return None;
    }
    let mut sizes = 4usize;
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let nlen = read_u32(buf, sizes)? as usize;
        let vlen = read_u32(buf, sizes + 4)? as usize;
        sizes += 8;
        let name = buf.get(data..data.checked_add(nlen)?)?;
        data = data.checked_add(nlen)?.checked_add(1)?;
        let value = buf.get(data..data.checked_add(vlen)?)?;
        data = data.checked_add(vlen)?.checked_add(1)?;
        out.push((name, value));
    }
    Some(out)
}

/// Serializes a header map in the same format (used by tests and fuzzers).
pub fn serialize_map(headers: &[Header<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (n, v) in headers {
        out.extend_from_slice(&(n.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (n, v) in headers {
        out.extend_from_slice(n);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The first value of header `name` (lowercase).
pub fn first<'a>(headers: &[Header<'a>], name: &str) -> Option<&'a [u8]> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| *v)
}

/// The first value of cookie `name` across every `cookie` header, in order. Surrounding
/// double quotes are removed (RFC 6265 `cookie-value`).
pub fn cookie<'a>(headers: &[Header<'a>], name: &str) -> Option<&'a [u8]> {
    headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(b"cookie")).find_map(|(_, v)| cookie_in(v, name.as_bytes()))
}

fn cookie_in<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    // One pass over `name=value` pairs separated by `;`. Most pairs are rejected by their
    // first bytes, so this costs little more than finding the separators.
    let mut rest = header;
    loop {
        let (pair, next) = match rest.iter().position(|b| *b == b';') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let pair = trim(pair);
        if let Some(after) = pair.strip_prefix(name) {
            if let [b'=', value @ ..] = trim(after) {
                return Some(match trim(value) {
                    [b'"', inner @ .., b'"'] => inner,
                    v => v,
                });
            }
        }
        rest = next?;
    }
}

/// Removes optional whitespace (SP and HTAB) around a value.
pub fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Strips a case-insensitive ASCII prefix (such as `Bearer `).
pub fn strip_prefix_ci<'a>(value: &'a [u8], prefix: &str) -> Option<&'a [u8]> {
    let p = prefix.as_bytes();
    if value.len() >= p.len() && value[..p.len()].eq_ignore_ascii_case(p) {
        Some(&value[p.len()..])
    } else {
        None
    }
}

/// True when header `name` is a spelling of `reserved`: the same letters in any case,
/// with `_` for `-`. Backends that map header names CGI-style (`HTTP_X_SESSION_ID`) treat
/// `x_session_id` as `x-session-id`, so both spellings must go.
pub fn is_spelling_of(name: &[u8], reserved: &str) -> bool {
    let r = reserved.as_bytes();
    name.len() == r.len()
        && name.iter().zip(r).all(|(a, b)| {
            let a = if *a == b'_' { b'-' } else { a.to_ascii_lowercase() };
            a == *b
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_round_trip_and_garbage() {
        let h: Vec<Header<'_>> = vec![(b":path", b"/"), (b"cookie", b"a=1; b=\"2\""), (b"x", b"")];
        let buf = serialize_map(&h);
        assert_eq!(parse_map(&buf).unwrap(), h);
        assert_eq!(parse_map(&serialize_map(&[])).unwrap(), Vec::<Header<'_>>::new());
        for cut in 0..buf.len() {
            assert!(parse_map(&buf[..cut]).is_none() || cut >= buf.len() - 1, "cut {cut}");
        }
        assert!(parse_map(&[0xff, 0xff, 0xff, 0xff]).is_none());
        assert!(parse_map(&[]).is_none());
    }

    #[test]
    fn cookies() {
        let h: Vec<Header<'_>> =
            vec![(b"cookie", b"a=1; session_token=\"tok\"; a=2"), (b"cookie", b"session_token=second; sa_ticket=t")];
        assert_eq!(cookie(&h, "session_token"), Some(&b"tok"[..]));
        assert_eq!(cookie(&h, "a"), Some(&b"1"[..]));
        assert_eq!(cookie(&h, "sa_ticket"), Some(&b"t"[..]));
        assert_eq!(cookie(&h, "session"), None);
        let odd: Vec<Header<'_>> = vec![(b"cookie", b";;=;x;  y = 5 ;\xff\xfe=1")];
        assert_eq!(cookie(&odd, "y"), Some(&b"5"[..]));
        assert_eq!(cookie(&odd, "x"), None);
    }

    #[test]
    fn spellings() {
        assert!(is_spelling_of(b"x-session-id", "x-session-id"));
        assert!(is_spelling_of(b"X_Session_ID", "x-session-id"));
        assert!(!is_spelling_of(b"x-session-idx", "x-session-id"));
        assert!(!is_spelling_of(b"x-session-i\xc4", "x-session-id"));
        assert_eq!(strip_prefix_ci(b"bearer abc", "Bearer "), Some(&b"abc"[..]));
        assert_eq!(strip_prefix_ci(b"Basic abc", "Bearer "), None);
        assert_eq!(trim(b" \tx \t"), b"x");
    }
}
