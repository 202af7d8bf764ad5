//! A minimal HTTP/1.1 client for one virtual client: [`parse_response_head`] and
//! [`encode_head`] are the sans-I/O part (bounded, on top of `httparse`); [`Conn`] owns one
//! monoio TCP stream, writes requests (whole, or with a body streamed from shared [`Bytes`]
//! blocks) and streams response bodies to a caller's sink without buffering them whole. Chunked
//! bodies are decoded with the server's own [`gitplane::http::chunked`] decoder (the coding is
//! symmetric).

use std::net::SocketAddr;

use bytes::Bytes;
use gitplane::http::chunked::{ChunkedDecoder, ChunkedError};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use thiserror::Error;

use crate::net::NetError;

/// Longest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Read size: big enough that a pack arrives in few reads, small enough for thousands of clients.
const READ_CHUNK: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;

#[derive(Debug, Error)]
pub enum HttpError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("malformed response head: {reason}")]
    BadHead { reason: String },
    #[error("HTTP {status} from the server: {excerpt}")]
    Status { status: u16, excerpt: String },
    #[error("bad chunked response body: {0}")]
    Chunked(#[from] ChunkedError),
    #[error("response body larger than the {limit} bytes expected")]
    BodyTooLarge { limit: usize },
}

impl HttpError {
    /// A short, stable name for the errors-by-kind table.
    pub fn kind(&self) -> String {
        match self {
            Self::Net(e) => e.kind().into(),
            Self::HeadTooLarge
            | Self::BadHead { .. }
            | Self::Chunked(_)
            | Self::BodyTooLarge { .. } => "http_protocol".into(),
            Self::Status { status, .. } => format!("http_{status}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// Ends when the server closes (HTTP/1.0 style).
    Close,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub framing: Framing,
    /// The server will keep the connection open after this response.
    pub keep_alive: bool,
}

/// Parses the response head at the start of `buf`: `Ok(None)` while incomplete.
///
/// # Errors
/// On a malformed head or one larger than [`MAX_HEAD`].
pub fn parse_response_head(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let consumed = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(HttpError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(HttpError::BadHead {
                reason: e.to_string(),
            })
        }
    };
    let status = resp.code.unwrap_or(0);
    let http11 = resp.version == Some(1);
    let mut length = None;
    let mut chunked = false;
    let mut close = !http11;
    for h in resp.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        if h.name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| HttpError::BadHead {
                        reason: format!("bad Content-Length `{}`", value.escape_default()),
                    })?,
            );
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        }
    }
    let framing = if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Length(0)
    } else {
        close = true;
        Framing::Close
    };
    Ok(Some((
        ResponseHead {
            status,
            framing,
            keep_alive: !close,
        },
        consumed,
    )))
}

/// One request to send.
pub struct Request<'a> {
    pub method: &'static str,
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// Serialises the head of `req` into `out` (cleared first). `content_length` is sent when given;
/// [`encode_request`] gives it for every POST and every request with a body.
pub fn encode_head(
    out: &mut Vec<u8>,
    req: &Request<'_>,
    authority: &str,
    content_length: Option<u64>,
) {
    use std::io::Write;
    out.clear();
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: gitplane-load/{}\r\n",
        req.method,
        req.path,
        authority,
        env!("CARGO_PKG_VERSION")
    );
    for (k, v) in req.headers {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    if let Some(n) = content_length {
        let _ = write!(out, "Content-Length: {n}\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Serialises the head and body of `req` into `out` (cleared first).
pub fn encode_request(out: &mut Vec<u8>, req: &Request<'_>, authority: &str) {
    let length = (req.method == "POST" || !req.body.is_empty()).then_some(req.body.len() as u64);
    encode_head(out, req, authority, length);
    out.extend_from_slice(req.body);
}

/// One keep-alive connection with its read buffer (`buf[pos..]` is unread).
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    wbuf: Vec<u8>,
    /// The server announced it will close after the current response.
    pub closing: bool,
}

impl Conn {
    /// # Errors
    /// When the TCP connection cannot be made.
    pub async fn connect(addr: SocketAddr) -> Result<Self, HttpError> {
        let stream = TcpStream::connect_addr(addr)
            .await
            .map_err(|source| NetError::Connect { addr, source })?;
        // Requests are written whole; Nagle would only delay the small ones.
        let _ = stream.set_nodelay(true);
        Ok(Self {
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
            pos: 0,
            wbuf: Vec::with_capacity(1024),
            closing: false,
        })
    }

    /// Sends `req` and reads the response head. A status other than 200 is an error carrying an
    /// excerpt of the body (the connection should then be dropped).
    ///
    /// # Errors
    /// On I/O failure, a malformed head, or a non-200 status.
    pub async fn send(
        &mut self,
        req: &Request<'_>,
        authority: &str,
    ) -> Result<ResponseHead, HttpError> {
        let mut wbuf = std::mem::take(&mut self.wbuf);
        encode_request(&mut wbuf, req, authority);
        self.write_head(wbuf).await?;
        self.read_head().await
    }

    /// Sends the head of `req` (its `body` is ignored) with `Content-Length: len`, then `body`
    /// piece by piece, and reads the response head as [`send`](Self::send) does. The pieces are
    /// written as they are (no copy), so a large body costs no more memory than its pieces.
    ///
    /// # Errors
    /// As [`send`](Self::send); also when the pieces do not add up to `len`.
    pub async fn send_streamed(
        &mut self,
        req: &Request<'_>,
        authority: &str,
        len: u64,
        body: impl IntoIterator<Item = Bytes>,
    ) -> Result<ResponseHead, HttpError> {
        let mut wbuf = std::mem::take(&mut self.wbuf);
        encode_head(&mut wbuf, req, authority, Some(len));
        self.write_head(wbuf).await?;
        let mut sent = 0u64;
        for piece in body {
            sent += piece.len() as u64;
            let (res, _) = self.stream.write_all(piece).await;
            res.map_err(NetError::io("writing the request body"))?;
        }
        if sent != len {
            // A caller bug, but the server would wait for bytes that never come: fail loudly.
            return Err(HttpError::BadHead {
                reason: format!("request body of {sent} bytes announced as {len}"),
            });
        }
        self.read_head().await
    }

    async fn write_head(&mut self, wbuf: Vec<u8>) -> Result<(), HttpError> {
        let (res, wbuf) = self.stream.write_all(wbuf).await;
        self.wbuf = wbuf;
        res.map_err(NetError::io("writing the request"))?;
        Ok(())
    }

    async fn read_head(&mut self) -> Result<ResponseHead, HttpError> {
        let head = loop {
            if let Some((head, n)) = parse_response_head(self.unread())? {
                self.pos += n;
                break head;
            }
            if self.fill().await? == 0 {
                return Err(NetError::Eof {
                    during: "before the response head",
                }
                .into());
            }
        };
        self.closing = !head.keep_alive;
        if head.status != 200 {
            let mut excerpt = Vec::new();
            let _ = self
                .read_body(head.framing, |d| {
                    if excerpt.len() < 200 {
                        excerpt.extend_from_slice(&d[..d.len().min(200 - excerpt.len())]);
                    }
                    Ok::<(), HttpError>(())
                })
                .await;
            return Err(HttpError::Status {
                status: head.status,
                excerpt: String::from_utf8_lossy(&excerpt)
                    .trim()
                    .escape_default()
                    .to_string(),
            });
        }
        Ok(head)
    }

    /// Reads a whole body of at most `limit` bytes (a JSON answer, say).
    ///
    /// # Errors
    /// As [`read_body`](Self::read_body); [`HttpError::BodyTooLarge`] past `limit`.
    pub async fn read_small_body(
        &mut self,
        framing: Framing,
        limit: usize,
    ) -> Result<Vec<u8>, HttpError> {
        let mut body = Vec::new();
        self.read_body(framing, |d| {
            if body.len() + d.len() > limit {
                return Err(HttpError::BodyTooLarge { limit });
            }
            body.extend_from_slice(d);
            Ok(())
        })
        .await?;
        Ok(body)
    }

    /// Streams the body framed by `framing` into `sink`, one contiguous piece at a time.
    ///
    /// # Errors
    /// On I/O failure, bad framing, or the first error of `sink`.
    pub async fn read_body<E>(
        &mut self,
        framing: Framing,
        mut sink: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E>
    where
        E: From<HttpError>,
    {
        match framing {
            Framing::Length(mut left) => {
                while left > 0 {
                    if self.unread().is_empty() && self.fill().await? == 0 {
                        return Err(HttpError::from(NetError::Eof {
                            during: "in a Content-Length body",
                        })
                        .into());
                    }
                    let avail = self.unread();
                    let take = usize::try_from(left).map_or(avail.len(), |l| l.min(avail.len()));
                    sink(&avail[..take])?;
                    self.pos += take;
                    left -= take as u64;
                }
            }
            Framing::Chunked => {
                let mut dec = ChunkedDecoder::new();
                loop {
                    let d = dec.decode(self.unread()).map_err(HttpError::from)?;
                    if !d.data.is_empty() {
                        sink(&self.unread()[d.data.clone()])?;
                    }
                    self.pos += d.consumed;
                    if d.done {
                        break;
                    }
                    if d.consumed == 0 && d.data.is_empty() && self.fill().await? == 0 {
                        return Err(HttpError::from(NetError::Eof {
                            during: "in a chunked body",
                        })
                        .into());
                    }
                }
            }
            Framing::Close => loop {
                if !self.unread().is_empty() {
                    sink(self.unread())?;
                    self.pos = self.buf.len();
                }
                if self.fill().await? == 0 {
                    self.closing = true;
                    break;
                }
            },
        }
        Ok(())
    }

    fn unread(&self) -> &[u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    /// Reads more bytes after the unread ones; returns how many (0 at EOF).
    async fn fill(&mut self) -> Result<usize, HttpError> {
        // Compact: move the unread tail to the front so the buffer never grows past what one
        // read plus one partial frame needs.
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let len = self.buf.len();
        if self.buf.capacity() - len < READ_CHUNK / 2 {
            self.buf.reserve(READ_CHUNK);
        }
        let cap = self.buf.capacity();
        let buf = std::mem::take(&mut self.buf);
        let (res, slice) = self.stream.read(buf.slice_mut(len..cap)).await;
        self.buf = slice.into_inner();
        Ok(res.map_err(NetError::io("reading the response"))?)
    }
}

/// The connection of one virtual client: made on first use, kept while the server keeps it
/// alive, and made again when the server closes it or the next request goes elsewhere.
#[derive(Default)]
pub struct Link {
    current: Option<(SocketAddr, Conn)>,
}

impl Link {
    /// A connection to `addr` ready for a request.
    ///
    /// # Errors
    /// When a new connection is needed and cannot be made.
    pub async fn to(&mut self, addr: SocketAddr) -> Result<&mut Conn, HttpError> {
        let conn = match self.current.take() {
            Some((a, c)) if a == addr && !c.closing => c,
            _ => Conn::connect(addr).await?,
        };
        Ok(&mut self.current.insert((addr, conn)).1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_heads_split_anywhere() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: x\r\nTransfer-Encoding: chunked\r\n\r\nBODY";
        for cut in 0..raw.len() - 4 {
            assert_eq!(parse_response_head(&raw[..cut]).unwrap(), None, "cut {cut}");
        }
        let (head, n) = parse_response_head(raw).unwrap().unwrap();
        assert_eq!(n, raw.len() - 4);
        assert_eq!(head.framing, Framing::Chunked);
        assert!(head.keep_alive);
    }

    #[test]
    fn framing_and_keep_alive() {
        let (h, _) = parse_response_head(
            b"HTTP/1.1 401 No\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (h.status, h.framing, h.keep_alive),
            (401, Framing::Length(5), false)
        );
        let (h, _) = parse_response_head(b"HTTP/1.0 200 OK\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        assert!(parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse_response_head(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn encodes_requests() {
        let mut out = Vec::new();
        encode_request(
            &mut out,
            &Request {
                method: "POST",
                path: "/o/r.git/git-upload-pack",
                headers: &[("Git-Protocol", "version=2")],
                body: b"0000",
            },
            "h:1",
        );
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("POST /o/r.git/git-upload-pack HTTP/1.1\r\nHost: h:1\r\n"));
        assert!(text.ends_with("Git-Protocol: version=2\r\nContent-Length: 4\r\n\r\n0000"));

        // A streamed PUT announces its length; a GET without a body announces none.
        let put = Request {
            method: "PUT",
            path: "/o",
            headers: &[],
            body: &[],
        };
        encode_head(&mut out, &put, "h", Some(1 << 20));
        assert!(String::from_utf8_lossy(&out).ends_with("Content-Length: 1048576\r\n\r\n"));
        let get = Request {
            method: "GET",
            ..put
        };
        encode_request(&mut out, &get, "h");
        assert!(!String::from_utf8_lossy(&out).contains("Content-Length"));
    }
}
