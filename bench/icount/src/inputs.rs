//! Deterministic inputs for the hot-path benches, shared by the criterion benches
//! (`bench/benches`) and the instruction-count cases (`main.rs`). No random numbers and no clock:
//! the same bytes on every run and every machine, so an instruction count moves only when the
//! code does.

use std::fmt::Write as _;
use std::io::Write as _;

use gitplane_wire::git::pktline;

/// `git fetch` over smart HTTP v2: the POST that carries the negotiation (327 bytes).
pub const UPLOAD_PACK_POST_HEAD: &[u8] = b"POST /acme/widgets.git/git-upload-pack HTTP/1.1\r\n\
Host: git.example.com\r\nUser-Agent: git/2.47.3\r\nAccept-Encoding: deflate, gzip\r\n\
Authorization: Basic YWRtaW46c2VjcmV0LXBhc3N3b3Jk\r\n\
Content-Type: application/x-git-upload-pack-request\r\n\
Accept: application/x-git-upload-pack-result\r\nGit-Protocol: version=2\r\n\
Content-Length: 1234\r\n\r\n";

/// The first request of every clone (203 bytes).
pub const INFO_REFS_GET_HEAD: &[u8] =
    b"GET /acme/widgets.git/info/refs?service=git-upload-pack HTTP/1.1\r\n\
Host: git.example.com\r\nUser-Agent: git/2.47.3\r\nAccept: */*\r\n\
Accept-Encoding: deflate, gzip\r\nGit-Protocol: version=2\r\nPragma: no-cache\r\n\r\n";

/// Repository names as they arrive in request paths and SSH commands: mostly valid, plus the
/// rejections the validator exists for (traversal, hidden, lock files, option-like, too long).
pub const REPO_NAMES: [&str; 16] = [
    "acme/widgets",
    "torvalds/linux",
    "rust-lang/rust",
    "git/git",
    "a-b.c_d/e.f-g",
    "Acme-Corp/Widgets.Service_2",
    "bench/fixture",
    "alice/tools",
    "../etc/passwd",
    "acme/.hidden",
    "acme/widgets.lock",
    "-upload-pack/x",
    "acme/wid gets",
    "acme",
    "acme/widgets/extra",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/x",
];

/// splitmix64: a fixed, well-mixed sequence for ids and sizes.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The `i`-th SHA-1-sized object id (40 hex digits).
pub fn sha1_hex(i: u64) -> String {
    format!(
        "{:016x}{:016x}{:08x}",
        mix(i),
        mix(i + 1),
        mix(i + 2) as u32
    )
}

/// The `i`-th SHA-256 object id (64 lowercase hex digits), as LFS uses them.
pub fn oid(i: u64) -> String {
    let mut s = String::with_capacity(64);
    for k in 0..4 {
        write!(s, "{:016x}", mix(i * 4 + k)).expect("writing to a String");
    }
    s
}

/// A v2 fetch negotiation: `want`/`have` pkt-lines of 40-hex ids and a flush, as git sends it.
pub fn negotiation(lines: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, line) in have_lines(lines).iter().enumerate() {
        let line = if i % 4 == 0 {
            line.replacen("have", "want", 1)
        } else {
            line.clone()
        };
        pktline::encode_str(&mut out, &line).expect("a 46-byte line fits a pkt-line");
    }
    out.extend_from_slice(pktline::FLUSH);
    out
}

/// `have <id>\n` lines, the text the server's negotiation encoder writes as pkt-lines.
pub fn have_lines(lines: usize) -> Vec<String> {
    (0..lines as u64)
        .map(|i| format!("have {}\n", sha1_hex(i)))
        .collect()
}

/// Side-band pack data: full-size packets, as upload-pack streams a pack.
pub fn sideband(bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes + bytes / 100);
    let mut payload = vec![0x5a; pktline::MAX_PAYLOAD_LEN];
    payload[0] = 1;
    while out.len() < bytes {
        pktline::encode_data(&mut out, &payload).expect("a max-size payload fits");
    }
    out
}

/// `body` framed as HTTP/1.1 chunks of `chunk` bytes, as git sends a pushed pack through a proxy.
pub fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / chunk * 10 + 16);
    for piece in body.chunks(chunk) {
        write!(out, "{:x}\r\n", piece.len()).expect("writing to a Vec");
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Deterministic bytes (not all one value, so nothing can shortcut on them).
pub fn bytes(len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (mix(i / 8) >> (i % 8 * 8)) as u8)
        .collect()
}

/// A gRPC request stream: `messages` length-prefixed, uncompressed messages of 40 to 2,000
/// bytes back to back, as the h2 layer hands them to the frame reader.
pub fn grpc_stream(messages: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..messages as u64 {
        let len = 40 + (mix(i) % 1961) as usize;
        out.push(0);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&bytes(len));
    }
    out
}

/// What git-lfs 3.x sends to `objects/batch` for an upload of `objects` objects.
pub fn lfs_batch_request(objects: usize) -> Vec<u8> {
    let mut s = String::from(
        r#"{"operation":"upload","transfers":["lfs-standalone-file","basic","ssh"],"ref":{"name":"refs/heads/main"},"objects":["#,
    );
    for i in 0..objects as u64 {
        if i > 0 {
            s.push(',');
        }
        write!(
            s,
            r#"{{"oid":"{}","size":{}}}"#,
            oid(i),
            1 + mix(i) % (64 << 20)
        )
        .expect("writing to a String");
    }
    s.push_str(r#"],"hash_algo":"sha256"}"#);
    s.into_bytes()
}

/// A `git-lfs-transfer` upload session as git-lfs 3.3 sends it: `version 1`, a `batch` of
/// `objects` objects, one `put-object` whose `data_bytes` arrive in packets of at most
/// `packet` bytes, a `verify-object` and `quit`.
pub fn lfs_transfer_session(objects: usize, data_bytes: usize, packet: usize) -> Vec<u8> {
    fn line(out: &mut Vec<u8>, text: &str) {
        pktline::encode_str(out, text).expect("a short line fits a pkt-line");
    }
    let mut s = Vec::new();
    line(&mut s, "version 1\n");
    s.extend_from_slice(pktline::FLUSH);
    line(&mut s, "batch\n");
    line(&mut s, "transfer=ssh\n");
    line(&mut s, "hash-algo=sha256\n");
    line(&mut s, "refname=refs/heads/main\n");
    s.extend_from_slice(pktline::DELIM);
    for i in 0..objects as u64 {
        line(&mut s, &format!("{} {}\n", oid(i), 1 + mix(i) % (64 << 20)));
    }
    s.extend_from_slice(pktline::FLUSH);
    let put = oid(0);
    line(&mut s, &format!("put-object {put}\n"));
    line(&mut s, &format!("size={data_bytes}\n"));
    s.extend_from_slice(pktline::DELIM);
    for piece in bytes(data_bytes).chunks(packet) {
        pktline::encode_data(&mut s, piece).expect("packet size is within the pkt-line limit");
    }
    s.extend_from_slice(pktline::FLUSH);
    line(&mut s, &format!("verify-object {put}\n"));
    line(&mut s, &format!("size={data_bytes}\n"));
    s.extend_from_slice(pktline::FLUSH);
    line(&mut s, "quit\n");
    s.extend_from_slice(pktline::FLUSH);
    s
}
