//! Encoding response heads. Sans-I/O: builds bytes into a caller-owned buffer.

use std::io::Write;

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    Fixed(u64),
    Chunked,
    /// Until the connection closes (HTTP/1.0 clients, where chunked does not exist).
    UntilClose,
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        206 => "Partial Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Headers every Git smart-HTTP response carries: git and proxies must never cache them.
pub const NO_CACHE: [(&str, &str); 3] = [
    ("Expires", "Fri, 01 Jan 1980 00:00:00 GMT"),
    ("Pragma", "no-cache"),
    ("Cache-Control", "no-cache, max-age=0, must-revalidate"),
];

/// Appends a complete response head to `out`.
pub fn encode_head(
    out: &mut Vec<u8>,
    status: u16,
    headers: &[(&str, &str)],
    length: BodyLength,
    keep_alive: bool,
) {
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    match length {
        BodyLength::Fixed(n) => {
            let _ = write!(out, "Content-Length: {n}\r\n");
        }
        BodyLength::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        BodyLength::UntilClose => {}
    }
    let keep = keep_alive && length != BodyLength::UntilClose;
    out.extend_from_slice(if keep {
        b"Connection: keep-alive\r\n\r\n"
    } else {
        b"Connection: close\r\n\r\n"
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let mut out = Vec::new();
        encode_head(
            &mut out,
            404,
            &[("Content-Type", "text/plain")],
            BodyLength::Fixed(3),
            true,
        );
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n"
        );
        out.clear();
        encode_head(&mut out, 200, &[], BodyLength::UntilClose, true);
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
    }
}
