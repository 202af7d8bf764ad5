//! The gRPC repository API end to end, against a real `gitplane serve`:
//! - the Python grpcio suite (tests/rpc/client_test.py, stubs generated from proto/ at test time)
//!   on a scripted fixture with a 200 MB blob, checked against the git CLI;
//! - raw HTTP/2 streams (the h2 crate as a client) for what a well-behaved client never sends:
//!   malformed frames, bad compression, oversized messages, tiny deadlines;
//! - connections that hold without using (issue #17): raw sockets that send the HTTP/2 preface
//!   and nothing else, idle and silent h2 clients, beside a real grpcio channel.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::grpc::{call, connect, connect_io, frame, runtime, Answer};
use common::*;
use gitplane::rpc::pb::v1 as pb;
use prost::Message;

const RPC_CONFIG: &str = "[rpc]\nlisten = \"127.0.0.1:0\"\n";
const LIST_BRANCHES: &str = "/gitplane.v1.RepositoryService/ListBranches";

fn start() -> (Server, SocketAddr, String) {
    start_config(RPC_CONFIG)
}

fn start_config(config: &str) -> (Server, SocketAddr, String) {
    let server = Server::start_with(ServerOptions {
        config: Some(config.into()),
        ..ServerOptions::default()
    });
    let addr = *server
        .listening
        .get("rpc")
        .unwrap_or_else(|| panic!("no rpc listener reported: {:?}", server.listening));
    let token = std::fs::read_to_string(server.data_dir().join("rpc-token"))
        .expect("the server creates DATA/rpc-token")
        .trim()
        .to_owned();
    (server, addr, token)
}

fn require_grpcio() {
    let ok = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 with grpcio and grpcio-tools is required: run scripts/test.sh, which installs \
         them (python3 -m pip install grpcio grpcio-tools)"
    );
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn python_grpc_client_suite() {
    require_tool("python3");
    require_grpcio();
    let (server, addr, token) = start();
    server.create_repo("admin/fixture", false);
    let work = tempfile::tempdir().unwrap();
    let big_mb = "200";
    let out = Command::new("bash")
        .arg(root().join("tests/rpc/make_fixture.sh"))
        .arg(server.repo_path("admin/fixture"))
        .arg(work.path().join("work"))
        .arg(big_mb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fixture script failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stubs = work.path().join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    for (include, file) in [
        ("proto", "proto/gitplane/v1/repository.proto"),
        // Generated as top-level `health_pb2`: `grpc.health.v1` would shadow the grpc package.
        ("proto/grpc/health/v1", "proto/grpc/health/v1/health.proto"),
    ] {
        let out = Command::new("python3")
            .current_dir(root())
            .args(["-m", "grpc_tools.protoc", "-I", include])
            .arg(format!("--python_out={}", stubs.display()))
            .arg(format!("--grpc_python_out={}", stubs.display()))
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "grpc_tools.protoc {file} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new("python3")
        .arg(root().join("tests/rpc/client_test.py"))
        .env("RPC_ADDR", addr.to_string())
        .env("RPC_TOKEN", &token)
        .env("RPC_REPO", "admin/fixture")
        .env("RPC_BARE", server.repo_path("admin/fixture"))
        .env("RPC_PID", server.pid().to_string())
        .env("RPC_STUBS", &stubs)
        .env("RPC_BIG_MB", big_mb)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stderr);
    eprintln!("{report}");
    assert!(
        out.status.success(),
        "the Python gRPC client suite failed:\n{report}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        server.log()
    );
}

// ------------------------------------------------------------------------------------------------
// Raw HTTP/2

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn server_with_repo() -> (Server, SocketAddr, String) {
    server_with_repo_config(RPC_CONFIG)
}

fn server_with_repo_config(config: &str) -> (Server, SocketAddr, String) {
    let (server, addr, token) = start_config(config);
    server.create_repo("admin/small", false);
    let work = tempfile::tempdir().unwrap();
    make_worktree(work.path(), 3);
    git(
        work.path(),
        &[
            "push",
            "-q",
            server.repo_path("admin/small").to_str().unwrap(),
            "main",
        ],
    );
    (server, addr, token)
}

fn list_branches_request() -> Vec<u8> {
    pb::ListBranchesRequest {
        repository: "admin/small".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// (what, extra headers, DATA chunks, leave the stream open, expected grpc-status, part of
/// grpc-message)
type Case = (
    &'static str,
    Vec<(&'static str, &'static str)>,
    Vec<Vec<u8>>,
    bool,
    u8,
    &'static str,
);

#[test]
fn malformed_frames_end_only_their_stream() {
    let (server, addr, token) = server_with_repo();
    let auth = format!("Bearer {token}");
    let auth_h = ("authorization", auth.as_str());
    let req = list_branches_request();
    runtime().block_on(async {
        let c = connect(addr).await;
        let ok = |a: &Answer| {
            assert_eq!(a.grpc_status(), Some(0), "{a:?}");
            let resp = pb::ListBranchesResponse::decode(a.messages[0].clone()).unwrap();
            assert_eq!(resp.branches[0].name, "main");
        };
        ok(&call(&c, LIST_BRANCHES, &[auth_h], &[frame(0, &req)], false).await);

        let mut cases: Vec<Case> = vec![
            (
                "bad flag",
                vec![],
                vec![frame(2, &req)],
                false,
                13,
                "compressed flag",
            ),
            (
                "truncated",
                vec![],
                vec![{
                    let mut f = frame(0, &req);
                    f.truncate(8);
                    f
                }],
                false,
                13,
                "ended inside",
            ),
            (
                "oversized length, stream left open",
                vec![],
                vec![vec![0, 0x7f, 0xff, 0xff, 0xff]],
                true,
                8,
                "larger than the limit",
            ),
            (
                "compressed without grpc-encoding",
                vec![],
                vec![frame(1, &gzip(&req))],
                false,
                13,
                "grpc-encoding",
            ),
            (
                "unsupported encoding",
                vec![("grpc-encoding", "deflate")],
                vec![frame(1, &req)],
                false,
                12,
                "deflate",
            ),
            (
                "gzip bomb",
                vec![("grpc-encoding", "gzip")],
                vec![frame(1, &gzip(&vec![0u8; 8 << 20]))],
                false,
                8,
                "larger than the limit",
            ),
            (
                "not protobuf",
                vec![],
                vec![frame(0, b"\xff\xff\xff\xff")],
                false,
                3,
                "decode",
            ),
            (
                "two messages",
                vec![],
                vec![frame(0, &req), frame(0, &req)],
                false,
                12,
                "exactly one",
            ),
            ("no message", vec![], vec![], false, 13, "no message"),
            (
                "malformed grpc-timeout",
                vec![("grpc-timeout", "soon")],
                vec![frame(0, &req)],
                false,
                3,
                "grpc-timeout",
            ),
            (
                "1 ns deadline",
                vec![("grpc-timeout", "1n")],
                vec![frame(0, &req)],
                false,
                4,
                "deadline",
            ),
        ];
        for (what, headers, chunks, keep_open, code, text) in cases.drain(..) {
            let mut h = headers.clone();
            h.push(auth_h);
            let a = call(&c, LIST_BRANCHES, &h, &chunks, keep_open).await;
            assert_eq!(a.http_status, 200, "{what}");
            assert_eq!(a.grpc_status(), Some(code), "{what}: {a:?}");
            assert!(a.grpc_message().contains(text), "{what}: {a:?}");
            assert!(a.messages.is_empty(), "{what}");
            // The connection is still good.
            ok(&call(&c, LIST_BRANCHES, &[auth_h], &[frame(0, &req)], false).await);
        }
        // Unsupported encodings name the ones we take.
        let a = call(
            &c,
            LIST_BRANCHES,
            &[auth_h, ("grpc-encoding", "br")],
            &[frame(0, &req)],
            false,
        )
        .await;
        assert_eq!(
            a.headers.get("grpc-accept-encoding").unwrap(),
            "gzip,identity"
        );
        // A gzip-compressed request, split across DATA frames at an awkward place.
        let gz = frame(1, &gzip(&req));
        let a = call(
            &c,
            LIST_BRANCHES,
            &[auth_h, ("grpc-encoding", "gzip")],
            &[gz[..3].to_vec(), gz[3..].to_vec()],
            false,
        )
        .await;
        ok(&a);
        // Unknown method, no token, not gRPC.
        let a = call(
            &c,
            "/gitplane.v1.RepositoryService/Nope",
            &[auth_h],
            &[frame(0, &req)],
            false,
        )
        .await;
        assert_eq!(a.grpc_status(), Some(12), "{a:?}");
        let a = call(&c, LIST_BRANCHES, &[], &[frame(0, &req)], false).await;
        assert_eq!(a.grpc_status(), Some(16), "{a:?}");
        let a = call(
            &c,
            LIST_BRANCHES,
            &[auth_h, ("content-type", "text/plain")],
            &[frame(0, &req)],
            false,
        )
        .await;
        assert_eq!(a.http_status, 415);
        assert_eq!(a.grpc_status(), None);
    });
    // Every call was counted, by method and status code.
    let metrics = String::from_utf8_lossy(&raw_request(
        server.addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    ))
    .into_owned();
    let line = |needle: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(needle))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {needle} in /metrics:\n{metrics}"))
    };
    let m = "method=\"gitplane.v1.RepositoryService/ListBranches\"";
    assert!(line(&format!("gitplane_rpc_calls_total{{{m}}}")) >= 25.0);
    assert!(line(&format!("gitplane_rpc_responses_total{{{m},code=\"0\"}}")) >= 13.0);
    assert_eq!(
        line(&format!("gitplane_rpc_responses_total{{{m},code=\"4\"}}")),
        1.0
    );
    assert_eq!(
        line(&format!("gitplane_rpc_responses_total{{{m},code=\"16\"}}")),
        1.0
    );
    assert!(line(&format!("gitplane_rpc_duration_seconds_count{{{m}}}")) >= 25.0);
    assert!(metrics.contains(&format!(
        "gitplane_rpc_duration_seconds_bucket{{{m},le=\"+Inf\"}}"
    )));
}

#[test]
fn many_concurrent_streams_on_one_connection() {
    let (_server, addr, token) = server_with_repo();
    let auth = format!("Bearer {token}");
    let req = frame(0, &list_branches_request());
    runtime().block_on(async {
        let c = connect(addr).await;
        let calls = (0..64).map(|_| {
            let (c, auth, req) = (c.clone(), auth.clone(), req.clone());
            async move {
                call(
                    &c,
                    LIST_BRANCHES,
                    &[("authorization", &auth)],
                    &[req],
                    false,
                )
                .await
            }
        });
        let answers = futures_join_all(calls).await;
        assert_eq!(answers.len(), 64);
        for a in answers {
            assert_eq!(a.grpc_status(), Some(0), "{a:?}");
        }
    });
}

/// Runs futures concurrently on the current-thread runtime (no extra crate needed).
async fn futures_join_all<F: std::future::Future + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: 'static,
{
    let local = tokio::task::LocalSet::new();
    let handles: Vec<_> = futs.map(|f| local.spawn_local(f)).collect();
    local
        .run_until(async move {
            let mut out = Vec::new();
            for h in handles {
                out.push(h.await.unwrap());
            }
            out
        })
        .await
}

#[test]
fn token_file_is_created_private_and_reused() {
    let (server, _addr, token) = start();
    let path = server.data_dir().join("rpc-token");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
}

#[test]
fn sigterm_ends_health_watch_with_not_serving_and_exits_zero() {
    use gitplane::rpc::pb::health;
    let (mut server, addr, _token) = start();
    let req = frame(0, &health::HealthCheckRequest::default().encode_to_vec());
    let answer = runtime().block_on(async {
        let c = connect(addr).await;
        let watch = tokio::spawn({
            let c = c.clone();
            async move { call(&c, "/grpc.health.v1.Health/Watch", &[], &[req], false).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.signal(libc::SIGTERM);
        watch.await.unwrap()
    });
    assert_eq!(answer.grpc_status(), Some(0), "{answer:?}");
    let statuses: Vec<i32> = answer
        .messages
        .iter()
        .map(|m| {
            health::HealthCheckResponse::decode(m.clone())
                .unwrap()
                .status
        })
        .collect();
    use health::health_check_response::ServingStatus;
    assert_eq!(
        statuses,
        vec![
            ServingStatus::Serving as i32,
            ServingStatus::NotServing as i32
        ]
    );
    assert_eq!(
        server.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        server.log()
    );
}

/// A branch created over gRPC is on disk to stay before the call answers: libgit2 is told to
/// fsync what it writes (it does not by default). Checked by tracing the server's fsync calls
/// with strace while one CreateBranch runs (needs permission to ptrace the server: root, or
/// kernel.yama.ptrace_scope=0).
#[test]
fn created_branch_is_fsynced_before_the_answer() {
    require_tool("strace");
    let (server, addr, token) = server_with_repo();
    let trace = server.data_dir().join("fsync.trace");
    let mut strace = Command::new("strace");
    strace
        .args(["-f", "-qq", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(&trace);
    for task in std::fs::read_dir(format!("/proc/{}/task", server.pid())).unwrap() {
        strace.arg("-p").arg(task.unwrap().file_name());
    }
    let mut strace = strace
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run strace");
    // strace attaches before it writes anything; give it a moment and make sure it stayed.
    std::thread::sleep(Duration::from_millis(500));
    if let Some(status) = strace.try_wait().unwrap() {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut strace.stderr.take().unwrap(), &mut err).unwrap();
        panic!("strace could not attach to the server ({status}): {err}\nthis test needs ptrace permission: run as root or set kernel.yama.ptrace_scope=0");
    }
    let request = pb::CreateBranchRequest {
        repository: "admin/small".into(),
        name: "durable".into(),
        start_point: "main".into(),
    }
    .encode_to_vec();
    let auth = format!("Bearer {token}");
    let answer = runtime().block_on(async {
        let client = connect(addr).await;
        call(
            &client,
            "/gitplane.v1.RepositoryService/CreateBranch",
            &[("authorization", auth.as_str())],
            &[frame(0, &request)],
            false,
        )
        .await
    });
    // SIGINT: strace detaches and flushes its output.
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    strace.wait().unwrap();
    assert_eq!(answer.grpc_status(), Some(0), "{}", answer.grpc_message());
    assert!(server
        .repo_path("admin/small")
        .join("refs/heads/durable")
        .exists());
    let calls = std::fs::read_to_string(&trace).unwrap();
    let fsyncs = calls.lines().filter(|l| l.contains("fsync(")).count();
    assert!(
        fsyncs >= 1,
        "CreateBranch answered without any fsync by the server:\n{calls}"
    );
}

// ------------------------------------------------------------------------------------------------
// Connections that hold without using (issue #17)

/// Short deadlines, and the shard cap of the reported attack (64).
const HOLD_CONFIG: &str = "[rpc]\nlisten = \"127.0.0.1:0\"\nmax_connections_per_shard = 64\n\
    max_connections_per_ip = 32\nmax_unauthenticated_per_ip = 16\nfirst_request_secs = 3\n\
    idle_timeout_secs = 4\nkeepalive_interval_secs = 1\nkeepalive_timeout_secs = 1\n";
const FIRST_REQUEST: Duration = Duration::from_secs(3);
const IDLE: Duration = Duration::from_secs(4);
const GOAWAY: u8 = 7;

fn cuts(server: &Server, reason: &str) -> u64 {
    metric(
        server,
        &format!("gitplane_stalled_cuts_total{{reason=\"{reason}\"}}"),
    )
}

/// The frame types in what a server sent (a cut-off last frame included).
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        types.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    types
}

/// A raw TCP connection from `from` that sends the HTTP/2 client preface and an empty SETTINGS
/// frame, then nothing, and records what the server sends until it closes.
struct IdlePeer {
    stream: std::net::TcpStream,
    received: Vec<u8>,
    closed_at: Option<Instant>,
}

impl IdlePeer {
    fn open(from: IpAddr, to: SocketAddr) -> Self {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::new(from, 0).into())
            .unwrap_or_else(|e| panic!("cannot bind {from}: {e} (Linux routes all of 127/8)"));
        s.connect(&to.into()).unwrap();
        let mut stream: std::net::TcpStream = s.into();
        // A refused connection may already be closed: what it received tells it apart.
        let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0");
        stream.set_nonblocking(true).unwrap();
        Self {
            stream,
            received: Vec::new(),
            closed_at: None,
        }
    }

    /// Reads what is there; true once the server has closed the connection.
    fn poll(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        while self.closed_at.is_none() {
            match self.stream.read(&mut buf) {
                Ok(0) => self.closed_at = Some(Instant::now()),
                Ok(n) => self.received.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // Reset: closed without reading what we sent.
                Err(_) => self.closed_at = Some(Instant::now()),
            }
        }
        self.closed_at.is_some()
    }
}

/// Reads every peer until the server has closed them all (30 s at most), so close times are
/// seen as they happen.
fn wait_all_closed(peers: &mut [IdlePeer]) {
    let all = wait_for(Duration::from_secs(30), || {
        peers
            .iter_mut()
            .map(IdlePeer::poll)
            .filter(|closed| !closed)
            .count()
            == 0
    });
    assert!(
        all,
        "{} idle connections still open after 30 s",
        peers.iter().filter(|p| p.closed_at.is_none()).count()
    );
}

/// tests/rpc/held_channel.py: a grpcio channel authenticated at start, then calls on demand.
struct GrpcioApp {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl GrpcioApp {
    fn start(addr: SocketAddr, token: &str) -> Self {
        require_tool("python3");
        require_grpcio();
        let mut child = Command::new("python3")
            .arg(root().join("tests/rpc/held_channel.py"))
            .env("RPC_ADDR", addr.to_string())
            .env("RPC_TOKEN", token)
            .env("RPC_PATH", LIST_BRANCHES)
            .env("RPC_REQUEST_HEX", hex::encode(list_branches_request()))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut app = Self {
            child,
            stdin,
            stdout,
        };
        assert_eq!(app.line(), "ready");
        app
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(
            !line.is_empty(),
            "the grpcio client failed (its error is above)"
        );
        line.trim().to_owned()
    }

    /// One ListBranches on the held channel or a fresh one: milliseconds it took.
    fn call(&mut self, channel: &str) -> f64 {
        writeln!(self.stdin, "{channel}").unwrap();
        let line = self.line();
        let mut words = line.split(' ');
        assert_eq!(words.next(), Some("ok"), "{line}");
        let ms: f64 = words.next().unwrap().parse().unwrap();
        let size: usize = words.next().unwrap().parse().unwrap();
        assert!(size > 0, "an empty ListBranches answer");
        ms
    }
}

impl Drop for GrpcioApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn idle_h2_connections_are_capped_per_address_and_closed_without_a_token() {
    let (server, addr, token) = server_with_repo_config(HOLD_CONFIG);
    // The web app's channel, authenticated before the attack.
    let mut app = GrpcioApp::start(addr, &token);
    let attacker: IpAddr = "127.0.0.2".parse().unwrap();
    let started = Instant::now();
    let mut peers: Vec<IdlePeer> = (0..128).map(|_| IdlePeer::open(attacker, addr)).collect();
    // Real calls are served while the idle connections are held, on the channel made before
    // and on a new one.
    for channel in ["held", "fresh"] {
        let ms = app.call(channel);
        eprintln!("ListBranches on a {channel} channel during the attack: {ms:.1} ms");
    }
    wait_all_closed(&mut peers);
    // Admitted: the server's SETTINGS came back. Only the address's unauthenticated share was.
    let (held, refused): (Vec<_>, Vec<_>) = peers.iter().partition(|p| !p.received.is_empty());
    assert_eq!(held.len(), 16, "max_unauthenticated_per_ip = 16");
    for p in &held {
        assert!(
            frame_types(&p.received).contains(&GOAWAY),
            "closed without GOAWAY: {:?}",
            frame_types(&p.received)
        );
        assert!(p.closed_at.unwrap() >= started + FIRST_REQUEST);
    }
    let per_address = cuts(&server, "rpc_per_address");
    let over_shard_cap = metric(&server, "gitplane_http_connections_rejected_total");
    assert!(per_address > 0);
    assert_eq!(per_address + over_shard_cap, refused.len() as u64);
    assert_eq!(cuts(&server, "rpc_no_request"), 16);
    assert_eq!(cuts(&server, "rpc_keepalive"), 0);
    // And after the attack.
    let ms = app.call("fresh");
    eprintln!("ListBranches on a fresh channel after the attack: {ms:.1} ms");
}

#[test]
fn a_full_unauthenticated_share_evicts_its_oldest_so_new_clients_get_in() {
    let (server, addr, token) = server_with_repo_config(HOLD_CONFIG);
    let mut app = GrpcioApp::start(addr, &token);
    // 8 addresses x 16: within every address's share, 4 times the shards' shares (2 x 16).
    let mut peers: Vec<IdlePeer> = (0..128)
        .map(|i| IdlePeer::open(IpAddr::from([127, 0, 0, 10 + i % 8]), addr))
        .collect();
    let ms = app.call("fresh");
    eprintln!("ListBranches on a fresh channel with the shares full: {ms:.1} ms");
    wait_all_closed(&mut peers);
    // Each one was evicted, timed out, or (in the burst) refused over the shard's cap.
    let over_shard_cap = metric(&server, "gitplane_http_connections_rejected_total");
    assert_eq!(cuts(&server, "rpc_no_request") + over_shard_cap, 128);
    assert_eq!(cuts(&server, "rpc_per_address"), 0);
}

/// A socket whose reads and writes can be stopped: the peer then answers nothing, not even a
/// PING, while the TCP connection stays up.
struct Freezable {
    inner: tokio::net::TcpStream,
    frozen: Arc<AtomicBool>,
}

impl tokio::io::AsyncRead for Freezable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Freezable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Opens a ListBranches stream with the token and sends its message without ending the stream,
/// so the call stays open until `end` is sent.
fn open_call(
    client: &h2::client::SendRequest<Bytes>,
    token: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://gitplane{LIST_BRANCHES}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    let (resp, mut send) = client.clone().send_request(req, false).unwrap();
    send.send_data(frame(0, &list_branches_request()).into(), false)
        .unwrap();
    (resp, send)
}

/// One complete ListBranches call that must succeed (and so authenticates the connection).
async fn list_branches_ok(client: &h2::client::SendRequest<Bytes>, auth: &str) {
    let req = frame(0, &list_branches_request());
    let a = call(
        client,
        LIST_BRANCHES,
        &[("authorization", auth)],
        &[req],
        false,
    )
    .await;
    assert_eq!(a.grpc_status(), Some(0), "{a:?}");
}

#[test]
fn idle_connections_get_goaway_and_silent_peers_fail_keepalive() {
    let (server, addr, token) = server_with_repo_config(HOLD_CONFIG);
    let auth = format!("Bearer {token}");
    runtime().block_on(async {
        // Authenticated, then idle: GOAWAY and close at the idle timeout, not before.
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, driver) = connect_io(tcp).await;
        list_branches_ok(&client, &auth).await;
        let idle_from = Instant::now();
        let _ = tokio::time::timeout(Duration::from_secs(20), driver)
            .await
            .expect("an idle connection still open after 20 s");
        // The server's idle clock started a little before the client saw the answer.
        assert!(idle_from.elapsed() >= IDLE - Duration::from_secs(1));
        assert_eq!(cuts(&server, "rpc_idle"), 1);

        // A long call on a client that answers PINGs: it outlives many keepalive rounds.
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, _driver) = connect_io(tcp).await;
        let (resp, mut send) = open_call(&client, &token);
        tokio::time::sleep(Duration::from_secs(4)).await;
        send.send_data(Bytes::new(), true).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .expect("an answer")
            .expect("the call survived the keepalive rounds");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        while let Some(chunk) = body.data().await {
            chunk.unwrap();
        }
        let trailers = body.trailers().await.unwrap().expect("trailers");
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        assert_eq!(cuts(&server, "rpc_keepalive"), 0);
        // Closed by us before its idle timeout, so that it is not counted below.
        drop((client, send));

        // The same call on a client that stops answering: cut after one unanswered PING.
        let frozen = Arc::new(AtomicBool::new(false));
        let io = Freezable {
            inner: tokio::net::TcpStream::connect(addr).await.unwrap(),
            frozen: Arc::clone(&frozen),
        };
        let (client, _driver) = connect_io(io).await;
        list_branches_ok(&client, &auth).await;
        let (_resp, _send) = open_call(&client, &token);
        // Let the stream reach the server, then go silent.
        tokio::time::sleep(Duration::from_millis(500)).await;
        frozen.store(true, Ordering::SeqCst);
        let mut cut = false;
        for _ in 0..100 {
            if cuts(&server, "rpc_keepalive") == 1 {
                cut = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(cut, "a silent peer's connection was not cut within 10 s");
        assert_eq!(cuts(&server, "rpc_idle"), 1);
        assert_eq!(cuts(&server, "rpc_no_request"), 0);
    });
}
