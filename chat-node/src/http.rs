//! HTTP/1.1 messages: requests in and responses out for the server, and the response of
//! the LLM endpoint for the client. Generic over `BufRead`/`Write` so it is tested on
//! byte slices.
//!
//! Invariants: the request head is at most [`MAX_HEAD_BYTES`] with at most
//! [`MAX_HEADERS`] headers; a body is read only up to the caller's limit; a request with
//! both `content-length` and `transfer-encoding`, or with conflicting lengths, is refused
//! (no request smuggling through a proxy); header names are kept lowercase; values are
//! raw bytes (a client's non-UTF-8 bytes are the handler's business, never a panic).

use serde_json::Value;
use std::fmt;
use std::io::{self, BufRead, Read, Write};

/// Largest request or response head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most headers in one message.
pub const MAX_HEADERS: usize = 128;

/// A request (its body filled by [`read_request_body`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub target: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Lowercase names, raw values, in arrival order.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The value of the first header called `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        header_in(&self.headers, name)
    }

    /// The path, without the query string.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// Whether the connection may serve another request after this one.
    pub fn keep_alive(&self) -> bool {
        let tokens = connection_tokens(&self.headers);
        if self.minor_version == 0 {
            tokens.iter().any(|t| t == "keep-alive")
        } else {
            !tokens.iter().any(|t| t == "close")
        }
    }

    /// Whether the client waits for `100 Continue` before sending the body.
    pub fn expects_continue(&self) -> bool {
        self.minor_version >= 1 && self.header("expect").is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"))
    }
}

/// A response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Extra headers (`content-length` and `connection` are written by
    /// [`write_response`]).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, body: &Value) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }

    /// A plain-text response.
    pub fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The value of the first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A response received by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// Why a message could not be read.
#[derive(Debug)]
pub enum HttpError {
    /// The peer closed the connection before sending anything.
    Closed,
    Io(io::Error),
    HeadTooLarge,
    BodyTooLarge,
    Malformed(&'static str),
    /// A transfer coding other than `chunked`.
    UnsupportedEncoding,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Closed => write!(f, "connection closed"),
            HttpError::Io(e) => write!(f, "i/o error: {e}"),
            HttpError::HeadTooLarge => write!(f, "message head too large"),
            HttpError::BodyTooLarge => write!(f, "body too large"),
            HttpError::Malformed(why) => write!(f, "malformed message: {why}"),
            HttpError::UnsupportedEncoding => write!(f, "unsupported transfer-encoding"),
        }
    }
}

impl From<io::Error> for HttpError {
    fn from(e: io::Error) -> Self {
        HttpError::Io(e)
    }
}

impl HttpError {
    /// The status to answer a request that failed this way, if any answer is possible.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Closed | HttpError::Io(_) => None,
            HttpError::HeadTooLarge => Some(431),
            HttpError::BodyTooLarge => Some(413),
            HttpError::Malformed(_) => Some(400),
            HttpError::UnsupportedEncoding => Some(501),
        }
    }
}

/// Reads a request line and headers (not the body).
pub fn read_request_head<R: BufRead>(r: &mut R) -> Result<Request, HttpError> {
    let mut budget = MAX_HEAD_BYTES;
    // RFC 9112 2.2: ignore empty lines before the request line.
    let mut line = Vec::new();
    for _ in 0..4 {
        line = read_line(r, &mut budget)?;
        if !line.is_empty() {
            break;
        }
    }
    let line = std::str::from_utf8(&line).map_err(|_| HttpError::Malformed("request line"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed("request line"));
    };
    if method.is_empty() || !method.bytes().all(is_token_byte) {
        return Err(HttpError::Malformed("method"));
    }
    if target.is_empty() || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(HttpError::Malformed("request target"));
    }
    let minor_version = parse_version(version)?;
    let headers = read_headers(r, &mut budget)?;
    Ok(Request { method: method.to_owned(), target: target.to_owned(), minor_version, headers, body: Vec::new() })
}

/// Reads the body announced by `req`'s headers, at most `limit` bytes.
pub fn read_request_body<R: BufRead>(r: &mut R, req: &mut Request, limit: usize) -> Result<(), HttpError> {
    req.body = match body_framing(&req.headers)? {
        Framing::Chunked => read_chunked(r, limit)?,
        Framing::Length(len) => read_exact_body(r, len, limit)?,
        Framing::None | Framing::UntilClose => Vec::new(),
    };
    Ok(())
}

/// Reads a response to a request we sent (skipping `1xx` interim responses); a body
/// without framing is read until the peer closes.
pub fn read_response<R: BufRead>(r: &mut R, limit: usize) -> Result<ClientResponse, HttpError> {
    loop {
        let mut budget = MAX_HEAD_BYTES;
        let line = read_line(r, &mut budget)?;
        let line = std::str::from_utf8(&line).map_err(|_| HttpError::Malformed("status line"))?;
        let mut parts = line.splitn(3, ' ');
        let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
            return Err(HttpError::Malformed("status line"));
        };
        parse_version(version)?;
        let status =
            code.parse::<u16>().ok().filter(|c| (100..=999).contains(c)).ok_or(HttpError::Malformed("status code"))?;
        let headers = read_headers(r, &mut budget)?;
        if (100..200).contains(&status) {
            continue;
        }
        let body = if status == 204 || status == 304 {
            Vec::new()
        } else {
            match body_framing(&headers)? {
                Framing::Chunked => read_chunked(r, limit)?,
                Framing::Length(len) => read_exact_body(r, len, limit)?,
                Framing::None | Framing::UntilClose => read_to_close(r, limit)?,
            }
        };
        return Ok(ClientResponse { status, headers, body });
    }
}

/// Writes a response; `head_only` for `HEAD` requests.
pub fn write_response<W: Write>(w: &mut W, resp: &Response, keep_alive: bool, head_only: bool) -> io::Result<()> {
    let mut out = Vec::with_capacity(256 + resp.body.len());
    out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status)).as_bytes());
    for (name, value) in &resp.headers {
        // Values we set never hold CR/LF; drop any that would (no header injection).
        if value.bytes().any(|b| b == b'\r' || b == b'\n') {
            continue;
        }
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(format!("content-length: {}\r\n", resp.body.len()).as_bytes());
    let connection = if keep_alive { "keep-alive" } else { "close" };
    out.extend_from_slice(format!("connection: {connection}\r\n\r\n").as_bytes());
    if !head_only {
        out.extend_from_slice(&resp.body);
    }
    w.write_all(&out)?;
    w.flush()
}

/// The value of the first header called `name` (lowercase) in a header list.
pub fn header_in<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
}

/// Standard reason phrase.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "",
    }
}

enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

fn body_framing(headers: &[(String, Vec<u8>)]) -> Result<Framing, HttpError> {
    let te: Vec<&[u8]> = headers.iter().filter(|(n, _)| n == "transfer-encoding").map(|(_, v)| v.as_slice()).collect();
    let lengths: Vec<&[u8]> =
        headers.iter().filter(|(n, _)| n == "content-length").map(|(_, v)| v.as_slice()).collect();
    if !te.is_empty() {
        if !lengths.is_empty() {
            return Err(HttpError::Malformed("both content-length and transfer-encoding"));
        }
        let codings: Vec<String> = te
            .iter()
            .flat_map(|v| v.split(|&b| b == b','))
            .map(|c| String::from_utf8_lossy(c).trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty())
            .collect();
        return match codings.as_slice() {
            [only] if only == "chunked" => Ok(Framing::Chunked),
            [] => Ok(Framing::UntilClose),
            _ => Err(HttpError::UnsupportedEncoding),
        };
    }
    let mut length: Option<usize> = None;
    for value in lengths.iter().flat_map(|v| v.split(|&b| b == b',')) {
        let text = std::str::from_utf8(value).map_err(|_| HttpError::Malformed("content-length"))?.trim();
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpError::Malformed("content-length"));
        }
        let n = text.parse::<usize>().map_err(|_| HttpError::Malformed("content-length"))?;
        if length.is_some_and(|l| l != n) {
            return Err(HttpError::Malformed("conflicting content-length"));
        }
        length = Some(n);
    }
    Ok(length.map_or(Framing::None, Framing::Length))
}

fn read_exact_body<R: BufRead>(r: &mut R, len: usize, limit: usize) -> Result<Vec<u8>, HttpError> {
    if len > limit {
        return Err(HttpError::BodyTooLarge);
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(eof_is_malformed)?;
    Ok(body)
}

fn read_to_close<R: BufRead>(r: &mut R, limit: usize) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    r.take(limit as u64 + 1).read_to_end(&mut body)?;
    if body.len() > limit {
        return Err(HttpError::BodyTooLarge);
    }
    Ok(body)
}

fn read_chunked<R: BufRead>(r: &mut R, limit: usize) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    let mut budget = MAX_HEAD_BYTES;
    loop {
        let line = read_line(r, &mut budget).map_err(closed_is_malformed)?;
        let size_text = line.split(|&b| b == b';').next().unwrap_or(&[]);
        let size_text = std::str::from_utf8(size_text).map_err(|_| HttpError::Malformed("chunk size"))?.trim();
        if size_text.is_empty() || size_text.len() > 16 {
            return Err(HttpError::Malformed("chunk size"));
        }
        let size = usize::from_str_radix(size_text, 16).map_err(|_| HttpError::Malformed("chunk size"))?;
        if size == 0 {
            // Trailer fields, then the final empty line.
            read_headers(r, &mut budget).map_err(closed_is_malformed)?;
            return Ok(body);
        }
        if size > limit.saturating_sub(body.len()) {
            return Err(HttpError::BodyTooLarge);
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..]).map_err(eof_is_malformed)?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf).map_err(eof_is_malformed)?;
        if &crlf != b"\r\n" {
            return Err(HttpError::Malformed("chunk not followed by CRLF"));
        }
    }
}

fn read_headers<R: BufRead>(r: &mut R, budget: &mut usize) -> Result<Vec<(String, Vec<u8>)>, HttpError> {
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, budget).map_err(closed_is_malformed)?;
        if line.is_empty() {
            return Ok(headers);
        }
        if headers.len() >= MAX_HEADERS {
            return Err(HttpError::HeadTooLarge);
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(HttpError::Malformed("obsolete header folding"));
        }
        let colon = line.iter().position(|&b| b == b':').ok_or(HttpError::Malformed("header without colon"))?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().copied().all(is_token_byte) {
            return Err(HttpError::Malformed("header name"));
        }
        let value = trim_ows(value);
        if value.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n') {
            return Err(HttpError::Malformed("header value"));
        }
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        headers.push((name, value.to_vec()));
    }
}

/// One line without its `\n` (and `\r`), charged against `budget`.
fn read_line<R: BufRead>(r: &mut R, budget: &mut usize) -> Result<Vec<u8>, HttpError> {
    let mut line = Vec::new();
    let n = r.take(*budget as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(HttpError::Closed);
    }
    if n > *budget {
        return Err(HttpError::HeadTooLarge);
    }
    *budget -= n;
    if line.last() != Some(&b'\n') {
        return Err(HttpError::Malformed("truncated line"));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(line)
}

fn parse_version(version: &str) -> Result<u8, HttpError> {
    match version {
        "HTTP/1.1" => Ok(1),
        "HTTP/1.0" => Ok(0),
        _ => Err(HttpError::Malformed("HTTP version")),
    }
}

fn connection_tokens(headers: &[(String, Vec<u8>)]) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n == "connection")
        .flat_map(|(_, v)| v.split(|&b| b == b','))
        .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
        .collect()
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn eof_is_malformed(e: io::Error) -> HttpError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        HttpError::Malformed("truncated body")
    } else {
        HttpError::Io(e)
    }
}

fn closed_is_malformed(e: HttpError) -> HttpError {
    match e {
        HttpError::Closed => HttpError::Malformed("truncated message"),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::io::Cursor;

    fn request(bytes: &[u8], limit: usize) -> Result<Request, HttpError> {
        let mut r = Cursor::new(bytes.to_vec());
        let mut req = read_request_head(&mut r)?;
        read_request_body(&mut r, &mut req, limit)?;
        Ok(req)
    }

    #[test]
    fn parses_a_post_with_length() {
        let req = request(
            b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: a\r\nX-Session-Id:  s1 \r\nContent-Length: 5\r\n\r\nhelloEXTRA",
            100,
        )
        .unwrap();
        assert_eq!(req.method, "POST");
        assert_eq!(req.path(), "/v1/chat");
        assert_eq!(req.header("x-session-id"), Some(&b"s1"[..]));
        assert_eq!(req.body, b"hello");
        assert!(req.keep_alive());
        assert!(!req.expects_continue());
    }

    #[test]
    fn parses_chunked_bodies_and_trailers() {
        let req = request(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n",
            100,
        )
        .unwrap();
        assert_eq!(req.body, b"abc0123456789");
    }

    #[test]
    fn keeps_several_requests_apart_on_one_connection() {
        let mut r = Cursor::new(
            b"GET /healthz HTTP/1.1\r\n\r\nPOST /x HTTP/1.1\r\ncontent-length: 2\r\n\r\nokGET /y HTTP/1.0\r\n\r\n"
                .to_vec(),
        );
        let mut paths = Vec::new();
        loop {
            match read_request_head(&mut r) {
                Ok(mut req) => {
                    read_request_body(&mut r, &mut req, 10).unwrap();
                    paths.push((req.target.clone(), req.body.clone(), req.keep_alive()));
                }
                Err(HttpError::Closed) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(
            paths,
            [
                ("/healthz".to_string(), vec![], true),
                ("/x".to_string(), b"ok".to_vec(), true),
                ("/y".to_string(), vec![], false),
            ]
        );
    }

    #[test]
    fn connection_semantics() {
        let table: [(&[u8], bool); 4] = [
            (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false),
            (b"GET / HTTP/1.1\r\nConnection: Keep-Alive, TE\r\n\r\n", true),
            (b"GET / HTTP/1.0\r\n\r\n", false),
            (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true),
        ];
        for (bytes, want) in table {
            assert_eq!(request(bytes, 0).unwrap().keep_alive(), want);
        }
        let req = request(b"POST / HTTP/1.1\r\nExpect: 100-Continue\r\n\r\n", 0).unwrap();
        assert!(req.expects_continue());
    }

    #[test]
    fn refuses_bad_requests() {
        let table: Vec<(&[u8], Option<u16>)> = vec![
            (b"", None),
            (b"GET /\r\n\r\n", Some(400)),
            (b"GET / HTTP/2.0\r\n\r\n", Some(400)),
            (b"G(T / HTTP/1.1\r\n\r\n", Some(400)),
            (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", Some(400)),
            (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", Some(400)),
            (b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", Some(400)),
            (b"GET / HTTP/1.1\r\nA: b\r\n", Some(400)),
            (b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab", Some(400)),
            (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", Some(400)),
            (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", Some(400)),
            (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", Some(400)),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", Some(501)),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", Some(400)),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", Some(400)),
            (b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n", Some(413)),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n6\r\nabcdef\r\n0\r\n\r\n",
                Some(413),
            ),
        ];
        for (bytes, want) in table {
            match request(bytes, 10) {
                Ok(req) => panic!("accepted {:?}: {req:?}", String::from_utf8_lossy(bytes)),
                Err(e) => assert_eq!(e.status(), want, "{:?}: {e}", String::from_utf8_lossy(bytes)),
            }
        }
    }

    #[test]
    fn limits_the_head() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(request(&big, 0).unwrap_err().status(), Some(431));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(request(&many, 0).unwrap_err().status(), Some(431));
    }

    #[test]
    fn non_utf8_header_values_are_kept_raw() {
        let req = request(b"GET / HTTP/1.1\r\nx-session-id: \xff\xfe\r\n\r\n", 0).unwrap();
        assert_eq!(req.header("x-session-id"), Some(&b"\xff\xfe"[..]));
    }

    #[test]
    fn writes_responses() {
        let resp = Response::json(200, &serde_json::json!({"a": 1})).with_header("x-served-by", "n1");
        let mut out = Vec::new();
        write_response(&mut out, &resp, true, false).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-served-by: n1\r\ncontent-length: 7\r\nconnection: keep-alive\r\n\r\n{\"a\":1}"
        );
        let mut out = Vec::new();
        let injected = Response::text(503, "x").with_header("bad", "a\r\nset-cookie: b");
        write_response(&mut out, &injected, false, true).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("set-cookie"));
        assert!(text.ends_with("content-length: 1\r\nconnection: close\r\n\r\n"));
    }

    #[test]
    fn reads_client_responses() {
        let table: [(&[u8], u16, &[u8]); 4] = [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", 200, b"hi"),
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
                201,
                b"hi",
            ),
            (b"HTTP/1.0 500 Oops\r\n\r\nuntil close", 500, b"until close"),
            (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b""),
        ];
        for (bytes, status, body) in table {
            let resp = read_response(&mut Cursor::new(bytes.to_vec()), 100).unwrap();
            assert_eq!((resp.status, resp.body.as_slice()), (status, body));
        }
        assert!(read_response(&mut Cursor::new(b"HTTP/1.1 2x OK\r\n\r\n".to_vec()), 100).is_err());
        assert!(matches!(
            read_response(&mut Cursor::new(b"HTTP/1.1 200 OK\r\n\r\n0123456789ab".to_vec()), 10),
            Err(HttpError::BodyTooLarge)
        ));
    }
}
