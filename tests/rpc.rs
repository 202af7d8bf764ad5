//! The gRPC repository API end to end, against a real `gitplane serve`:
//! - the Python grpcio suite (tests/rpc/client_test.py, stubs generated from proto/ at test time)
//!   on a scripted fixture with a 200 MB blob, checked against the git CLI;
//! - raw HTTP/2 streams (the h2 crate as a client) for what a well-behaved client never sends:
//!   malformed frames, bad compression, oversized messages, tiny deadlines.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::grpc::{call, connect, frame, runtime, Answer};
use common::*;
use gitplane::rpc::pb::v1 as pb;
use prost::Message;

const RPC_CONFIG: &str = "[rpc]\nlisten = \"127.0.0.1:0\"\n";
const LIST_BRANCHES: &str = "/gitplane.v1.RepositoryService/ListBranches";

fn start() -> (Server, SocketAddr, String) {
    let server = Server::start_with(ServerOptions {
        config: Some(RPC_CONFIG.into()),
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
    let (server, addr, token) = start();
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
