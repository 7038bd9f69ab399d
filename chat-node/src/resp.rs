//! RESP2, the Redis wire protocol: commands out (arrays of bulk strings), replies in.
//!
//! Only what a GET/SET client needs, but every reply type is parsed so an unexpected
//! reply is an error value, never a desynchronised connection. Sizes and nesting are
//! bounded so a misbehaving peer cannot make the node allocate without limit.

use std::fmt;
use std::io::{self, BufRead, Read};

/// Largest bulk string accepted (a stored conversation).
pub const MAX_BULK: usize = 64 * 1024 * 1024;
/// Largest array accepted and deepest nesting.
const MAX_ARRAY: usize = 1024 * 1024;
const MAX_DEPTH: usize = 8;
/// Longest status, error or length line.
const MAX_LINE: usize = 64 * 1024;

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    Error(String),
    Integer(i64),
    /// `$-1` is `Bulk(None)` (e.g. GET of a missing key).
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Value>>),
}

/// A reply that could not be read.
#[derive(Debug)]
pub enum RespError {
    Io(io::Error),
    /// The peer closed the connection.
    Closed,
    Protocol(&'static str),
}

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RespError::Io(e) => write!(f, "i/o error: {e}"),
            RespError::Closed => write!(f, "connection closed"),
            RespError::Protocol(why) => write!(f, "protocol error: {why}"),
        }
    }
}

impl From<io::Error> for RespError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            RespError::Closed
        } else {
            RespError::Io(e)
        }
    }
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode_command(args: &[&[u8]]) -> Vec<u8> {
    let size: usize = args.iter().map(|a| a.len() + 16).sum();
    let mut out = Vec::with_capacity(size + 16);
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one reply.
pub fn read_value<R: BufRead>(r: &mut R) -> Result<Value, RespError> {
    read_at_depth(r, 0)
}

fn read_at_depth<R: BufRead>(r: &mut R, depth: usize) -> Result<Value, RespError> {
    if depth > MAX_DEPTH {
        return Err(RespError::Protocol("reply nested too deeply"));
    }
    let line = read_line(r)?;
    let (kind, rest) = match line.split_first() {
        Some((k, rest)) => (*k, rest),
        None => return Err(RespError::Protocol("empty reply line")),
    };
    let text = || String::from_utf8_lossy(rest).into_owned();
    match kind {
        b'+' => Ok(Value::Simple(text())),
        b'-' => Ok(Value::Error(text())),
        b':' => parse_int(rest).map(Value::Integer),
        b'$' => {
            let len = parse_int(rest)?;
            if len < 0 {
                return Ok(Value::Bulk(None));
            }
            let len = usize::try_from(len).map_err(|_| RespError::Protocol("bad length"))?;
            if len > MAX_BULK {
                return Err(RespError::Protocol("bulk string too large"));
            }
            let mut data = vec![0u8; len + 2];
            r.read_exact(&mut data)?;
            if !data.ends_with(b"\r\n") {
                return Err(RespError::Protocol("bulk string not terminated by CRLF"));
            }
            data.truncate(len);
            Ok(Value::Bulk(Some(data)))
        }
        b'*' => {
            let len = parse_int(rest)?;
            if len < 0 {
                return Ok(Value::Array(None));
            }
            let len = usize::try_from(len).map_err(|_| RespError::Protocol("bad length"))?;
            if len > MAX_ARRAY {
                return Err(RespError::Protocol("array too large"));
            }
            let mut items = Vec::with_capacity(len.min(64));
            for _ in 0..len {
                items.push(read_at_depth(r, depth + 1)?);
            }
            Ok(Value::Array(Some(items)))
        }
        _ => Err(RespError::Protocol("unknown reply type")),
    }
}

/// One CRLF-terminated line without its terminator.
fn read_line<R: BufRead>(r: &mut R) -> Result<Vec<u8>, RespError> {
    let mut line = Vec::new();
    let n = r.by_ref().take(MAX_LINE as u64 + 2).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(RespError::Closed);
    }
    if !line.ends_with(b"\r\n") {
        return Err(if line.len() > MAX_LINE { RespError::Protocol("reply line too long") } else { RespError::Closed });
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

fn parse_int(digits: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(digits).ok().and_then(|s| s.parse::<i64>().ok()).ok_or(RespError::Protocol("bad integer"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::io::Cursor;

    fn parse(bytes: &[u8]) -> Result<Value, RespError> {
        read_value(&mut Cursor::new(bytes))
    }

    #[test]
    fn encodes_commands() {
        assert_eq!(
            encode_command(&[b"SET", b"k", b"v\r\n", b"EX", b"10"]),
            b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n$2\r\nEX\r\n$2\r\n10\r\n".to_vec()
        );
        assert_eq!(encode_command(&[b"GET", b""]), b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n".to_vec());
    }

    #[test]
    fn parses_every_reply_type() {
        let table: Vec<(&[u8], Value)> = vec![
            (b"+OK\r\n", Value::Simple("OK".into())),
            (b"-CLUSTERDOWN The cluster is down\r\n", Value::Error("CLUSTERDOWN The cluster is down".into())),
            (b":-42\r\n", Value::Integer(-42)),
            (b"$5\r\nhe\r\no\r\n", Value::Bulk(Some(b"he\r\no".to_vec()))),
            (b"$0\r\n\r\n", Value::Bulk(Some(vec![]))),
            (b"$-1\r\n", Value::Bulk(None)),
            (b"*-1\r\n", Value::Array(None)),
            (
                b"*2\r\n:1\r\n*1\r\n+x\r\n",
                Value::Array(Some(vec![Value::Integer(1), Value::Array(Some(vec![Value::Simple("x".into())]))])),
            ),
        ];
        for (bytes, want) in table {
            assert_eq!(parse(bytes).unwrap(), want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn reads_consecutive_replies() {
        let mut c = Cursor::new(b"+OK\r\n$1\r\na\r\n".to_vec());
        assert_eq!(read_value(&mut c).unwrap(), Value::Simple("OK".into()));
        assert_eq!(read_value(&mut c).unwrap(), Value::Bulk(Some(b"a".to_vec())));
        assert!(matches!(read_value(&mut c), Err(RespError::Closed)));
    }

    #[test]
    fn refuses_malformed_replies() {
        let bad: [&[u8]; 7] = [
            b"?x\r\n",
            b":12a\r\n",
            b"$3\r\nabcd\r\n",
            b"$99999999999\r\n",
            b"\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
            b"$2\r\nab",
        ];
        for bytes in bad {
            assert!(parse(bytes).is_err(), "{:?}", String::from_utf8_lossy(bytes));
        }
        assert!(matches!(parse(b"+OK"), Err(RespError::Closed)));
        assert!(matches!(parse(b""), Err(RespError::Closed)));
    }
}
