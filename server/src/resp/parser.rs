//! Splitting RESP requests off a byte stream: arrays of bulk strings (what every client
//! sends) and inline commands (what a person types into telnet). Pure and bounded: nothing
//! is buffered beyond what the limits allow, and a request that breaks them is an error that
//! ends the connection, as Redis does.
#![deny(clippy::indexing_slicing)]

use std::fmt;

use smallvec::SmallVec;

/// Arguments one command may have.
pub const ARG_COUNT_MAX: usize = 65_536;
/// Bytes of one argument: a maximal value plus room (SET's options travel separately).
pub const ARG_SIZE_MAX: usize = schema::VALUE_SIZE_MAX + 1024;
/// Bytes of one inline command line.
pub const INLINE_SIZE_MAX: usize = 64 * 1024;
/// Bytes of all the arguments of one command together.
pub const COMMAND_SIZE_MAX: usize = 4 * schema::VALUE_SIZE_MAX;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Malformed or beyond a limit: the reply is `-ERR Protocol error: ...` and the
    /// connection closes.
    Protocol(String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Protocol(detail) => write!(f, "Protocol error: {detail}"),
        }
    }
}

/// One parsed command: its arguments (the first is the name) and the bytes it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub args: Vec<Vec<u8>>,
    pub consumed: usize,
}

fn protocol(detail: impl Into<String>) -> ParseError {
    ParseError::Protocol(detail.into())
}

/// The line at the start of `buf` (without its CRLF) and the bytes it takes with it.
fn line(buf: &[u8], limit: usize) -> Result<Option<(&[u8], usize)>, ParseError> {
    let mut from = 0;
    loop {
        let unsearched = buf.get(from..).unwrap_or_default();
        match unsearched.iter().position(|&b| b == b'\r') {
            Some(at) => {
                let end = from + at;
                if end > limit {
                    return Err(protocol("too big line"));
                }
                match buf.get(end + 1) {
                    Some(b'\n') => return Ok(Some((buf.get(..end).unwrap_or_default(), end + 2))),
                    Some(_) => from = end + 1,
                    None => return Ok(None),
                }
            }
            None if buf.len() > limit + 1 => return Err(protocol("too big line")),
            None => return Ok(None),
        }
    }
}

/// A decimal number with an optional minus sign, as RESP headers carry.
fn number(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut value: i64 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return None;
        }
        value = value * 10 + i64::from(digit - b'0');
    }
    Some(if negative { -value } else { value })
}

/// Parses the first command in `buf`. `Ok(None)`: more bytes are needed. A command that is
/// only whitespace (an empty inline line) parses to no arguments.
pub fn parse(buf: &[u8]) -> Result<Option<Parsed>, ParseError> {
    match buf.first() {
        None => Ok(None),
        Some(b'*') => Ok(parse_array(buf)?.map(|(args, consumed)| Parsed {
            args: args.iter().map(|arg| arg.to_vec()).collect(),
            consumed,
        })),
        Some(_) => parse_inline(buf),
    }
}

/// The arguments of one array command, borrowed from the buffer they arrived in.
pub type Args<'a> = SmallVec<[&'a [u8]; 4]>;

/// Parses the array command at the start of `buf` (which begins with `*`) without copying
/// its arguments: them and the bytes the command takes. `Ok(None)`: more bytes are needed.
pub fn parse_array(buf: &[u8]) -> Result<Option<(Args<'_>, usize)>, ParseError> {
    let Some((header, mut at)) = line(buf, 32)? else { return Ok(None) };
    let count = header.get(1..).and_then(number).ok_or_else(|| protocol("invalid multibulk length"))?;
    if count <= 0 {
        return Ok(Some((Args::new(), at)));
    }
    if count as usize > ARG_COUNT_MAX {
        return Err(protocol("invalid multibulk length"));
    }
    let mut args = Args::with_capacity((count as usize).min(1024));
    let mut total = 0usize;
    for _ in 0..count {
        let rest = buf.get(at..).unwrap_or_default();
        match rest.first() {
            None => return Ok(None),
            Some(b'$') => {}
            Some(&other) => {
                return Err(protocol(format!("expected '$', got '{}'", other as char)));
            }
        }
        let Some((header, header_size)) = line(rest, 32)? else { return Ok(None) };
        let size = header.get(1..).and_then(number).ok_or_else(|| protocol("invalid bulk length"))?;
        if size < 0 || size as usize > ARG_SIZE_MAX {
            return Err(protocol("invalid bulk length"));
        }
        let size = size as usize;
        total += size;
        if total > COMMAND_SIZE_MAX {
            return Err(protocol("command too large"));
        }
        let Some(body) = rest.get(header_size..header_size + size + 2) else { return Ok(None) };
        match body.split_at_checked(size) {
            Some((value, b"\r\n")) => args.push(value),
            _ => return Err(protocol("bulk string not terminated by CRLF")),
        }
        at += header_size + size + 2;
    }
    Ok(Some((args, at)))
}

/// An inline command: words separated by spaces, with "double" and 'single' quotes and the
/// escapes Redis accepts inside double quotes.
fn parse_inline(buf: &[u8]) -> Result<Option<Parsed>, ParseError> {
    let (text, consumed) = match buf.iter().position(|&b| b == b'\n') {
        Some(end) if end > INLINE_SIZE_MAX => return Err(protocol("too big inline request")),
        Some(end) => {
            let text = buf.get(..end).unwrap_or_default();
            (text.strip_suffix(b"\r").unwrap_or(text), end + 1)
        }
        None if buf.len() > INLINE_SIZE_MAX => return Err(protocol("too big inline request")),
        None => return Ok(None),
    };
    let args = split_words(text).ok_or_else(|| protocol("unbalanced quotes in request"))?;
    Ok(Some(Parsed { args, consumed }))
}

fn split_words(text: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut words = Vec::new();
    let mut at = 0;
    loop {
        while text.get(at).is_some_and(u8::is_ascii_whitespace) {
            at += 1;
        }
        let Some(&first) = text.get(at) else { break };
        let mut word = Vec::new();
        match first {
            b'"' => {
                at += 1;
                loop {
                    let &byte = text.get(at)?;
                    at += 1;
                    match byte {
                        b'"' => break,
                        b'\\' => {
                            let &escaped = text.get(at)?;
                            at += 1;
                            word.push(match escaped {
                                b'n' => b'\n',
                                b'r' => b'\r',
                                b't' => b'\t',
                                b'x' => {
                                    let hex = std::str::from_utf8(text.get(at..at + 2)?).ok()?;
                                    at += 2;
                                    u8::from_str_radix(hex, 16).ok()?
                                }
                                other => other,
                            });
                        }
                        other => word.push(other),
                    }
                }
            }
            b'\'' => {
                at += 1;
                loop {
                    let &byte = text.get(at)?;
                    at += 1;
                    if byte == b'\'' {
                        break;
                    }
                    word.push(byte);
                }
            }
            _ => {
                while let Some(&byte) = text.get(at).filter(|byte| !byte.is_ascii_whitespace()) {
                    word.push(byte);
                    at += 1;
                }
            }
        }
        words.push(word);
    }
    Some(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(parts: &[&str]) -> Vec<Vec<u8>> {
        parts.iter().map(|p| p.as_bytes().to_vec()).collect()
    }

    #[test]
    fn arrays_of_bulk_strings() {
        let request = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n*1\r\n$4\r\nPING\r\n";
        let first = parse(request).expect("valid").expect("whole");
        assert_eq!(first.args, args(&["SET", "k", "hello"]));
        let second = parse(&request[first.consumed..]).expect("valid").expect("whole");
        assert_eq!(second.args, args(&["PING"]));
        // Every proper prefix asks for more bytes.
        for cut in 0..first.consumed {
            assert_eq!(parse(&request[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn inline_commands_with_quotes() {
        let parsed = parse(b"set k \"a b\\n\" 'c d'\r\n").expect("valid").expect("whole");
        assert_eq!(parsed.args, vec![b"set".to_vec(), b"k".to_vec(), b"a b\n".to_vec(), b"c d".to_vec()]);
        assert!(parse(b"set \"open\r\n").is_err());
        assert_eq!(parse(b"\r\n").expect("valid").expect("whole").args, Vec::<Vec<u8>>::new());
    }

    #[test]
    fn hostile_requests_are_refused_before_buffering() {
        assert!(parse(b"*1\r\n$1099511627776\r\n").is_err(), "a bulk of 2^40 bytes");
        assert!(parse(b"*99999999999\r\n").is_err());
        assert!(parse(b"*1\r\n*1\r\n*1\r\n").is_err(), "nested arrays");
        assert!(parse(b"*1\r\n$-5\r\n").is_err());
        assert!(parse(&vec![b'a'; INLINE_SIZE_MAX + 2]).is_err());
        assert!(parse(b"*1\r\n$3\r\nabcXY").is_err(), "bulk without CRLF");
        assert!(parse(b"*1\r\n$+3\r\nabc\r\n").is_err(), "a sign where a digit belongs");
        assert!(parse(b"*1\r\n$3x\r\nabc\r\n").is_err());
        assert!(parse(&[b"*1\r".as_slice(), &[b'1'; 40]].concat()).is_err(), "a header line too long");
    }
}
