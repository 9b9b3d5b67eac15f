//! RESP replies and their encoding in RESP2 and RESP3 (chosen per connection by HELLO).

/// One reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Simple(String),
    /// The text after `-`, its first word the error code (`ERR`, `WRONGPASS`, ...).
    Error(String),
    Integer(i64),
    Bulk(Vec<u8>),
    /// RESP2 `$-1`, RESP3 `_`.
    Null,
    Array(Vec<Value>),
    /// RESP3 `%`; in RESP2 a flat array of keys and values.
    Map(Vec<(Value, Value)>),
    /// RESP3 `=` with the `txt` format; in RESP2 a bulk string.
    Verbatim(String),
}

impl Value {
    pub fn ok() -> Value {
        Value::Simple("OK".into())
    }

    pub fn error(text: impl Into<String>) -> Value {
        Value::Error(text.into())
    }

    pub fn bulk(bytes: impl Into<Vec<u8>>) -> Value {
        Value::Bulk(bytes.into())
    }

    pub fn text(text: &str) -> Value {
        Value::Bulk(text.as_bytes().to_vec())
    }
}

fn header(out: &mut Vec<u8>, kind: u8, length: usize) {
    out.push(kind);
    decimal(out, length as u64);
    out.extend_from_slice(b"\r\n");
}

/// Appends `number` in decimal, without the allocation `to_string` makes.
fn decimal(out: &mut Vec<u8>, mut number: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (number % 10) as u8;
        number /= 10;
        if number == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends a bulk string (the same in both protocol versions).
pub fn encode_bulk(bytes: &[u8], out: &mut Vec<u8>) {
    header(out, b'$', bytes.len());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// Appends `value` in protocol version `protocol` (2 or 3).
pub fn encode(value: &Value, protocol: u8, out: &mut Vec<u8>) {
    match value {
        Value::Simple(text) => {
            out.push(b'+');
            out.extend(text.bytes().filter(|&b| b != b'\r' && b != b'\n'));
            out.extend_from_slice(b"\r\n");
        }
        Value::Error(text) => {
            out.push(b'-');
            out.extend(text.bytes().filter(|&b| b != b'\r' && b != b'\n'));
            out.extend_from_slice(b"\r\n");
        }
        Value::Integer(number) => {
            out.push(b':');
            out.extend_from_slice(number.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Value::Bulk(bytes) => encode_bulk(bytes, out),
        Value::Null if protocol >= 3 => out.extend_from_slice(b"_\r\n"),
        Value::Null => out.extend_from_slice(b"$-1\r\n"),
        Value::Array(items) => {
            header(out, b'*', items.len());
            for item in items {
                encode(item, protocol, out);
            }
        }
        Value::Map(pairs) => {
            if protocol >= 3 {
                header(out, b'%', pairs.len());
            } else {
                header(out, b'*', pairs.len() * 2);
            }
            for (key, value) in pairs {
                encode(key, protocol, out);
                encode(value, protocol, out);
            }
        }
        Value::Verbatim(text) if protocol >= 3 => {
            header(out, b'=', text.len() + 4);
            out.extend_from_slice(b"txt:");
            out.extend_from_slice(text.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Value::Verbatim(text) => encode(&Value::text(text), protocol, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(value: Value, protocol: u8) -> String {
        let mut out = Vec::new();
        encode(&value, protocol, &mut out);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn both_protocols() {
        assert_eq!(encoded(Value::Null, 2), "$-1\r\n");
        assert_eq!(encoded(Value::Null, 3), "_\r\n");
        let map = Value::Map(vec![(Value::text("a"), Value::Integer(1))]);
        assert_eq!(encoded(map.clone(), 2), "*2\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(encoded(map, 3), "%1\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(encoded(Value::error("ERR bad\r\nthing"), 2), "-ERR badthing\r\n");
    }
}
