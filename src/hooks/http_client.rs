//! A minimal HTTP/1.1 client for webhook deliveries: one `POST` per connection over a tokio
//! `TcpStream`, `http://` only. Hand-written rather than a client crate because all a webhook
//! needs is "send this body, read the status", and no client crate here comes without TLS stacks
//! or a second async runtime's worth of dependencies. Request building and URL/response parsing
//! are sans-I/O ([`HttpUrl::parse`], [`build_post`], [`parse_status`]); only [`post`] does I/O,
//! bounded by one deadline and by a cap on the response head.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head read; the body is never read.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum HttpClientError {
    #[error("webhook URL `{0}` is not supported: use http://HOST[:PORT]/PATH")]
    BadUrl(String),
    #[error("connecting to {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("talking to {addr}: {message}")]
    Io { addr: String, message: String },
    #[error("no complete answer from {addr} within {secs} s")]
    Timeout { addr: String, secs: u64 },
    #[error("malformed HTTP response from {addr}: {message}")]
    BadResponse { addr: String, message: String },
}

/// A parsed `http://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `HOST:PORT` (IPv6 hosts in brackets), as given to connect.
    pub authority: String,
    /// The `Host` header value.
    pub host_header: String,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<Self, HttpClientError> {
        let bad = || HttpClientError::BadUrl(url.chars().take(200).collect());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        if authority.is_empty()
            || authority.contains('@')
            || path.bytes().any(|b| b.is_ascii_control() || b == b' ')
            || authority.bytes().any(|b| b.is_ascii_control() || b == b' ')
        {
            return Err(bad());
        }
        // HOST, HOST:PORT, [V6] or [V6]:PORT.
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (h, after) = v6.split_once(']').ok_or_else(bad)?;
                let port = match after {
                    "" => None,
                    p => Some(p.strip_prefix(':').ok_or_else(bad)?),
                };
                (format!("[{h}]"), port)
            }
            None => match authority.split_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (authority.to_owned(), None),
            },
        };
        let port = port.unwrap_or("80");
        if host.is_empty()
            || host.contains(':') && !host.starts_with('[')
            || port.is_empty()
            || !port.bytes().all(|b| b.is_ascii_digit())
            || port.parse::<u16>().is_err()
        {
            return Err(bad());
        }
        let with_port = format!("{host}:{port}");
        Ok(Self {
            authority: with_port,
            host_header: authority.to_owned(),
            path,
        })
    }
}

/// The bytes of a `POST` with a JSON body and the given extra headers.
pub fn build_post(url: &HttpUrl, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: gitplane-hooks/{}\r\n",
        url.path,
        url.host_header,
        body.len(),
        env!("CARGO_PKG_VERSION"),
    );
    for (k, v) in headers {
        // Header values are ours (hex, ids); strip CR/LF anyway so nothing can split the head.
        let v: String = v.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut out = req.into_bytes();
    out.extend_from_slice(body);
    out
}

/// The outcome of parsing what a server sent so far.
#[derive(Debug, PartialEq, Eq)]
pub enum StatusParse {
    Complete(u16),
    Incomplete,
}

/// Parses the status out of a response head (interim 1xx responses are skipped).
pub fn parse_status(buf: &[u8]) -> Result<StatusParse, String> {
    let mut rest = buf;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(rest) {
            Ok(httparse::Status::Complete(n)) => {
                let code = resp.code.unwrap_or(0);
                if (100..200).contains(&code) {
                    rest = &rest[n..];
                    continue;
                }
                return Ok(StatusParse::Complete(code));
            }
            Ok(httparse::Status::Partial) => return Ok(StatusParse::Incomplete),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// POSTs `body` to `url`; returns the response status. The whole exchange (connect, send,
/// read the head) must finish within `timeout`.
pub async fn post(
    url: &HttpUrl,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<u16, HttpClientError> {
    let addr = url.authority.clone();
    let exchange = async {
        let mut stream = TcpStream::connect(&addr)
            .await
            .map_err(|e| HttpClientError::Connect {
                addr: addr.clone(),
                message: e.to_string(),
            })?;
        let _ = stream.set_nodelay(true);
        let io = |e: std::io::Error| HttpClientError::Io {
            addr: addr.clone(),
            message: e.to_string(),
        };
        stream
            .write_all(&build_post(url, headers, body))
            .await
            .map_err(io)?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                return Err(HttpClientError::BadResponse {
                    addr: addr.clone(),
                    message: "connection closed before a complete status line".into(),
                });
            }
            buf.extend_from_slice(&chunk[..n]);
            match parse_status(&buf) {
                Ok(StatusParse::Complete(code)) => return Ok(code),
                Ok(StatusParse::Incomplete) if buf.len() < MAX_RESPONSE_HEAD => {}
                Ok(StatusParse::Incomplete) => {
                    return Err(HttpClientError::BadResponse {
                        addr: addr.clone(),
                        message: format!("response head over {MAX_RESPONSE_HEAD} bytes"),
                    })
                }
                Err(message) => {
                    return Err(HttpClientError::BadResponse {
                        addr: addr.clone(),
                        message,
                    })
                }
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(HttpClientError::Timeout {
            addr: url.authority.clone(),
            secs: timeout.as_secs(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = HttpUrl::parse("http://127.0.0.1:8080/hook?x=1").unwrap();
        assert_eq!(u.authority, "127.0.0.1:8080");
        assert_eq!(u.path, "/hook?x=1");
        let u = HttpUrl::parse("http://example.com").unwrap();
        assert_eq!(u.authority, "example.com:80");
        assert_eq!(u.host_header, "example.com");
        assert_eq!(u.path, "/");
        let u = HttpUrl::parse("http://[::1]:9/p").unwrap();
        assert_eq!(u.authority, "[::1]:9");
        let u = HttpUrl::parse("http://[::1]/p").unwrap();
        assert_eq!(u.authority, "[::1]:80");
        for bad in [
            "http://x:/",
            "http://x:99999/",
            "http://[::1/",
            "https://x/",
            "ftp://x",
            "http://",
            "http://u@x/",
            "http://x/a b",
            "http://::1/",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn builds_a_post() {
        let u = HttpUrl::parse("http://h:1/p").unwrap();
        let req = build_post(&u, &[("X-A", "b\r\nEvil: 1")], b"{}");
        let text = String::from_utf8(req).unwrap();
        assert!(
            text.starts_with("POST /p HTTP/1.1\r\nHost: h:1\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 2\r\n"));
        assert!(text.contains("X-A: bEvil: 1\r\n"));
        assert!(text.ends_with("\r\n\r\n{}"));
    }

    #[test]
    fn parses_status_in_pieces() {
        let full = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nA: b\r\n\r\n";
        for cut in 0..full.len() {
            let r = parse_status(&full[..cut]).unwrap();
            assert_eq!(r, StatusParse::Incomplete, "cut at {cut}");
        }
        assert_eq!(parse_status(full).unwrap(), StatusParse::Complete(204));
        assert!(parse_status(b"garbage\r\n\r\n").is_err());
    }
}
