//! A minimal S3 client that runs on the monoio shard: multipart upload (create, upload part,
//! complete, abort), ranged GET and PUT, signed with SigV4, over plain HTTP/1.1 to an
//! S3-compatible endpoint (MinIO, Ceph RGW, moto, or AWS through a local TLS-terminating proxy).
//!
//! Why not object_store or aws-sdk-s3: both run on tokio, so every byte would hop from the shard
//! to a sidecar thread and be copied out of the pinned pool into their own buffers; they also
//! bring a TLS stack built on aws-lc. This client streams a part straight from the pool buffer
//! that received it from the git-lfs client to the S3 socket. See docs/ARCHITECTURE.md.
//!
//! Verified before visible: an upload goes to its final key as a multipart upload that is only
//! completed after LFS has checked the SHA-256 and size; otherwise it is aborted, and S3 never
//! shows a partial or wrong object.

use std::collections::VecDeque;
use std::io;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::sigv4::{self, Credentials, SignRequest, UNSIGNED_PAYLOAD};
use crate::http::chunked::ChunkedDecoder;

/// Largest response body read into memory (XML answers, errors).
const MAX_SMALL_BODY: usize = 1 << 20;
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Parts of one upload whose bytes are all sent and whose answers are still awaited.
const PARTS_AWAITED: usize = 4;

#[derive(Debug, Clone)]
pub struct S3Settings {
    /// `host:port` of the endpoint.
    pub endpoint: String,
    pub bucket: String,
    /// Key prefix, e.g. `lfs/`.
    pub prefix: String,
    pub credentials: Credentials,
    /// Multipart part size (S3 needs at least 5 MiB for all but the last part).
    pub part_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("S3 connection to {endpoint}: {source}")]
    Io { endpoint: String, source: io::Error },
    #[error("S3 answered {status} to {op}: {body}")]
    Status {
        op: &'static str,
        status: u16,
        body: String,
    },
    #[error("S3 sent a malformed response to {op}: {reason}")]
    Protocol { op: &'static str, reason: String },
}

/// What a response head said.
struct ResponseHead {
    status: u16,
    content_length: Option<u64>,
    chunked: bool,
    etag: Option<String>,
}

/// A connection with a response being read: buffered bytes beyond the head come first.
pub struct Response {
    stream: TcpStream,
    buffered: Vec<u8>,
    head: ResponseHead,
}

#[derive(Clone)]
pub struct S3Client {
    settings: std::rc::Rc<S3Settings>,
}

/// The text of the first `<tag>...</tag>` in a small XML document.
fn xml_tag<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml.get(start..)?.find(&format!("</{tag}>"))? + start;
    xml.get(start..end)
}

impl S3Client {
    pub fn new(settings: S3Settings) -> Self {
        Self {
            settings: std::rc::Rc::new(settings),
        }
    }

    /// `/bucket/prefix/aa/bb/OID`, URI-encoded.
    fn path(&self, oid: &str) -> String {
        let s = &self.settings;
        let key = format!(
            "{}{}/{}/{oid}",
            s.prefix,
            oid.get(0..2).unwrap_or("xx"),
            oid.get(2..4).unwrap_or("xx")
        );
        sigv4::uri_encode(&format!("/{}/{key}", s.bucket), true)
    }

    pub fn part_size(&self) -> u64 {
        self.settings.part_size
    }

    fn io_err(&self, source: io::Error) -> S3Error {
        S3Error::Io {
            endpoint: self.settings.endpoint.clone(),
            source,
        }
    }

    /// Connects and sends a signed request head; the caller writes `content_length` body bytes.
    async fn send_head(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        extra: &[(&str, &str)],
        content_length: u64,
    ) -> Result<TcpStream, S3Error> {
        let s = &self.settings;
        let date = sigv4::amz_date(crate::clock::unix_now());
        let mut headers: Vec<(&str, &str)> = vec![
            ("host", s.endpoint.as_str()),
            ("x-amz-content-sha256", UNSIGNED_PAYLOAD),
            ("x-amz-date", date.as_str()),
        ];
        headers.extend_from_slice(extra);
        let auth = sigv4::authorization(
            &s.credentials,
            &SignRequest {
                method,
                path,
                query,
                headers: &headers,
                payload_sha256: UNSIGNED_PAYLOAD,
                amz_date: &date,
            },
        );
        let query_text = query
            .iter()
            .map(|(k, v)| {
                if v.is_empty() {
                    sigv4::uri_encode(k, false)
                } else {
                    format!(
                        "{}={}",
                        sigv4::uri_encode(k, false),
                        sigv4::uri_encode(v, false)
                    )
                }
            })
            .collect::<Vec<_>>()
            .join("&");
        let target = if query_text.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{query_text}")
        };
        let mut head = format!("{method} {target} HTTP/1.1\r\nAuthorization: {auth}\r\nContent-Length: {content_length}\r\nConnection: close\r\n");
        for (k, v) in &headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut stream = TcpStream::connect(s.endpoint.as_str())
            .await
            .map_err(|e| self.io_err(e))?;
        let (res, _) = stream.write_all(head.into_bytes()).await;
        res.map_err(|e| self.io_err(e))?;
        Ok(stream)
    }

    async fn read_head(
        &self,
        mut stream: TcpStream,
        op: &'static str,
    ) -> Result<Response, S3Error> {
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let mut head = ResponseHead {
                        status: resp.code.unwrap_or(0),
                        content_length: None,
                        chunked: false,
                        etag: None,
                    };
                    for h in resp.headers.iter() {
                        let v = String::from_utf8_lossy(h.value).trim().to_owned();
                        if h.name.eq_ignore_ascii_case("content-length") {
                            head.content_length = v.parse().ok();
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            head.chunked = v.eq_ignore_ascii_case("chunked");
                        } else if h.name.eq_ignore_ascii_case("etag") {
                            head.etag = Some(v);
                        }
                    }
                    let buffered = buf.split_off(n);
                    return Ok(Response {
                        stream,
                        buffered,
                        head,
                    });
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => {}
                Ok(httparse::Status::Partial) => {
                    return Err(S3Error::Protocol {
                        op,
                        reason: "response head too large".into(),
                    })
                }
                Err(e) => {
                    return Err(S3Error::Protocol {
                        op,
                        reason: e.to_string(),
                    })
                }
            }
            let spare = Vec::with_capacity(4096);
            let (res, chunk) = stream.read(spare).await;
            let n = res.map_err(|e| self.io_err(e))?;
            if n == 0 {
                return Err(S3Error::Protocol {
                    op,
                    reason: "connection closed before the response head".into(),
                });
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads a small response body whole (bounded).
    async fn small_body(&self, mut r: Response) -> Result<(ResponseHead, String), S3Error> {
        let mut raw = std::mem::take(&mut r.buffered);
        loop {
            let complete = match r.head.content_length {
                Some(n) => raw.len() as u64 >= n,
                None if r.head.chunked => chunked_complete(&raw),
                None => false,
            };
            if complete || raw.len() > MAX_SMALL_BODY {
                break;
            }
            let (res, chunk) = r.stream.read(Vec::with_capacity(8192)).await;
            match res.map_err(|e| self.io_err(e))? {
                0 => break,
                n => raw.extend_from_slice(&chunk[..n]),
            }
        }
        let body = if r.head.chunked { dechunk(&raw) } else { raw };
        Ok((r.head, String::from_utf8_lossy(&body).into_owned()))
    }

    async fn expect_ok(
        &self,
        r: Response,
        op: &'static str,
    ) -> Result<(ResponseHead, String), S3Error> {
        let (head, body) = self.small_body(r).await?;
        if !(200..300).contains(&head.status) {
            return Err(S3Error::Status {
                op,
                status: head.status,
                body,
            });
        }
        Ok((head, body))
    }

    pub async fn create_multipart(&self, oid: &str) -> Result<String, S3Error> {
        let stream = self
            .send_head("POST", &self.path(oid), &[("uploads", "")], &[], 0)
            .await?;
        let r = self.read_head(stream, "CreateMultipartUpload").await?;
        let (_, xml) = self.expect_ok(r, "CreateMultipartUpload").await?;
        xml_tag(&xml, "UploadId")
            .map(str::to_owned)
            .ok_or(S3Error::Protocol {
                op: "CreateMultipartUpload",
                reason: "no UploadId".into(),
            })
    }

    /// Starts one part; write exactly `len` bytes to the returned stream, then [`Self::finish_part`].
    pub async fn start_part(
        &self,
        oid: &str,
        upload_id: &str,
        number: u32,
        len: u64,
    ) -> Result<TcpStream, S3Error> {
        let n = number.to_string();
        self.send_head(
            "PUT",
            &self.path(oid),
            &[("partNumber", &n), ("uploadId", upload_id)],
            &[],
            len,
        )
        .await
    }

    /// Writes the next bytes of a part started with [`Self::start_part`].
    pub async fn write_part<B: monoio::buf::IoBuf>(
        &self,
        part: &mut TcpStream,
        buf: B,
    ) -> (Result<(), S3Error>, B) {
        let (res, buf) = part.write_all(buf).await;
        (res.map(drop).map_err(|e| self.io_err(e)), buf)
    }

    /// Reads the part's answer; returns its ETag.
    pub async fn finish_part(&self, stream: TcpStream) -> Result<String, S3Error> {
        let r = self.read_head(stream, "UploadPart").await?;
        let (head, _) = self.expect_ok(r, "UploadPart").await?;
        head.etag.ok_or(S3Error::Protocol {
            op: "UploadPart",
            reason: "no ETag".into(),
        })
    }

    pub async fn complete(
        &self,
        oid: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), S3Error> {
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (i, etag) in etags.iter().enumerate() {
            xml.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{etag}</ETag></Part>",
                i + 1
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let mut stream = self
            .send_head(
                "POST",
                &self.path(oid),
                &[("uploadId", upload_id)],
                &[],
                xml.len() as u64,
            )
            .await?;
        let (res, _) = stream.write_all(xml.into_bytes()).await;
        res.map_err(|e| self.io_err(e))?;
        let r = self.read_head(stream, "CompleteMultipartUpload").await?;
        let (_, body) = self.expect_ok(r, "CompleteMultipartUpload").await?;
        // S3 can answer 200 with an error document when completion fails late.
        if body.contains("<Error>") {
            return Err(S3Error::Status {
                op: "CompleteMultipartUpload",
                status: 200,
                body,
            });
        }
        Ok(())
    }

    pub async fn abort(&self, oid: &str, upload_id: &str) -> Result<(), S3Error> {
        let stream = self
            .send_head(
                "DELETE",
                &self.path(oid),
                &[("uploadId", upload_id)],
                &[],
                0,
            )
            .await?;
        let r = self.read_head(stream, "AbortMultipartUpload").await?;
        self.expect_ok(r, "AbortMultipartUpload").await.map(|_| ())
    }

    /// One multipart upload of `oid`. `send_parts` gets the upload id and returns the parts'
    /// ETags, or refuses; the upload is completed only after it succeeds and aborted otherwise,
    /// so S3 never shows a partial or refused object.
    pub async fn multipart<E: From<S3Error>>(
        &self,
        oid: &str,
        send_parts: impl AsyncFnOnce(&str) -> Result<Vec<String>, E>,
    ) -> Result<(), E> {
        let upload_id = self.create_multipart(oid).await?;
        let result = match send_parts(&upload_id).await {
            Ok(etags) => self
                .complete(oid, &upload_id, &etags)
                .await
                .map_err(E::from),
            Err(e) => Err(e),
        };
        if result.is_err() {
            if let Err(e) = self.abort(oid, &upload_id).await {
                tracing::warn!(%oid, error = %e, "cannot abort S3 multipart upload");
            }
        }
        result
    }

    /// An empty object (multipart needs at least one byte per upload on some servers).
    pub async fn put_empty(&self, oid: &str) -> Result<(), S3Error> {
        let stream = self.send_head("PUT", &self.path(oid), &[], &[], 0).await?;
        let r = self.read_head(stream, "PutObject").await?;
        self.expect_ok(r, "PutObject").await.map(|_| ())
    }

    /// Starts a ranged GET (inclusive `end`); read the body with [`Response::read_into`].
    pub async fn get(&self, oid: &str, start: u64, end: u64) -> Result<Response, S3Error> {
        let range = format!("bytes={start}-{end}");
        let stream = self
            .send_head("GET", &self.path(oid), &[], &[("range", &range)], 0)
            .await?;
        let r = self.read_head(stream, "GetObject").await?;
        if !(200..300).contains(&r.head.status) {
            let (head, body) = self.small_body(r).await?;
            return Err(S3Error::Status {
                op: "GetObject",
                status: head.status,
                body,
            });
        }
        Ok(r)
    }
}

/// The parts of one multipart upload, in order. A part's answer (its ETag) comes only once S3 has
/// stored it; awaiting it in the background lets the next part stream meanwhile, with at most
/// [`PARTS_AWAITED`] answers outstanding per upload.
pub struct Parts {
    client: S3Client,
    awaited: VecDeque<monoio::task::JoinHandle<Result<String, S3Error>>>,
    etags: Vec<String>,
}

impl Parts {
    pub fn new(client: &S3Client) -> Self {
        Self {
            client: client.clone(),
            awaited: VecDeque::new(),
            etags: Vec::new(),
        }
    }

    /// The number for the next part (S3 numbers parts from 1, up to 10,000).
    pub fn next_number(&self) -> Result<u32, S3Error> {
        u32::try_from(self.etags.len() + self.awaited.len() + 1)
            .ok()
            .filter(|n| *n <= 10_000)
            .ok_or(S3Error::Protocol {
                op: "UploadPart",
                reason: "more than 10,000 parts".into(),
            })
    }

    /// Takes a part whose bytes are all written; waits for the oldest answer first when
    /// [`PARTS_AWAITED`] are outstanding.
    pub async fn sent(&mut self, stream: TcpStream) -> Result<(), S3Error> {
        if self.awaited.len() >= PARTS_AWAITED {
            self.collect_oldest().await?;
        }
        let client = self.client.clone();
        self.awaited.push_back(monoio::spawn(
            async move { client.finish_part(stream).await },
        ));
        Ok(())
    }

    async fn collect_oldest(&mut self) -> Result<(), S3Error> {
        if let Some(answer) = self.awaited.pop_front() {
            self.etags.push(answer.await?);
        }
        Ok(())
    }

    /// Every part's ETag, in part order, once S3 has answered for all of them.
    pub async fn finish(mut self) -> Result<Vec<String>, S3Error> {
        while !self.awaited.is_empty() {
            self.collect_oldest().await?;
        }
        Ok(std::mem::take(&mut self.etags))
    }
}

impl Response {
    /// Reads the next body bytes into `buf` (up to its capacity); Ok(0) at the end.
    pub async fn read_into<B: monoio::buf::IoBufMut>(&mut self, buf: B) -> (io::Result<usize>, B) {
        let mut buf = buf;
        if !self.buffered.is_empty() {
            let cap = buf.bytes_total();
            let n = cap.min(self.buffered.len());
            // SAFETY: writing n <= capacity bytes into the buffer's own memory.
            unsafe {
                std::ptr::copy_nonoverlapping(self.buffered.as_ptr(), buf.write_ptr(), n);
                buf.set_init(n);
            }
            self.buffered.drain(..n);
            return (Ok(n), buf);
        }
        self.stream.read(buf).await
    }

    pub fn content_length(&self) -> Option<u64> {
        self.head.content_length
    }
}

fn chunked_complete(raw: &[u8]) -> bool {
    let mut dec = ChunkedDecoder::new();
    let mut at = 0;
    while let Some(rest) = raw.get(at..) {
        match dec.decode(rest) {
            Ok(d) if d.done => return true,
            Ok(d) if d.consumed == 0 => return false,
            Ok(d) => at += d.consumed,
            Err(_) => return true,
        }
    }
    false
}

fn dechunk(raw: &[u8]) -> Vec<u8> {
    let mut dec = ChunkedDecoder::new();
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(rest) = raw.get(at..) {
        match dec.decode(rest) {
            Ok(d) => {
                out.extend_from_slice(rest.get(d.data).unwrap_or_default());
                if d.done || d.consumed == 0 {
                    break;
                }
                at += d.consumed;
            }
            Err(_) => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_tags_and_chunked_bodies() {
        let xml = "<?xml version=\"1.0\"?><InitiateMultipartUploadResult><Bucket>b</Bucket><UploadId>abc-123</UploadId></InitiateMultipartUploadResult>";
        assert_eq!(xml_tag(xml, "UploadId"), Some("abc-123"));
        assert_eq!(xml_tag(xml, "Missing"), None);
        let raw = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        assert!(chunked_complete(raw));
        assert!(!chunked_complete(&raw[..10]));
        assert_eq!(dechunk(raw), b"hello world");
    }
}
