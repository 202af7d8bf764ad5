//! gRPC status codes and the header values that carry them: `grpc-status`, the percent-encoded
//! `grpc-message`, and the `grpc-timeout` request header. Sans-I/O, like [`super::frame`].

use std::fmt;
use std::time::Duration;

/// The canonical gRPC status codes (grpc/doc/statuscodes.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

/// How many codes there are (for per-code counters).
pub const CODE_COUNT: usize = 17;

impl Code {
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The `grpc-status` value, e.g. `"5"`.
    pub fn header_value(self) -> &'static str {
        const VALUES: [&str; CODE_COUNT] = [
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
            "16",
        ];
        VALUES.get(self as usize).copied().unwrap_or("2")
    }

    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

/// The outcome of a call as the client sees it: a code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    pub message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn ok() -> Self {
        Self::new(Code::Ok, "")
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::new(Code::FailedPrecondition, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    pub fn deadline_exceeded() -> Self {
        Self::new(Code::DeadlineExceeded, "deadline exceeded")
    }

    /// `grpc-message`: percent-encoded, at most [`MAX_MESSAGE_LEN`] bytes of the message.
    pub fn encoded_message(&self) -> String {
        percent_encode(truncate_utf8(&self.message, MAX_MESSAGE_LEN))
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.name(), self.message)
    }
}

/// Longest status message sent; longer ones are cut (a header, not a payload).
pub const MAX_MESSAGE_LEN: usize = 1024;

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Percent-encodes as the gRPC spec asks for `grpc-message`: every byte outside printable ASCII
/// (0x20..=0x7E), and `%` itself, becomes `%XX`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    out
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeoutError {
    #[error("grpc-timeout {0:?} is not 1 to 8 digits followed by H, M, S, m, u or n")]
    Malformed(String),
}

/// Parses `grpc-timeout`: up to 8 ASCII digits and a unit (Hours, Minutes, Seconds,
/// milliseconds, microseconds, nanoseconds).
pub fn parse_timeout(value: &str) -> Result<Duration, TimeoutError> {
    let malformed = || TimeoutError::Malformed(value.chars().take(32).collect());
    // Only ASCII is valid, and checking first makes the byte split below land on a boundary.
    if !value.is_ascii() {
        return Err(malformed());
    }
    let (digits, unit) = value.split_at(value.len().saturating_sub(1));
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    let n: u64 = digits.parse().map_err(|_| malformed())?;
    Ok(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(malformed()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("1H"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_timeout("2M"), Ok(Duration::from_secs(120)));
        assert_eq!(
            parse_timeout("99999999S"),
            Ok(Duration::from_secs(99_999_999))
        );
        assert_eq!(parse_timeout("250m"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_timeout("7u"), Ok(Duration::from_micros(7)));
        assert_eq!(parse_timeout("1n"), Ok(Duration::from_nanos(1)));
        for bad in ["", "S", "123456789S", "1s", "-1S", "1.5S", "12", "é", "1 S"] {
            assert!(parse_timeout(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn messages_are_percent_encoded_and_bounded() {
        assert_eq!(percent_encode("plain text"), "plain text");
        assert_eq!(percent_encode("50% é\n"), "50%25 %C3%A9%0A");
        let long = "é".repeat(MAX_MESSAGE_LEN);
        let s = Status::internal(long);
        let enc = s.encoded_message();
        // 512 two-byte chars fit in 1024 bytes, each encoded as 6 characters.
        assert_eq!(enc.len(), MAX_MESSAGE_LEN / 2 * 6);
    }

    #[test]
    fn header_values_match_codes() {
        assert_eq!(Code::Ok.header_value(), "0");
        assert_eq!(Code::Unauthenticated.header_value(), "16");
        assert_eq!(Code::DeadlineExceeded.header_value(), "4");
    }
}
