//! One pass of each hot path, as the server drives it, over inputs from [`crate::inputs`]. Used by
//! the instruction-count binary and by the criterion benches, so both measure the same code on
//! the same bytes. Each returns a number derived from its output, so the work cannot be
//! optimised away, and panics if its input fails to decode, so a broken codec cannot look fast.

use std::collections::BTreeMap;

use gitplane_wire::git::pktline::{self, PktDecode};
use gitplane_wire::git::repo_name::RepoName;
use gitplane_wire::http::chunked::ChunkedDecoder;
use gitplane_wire::http::head::{parse_request_head, HeadLimits, HeadParse};
use gitplane_wire::lfs::api::{self, ActionContext, BatchRequest, BatchResponse, Known};
use gitplane_wire::rpc::frame::{Encoding, MessageReader};
use gitplane_wire::ssh::lfs_transfer::{Decoder, Event, Step};
use sha2::{Digest, Sha256};

use crate::inputs;

/// Parses one request head; returns its length plus the decoded path's.
pub fn http_head(raw: &[u8], limits: &HeadLimits) -> u64 {
    match parse_request_head(raw, limits) {
        Ok(HeadParse::Complete { head, consumed }) => (consumed + head.path.len()) as u64,
        other => panic!("bench head did not parse: {other:?}"),
    }
}

/// Decodes a whole chunked body; returns the body bytes found.
pub fn chunked_decode(framed: &[u8]) -> u64 {
    let mut dec = ChunkedDecoder::new();
    let mut input = framed;
    let mut data = 0;
    while !dec.is_done() {
        let d = dec
            .decode(input)
            .expect("bench body has valid chunked framing");
        assert!(d.consumed > 0 || d.done, "bench body ended early");
        data += d.data.len();
        input = &input[d.consumed..];
    }
    data as u64
}

/// Decodes every pkt-line of `buf`; returns the packet count.
pub fn pktline_decode_all(mut buf: &[u8]) -> u64 {
    let mut n = 0;
    loop {
        match pktline::decode(buf) {
            Ok(PktDecode::Complete { consumed, .. }) => {
                n += 1;
                buf = &buf[consumed..];
            }
            Ok(PktDecode::Incomplete { .. }) if buf.is_empty() => return n,
            other => panic!("bench pkt-lines did not decode: {other:?}"),
        }
    }
}

/// Encodes `lines` as pkt-lines into `out` (cleared first, so its capacity is reused as the
/// server reuses its write buffer); returns the encoded length.
pub fn pktline_encode(out: &mut Vec<u8>, lines: &[String]) -> u64 {
    out.clear();
    for l in lines {
        pktline::encode_str(out, l).expect("bench lines fit a pkt-line");
    }
    out.len() as u64
}

/// Validates each name; returns how many were accepted.
pub fn repo_names(names: &[&str]) -> u64 {
    names.iter().filter(|n| RepoName::parse(n).is_ok()).count() as u64
}

/// Feeds a gRPC request stream to the frame reader in `data_frame`-byte pieces (h2's default
/// DATA frame is 16 KiB) and takes out every message; returns the payload bytes.
pub fn grpc_messages(stream: &[u8], data_frame: usize) -> u64 {
    let mut reader = MessageReader::new(4 << 20, Encoding::Identity);
    let mut bytes = 0;
    for piece in stream.chunks(data_frame) {
        reader.push(piece);
        while let Some(m) = reader
            .next_message()
            .expect("bench gRPC stream is well framed")
        {
            bytes += m.len();
        }
    }
    reader
        .finish()
        .expect("bench gRPC stream ends on a message boundary");
    bytes as u64
}

/// Decodes a whole `git-lfs-transfer` session; returns the number of events (requests, data
/// packets). Every request must be valid.
pub fn lfs_transfer_decode(session: &[u8], max_objects: usize) -> u64 {
    let mut dec = Decoder::new(max_objects);
    let mut buf = session;
    let mut events = 0;
    while !buf.is_empty() {
        match dec
            .decode(buf)
            .expect("bench session has valid pkt-line framing")
        {
            Step::Packet { consumed, event } => {
                if let Some(e) = event {
                    assert!(
                        !matches!(e, Event::Invalid(_)),
                        "bench session was refused: {e:?}"
                    );
                    events += 1;
                }
                buf = &buf[consumed..];
            }
            Step::Incomplete { needed } => panic!("bench session cut short ({needed} missing)"),
        }
    }
    events
}

/// SHA-256 of `data` fed in `piece`-byte updates, as uploads hash each received buffer.
pub fn sha256_stream(data: &[u8], piece: usize) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in data.chunks(piece) {
        h.update(p);
    }
    h.finalize().into()
}

/// An LFS batch round as the server's `objects/batch` handler does it, minus the store lookup
/// and the socket: parse the JSON body, check the request, answer every object, serialise.
pub struct LfsBatch {
    body: Vec<u8>,
    /// What the store would say per object: every fourth one is already linked here.
    known: Vec<Known>,
    header: BTreeMap<String, String>,
    expires_at: String,
}

/// `http://HOST/OWNER/NAME.git/info/lfs` as the handler builds it.
const LFS_BASE: &str = "http://git.example.com/acme/widgets.git/info/lfs";
/// The server's default `lfs.max_batch_objects` and `lfs.max_object_size`.
const MAX_BATCH_OBJECTS: usize = 1000;
const MAX_OBJECT_SIZE: u64 = 50 << 30;

impl LfsBatch {
    /// An upload request of `objects` objects (see [`inputs::lfs_batch_request`]).
    pub fn upload(objects: usize) -> Self {
        let body = inputs::lfs_batch_request(objects);
        let req: BatchRequest = serde_json::from_slice(&body).expect("bench batch JSON parses");
        let known = req
            .objects
            .iter()
            .enumerate()
            .map(|(i, o)| Known {
                stored_size: (i % 4 == 0).then_some(o.size as u64),
                linked: i % 4 == 0,
            })
            .collect();
        let header = BTreeMap::from([(
            "Authorization".to_owned(),
            "Basic YWRtaW46c2VjcmV0LXBhc3N3b3Jk".to_owned(),
        )]);
        Self {
            body,
            known,
            header,
            expires_at: api::rfc3339(1_798_761_599),
        }
    }

    pub fn objects(&self) -> usize {
        self.known.len()
    }

    pub fn request_len(&self) -> usize {
        self.body.len()
    }

    /// One round; returns the response body.
    pub fn run(&self) -> Vec<u8> {
        let req: BatchRequest =
            serde_json::from_slice(&self.body).expect("bench batch JSON parses");
        api::check_request(&req, MAX_BATCH_OBJECTS).expect("bench batch is acceptable");
        let ctx = ActionContext {
            base: LFS_BASE,
            header: &self.header,
            expires_in: 3600,
            expires_at: &self.expires_at,
            max_object_size: MAX_OBJECT_SIZE,
        };
        let objects = req
            .objects
            .iter()
            .zip(&self.known)
            .map(|(spec, k)| api::answer(req.operation, spec, *k, &ctx))
            .collect();
        let body = BatchResponse {
            transfer: "basic",
            objects,
            hash_algo: "sha256",
        };
        serde_json::to_vec(&body).expect("a batch response serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_decode_as_described() {
        let limits = HeadLimits::default();
        assert_eq!(inputs::UPLOAD_PACK_POST_HEAD.len(), 327);
        assert_eq!(inputs::INFO_REFS_GET_HEAD.len(), 203);
        assert!(http_head(inputs::UPLOAD_PACK_POST_HEAD, &limits) > 327);
        assert_eq!(
            chunked_decode(&inputs::chunked(&inputs::bytes(64 << 10), 1024)),
            64 << 10
        );
        assert_eq!(pktline_decode_all(&inputs::negotiation(1000)), 1001);
        assert_eq!(repo_names(&inputs::REPO_NAMES), 8, "8 valid, 8 rejected");
        let stream = inputs::grpc_stream(100);
        assert_eq!(grpc_messages(&stream, 16 << 10), stream.len() as u64 - 500);
        // version, batch, put-object, 4 data packets, data end, verify-object, quit.
        let session = inputs::lfs_transfer_session(100, 64 << 10, 16 << 10);
        assert_eq!(lfs_transfer_decode(&session, 1000), 10);
    }

    #[test]
    fn lfs_batch_answers_every_object() {
        let batch = LfsBatch::upload(100);
        let body: serde_json::Value = serde_json::from_slice(&batch.run()).expect("JSON answer");
        let objects = body["objects"].as_array().expect("objects");
        assert_eq!(objects.len(), 100);
        let uploads = objects
            .iter()
            .filter(|o| o.get("actions").is_some())
            .count();
        assert_eq!(uploads, 75, "a quarter are already linked here");
        assert!(objects.iter().all(|o| o.get("error").is_none()));
    }

    #[test]
    fn sha256_stream_matches_one_shot() {
        let data = inputs::bytes(300_000);
        assert_eq!(
            sha256_stream(&data, 64 << 10),
            <[u8; 32]>::from(Sha256::digest(&data))
        );
    }
}
