//! `gitplane-load` against real peers on loopback: every scenario completes with no errors at
//! small bounded counts against a real `gitplane serve` (clone, fetch-noop, push over smart
//! HTTP; ssh-clone with a registered key; lfs-upload, lfs-download; grpc), and clone over
//! git:// against a real `git daemon`. `--verify` checks real packs, the counts agree with the
//! server's `/metrics`, objects uploaded are really stored, wrong objects and failing calls are
//! counted by kind, `--compare` catches a regression and passes an equal run, and bad arguments
//! fail clearly.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use sha2::{Digest, Sha256};

use common::{git, make_worktree, metric, ssh_keygen, ssh_known_hosts, GitDaemon, Server};

/// The `gitplane-load` binary, built on first use. `cargo test --workspace` builds only the test
/// harnesses of other packages, not their plain binaries, so the test asks cargo for it (a no-op
/// when it is fresh) in the same target directory.
fn load_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/loadtest-HASH -> target/<profile>
        let exe = std::env::current_exe().expect("current exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "gitplane-load", "--manifest-path"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target_dir);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build -p gitplane-load");
        assert!(status.success(), "cargo build -p gitplane-load failed");
        let bin = profile_dir.join("gitplane-load");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
}

fn load(args: &[&str]) -> Output {
    Command::new(load_bin())
        .args(args)
        .env_remove("GITPLANE_LOAD_URL")
        .env_remove("GITPLANE_LOAD_PASSWORD")
        .output()
        .expect("run gitplane-load")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: &Output) {
    assert_eq!(o.status.code(), Some(0), "{}", text(o));
}

/// A server with `admin/load` holding two branches.
fn setup() -> (Server, tempfile::TempDir) {
    let server = Server::start();
    server.create_repo("admin/load", false);
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("w");
    make_worktree(&dir, 3);
    git(&dir, &["branch", "dev", "HEAD~1"]);
    let bare = server.repo_path("admin/load");
    git(
        &dir,
        &["push", "-q", bare.to_str().expect("utf-8"), "main", "dev"],
    );
    (server, work)
}

fn url(server: &Server) -> String {
    format!("http://{}/admin/load.git", server.addr)
}

/// `gitplane_http_requests_total{route="ROUTE"}` from `/metrics`.
fn requests(server: &Server, route: &str) -> u64 {
    metric(
        server,
        &format!("gitplane_http_requests_total{{route=\"{route}\"}}"),
    )
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("report")).expect("json")
}

#[test]
fn clone_verifies_packs_and_matches_server_metrics() {
    let (server, work) = setup();
    let report = work.path().join("clone.json");
    let plot = work.path().join("clone.svg");
    let before = (
        requests(&server, "upload_pack"),
        requests(&server, "info_refs"),
    );
    let out = load(&[
        "clone",
        "--url",
        &url(&server),
        "--user",
        "admin",
        "--password",
        &server.admin_password,
        "-n",
        "6",
        "-c",
        "2",
        "-t",
        "2",
        "--verify",
        "--verify-samples",
        "2",
        "-q",
        "--json",
        report.to_str().expect("utf-8"),
        "--plot",
        plot.to_str().expect("utf-8"),
    ]);
    ok(&out);
    let r = json(&report);
    assert_eq!(r["ok"], 6, "{r}");
    assert_eq!(r["errors_total"], 0, "{r}");
    assert_eq!(r["verified_packs"], 2, "{r}");
    assert_eq!(r["protocols"]["v2"], 6, "{r}");
    assert!(r["bytes"].as_u64().expect("bytes") > 6 * 100, "{r}");
    assert!(r["latency_ms"]["p99"].as_f64().expect("p99") > 0.0);
    // Two POSTs (ls-refs, fetch) and one GET per clone.
    let after = (
        requests(&server, "upload_pack"),
        requests(&server, "info_refs"),
    );
    assert_eq!(after.0 - before.0, 12);
    assert_eq!(after.1 - before.1, 6);
    let svg = std::fs::read_to_string(&plot).expect("plot");
    assert!(svg.starts_with("<svg") && svg.contains("Latency histogram"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("p99.9") && stdout.contains("verified   2 packs"),
        "{stdout}"
    );
}

#[test]
fn fetch_noop_open_loop_and_credentials_in_url() {
    let (server, work) = setup();
    let report = work.path().join("noop.json");
    let authed = server.url("admin/load", Some(("admin", &server.admin_password)));
    let before = requests(&server, "upload_pack");
    let out = load(&[
        "fetch-noop",
        "--url",
        &authed,
        "--rate",
        "40/s",
        "-n",
        "8",
        "-q",
        "--json",
        report.to_str().expect("utf-8"),
    ]);
    ok(&out);
    let r = json(&report);
    assert_eq!(
        (r["ok"].as_u64(), r["errors_total"].as_u64()),
        (Some(8), Some(0)),
        "{r}"
    );
    assert_eq!(r["mode"], "open");
    assert_eq!(requests(&server, "upload_pack") - before, 8);
}

#[test]
fn push_updates_per_client_branches() {
    let (server, work) = setup();
    let report = work.path().join("push.json");
    let before = requests(&server, "receive_pack");
    let out = load(&[
        "push",
        "--url",
        &url(&server),
        "--user",
        "admin",
        "--password",
        &server.admin_password,
        "-n",
        "7",
        "-c",
        "2",
        "-q",
        "--json",
        report.to_str().expect("utf-8"),
    ]);
    ok(&out);
    let r = json(&report);
    assert_eq!(
        (r["ok"].as_u64(), r["errors_total"].as_u64()),
        (Some(7), Some(0)),
        "{r}"
    );
    assert_eq!(requests(&server, "receive_pack") - before, 7);
    let bare = server.repo_path("admin/load");
    let refs = git(
        &bare,
        &[
            "for-each-ref",
            "--format=%(refname)",
            "refs/heads/gitplane-load/",
        ],
    );
    assert!(refs.contains("refs/heads/gitplane-load/t0-0"), "{refs}");
    // A second run moves the same branches again (old value learned from the advertisement).
    ok(&load(&[
        "push",
        "--url",
        &url(&server),
        "--user",
        "admin",
        "--password",
        &server.admin_password,
        "-n",
        "3",
        "-q",
    ]));
    git(&bare, &["fsck", "--no-progress"]);
}

#[test]
fn duration_bounds_a_closed_loop() {
    let (server, work) = setup();
    let report = work.path().join("d.json");
    let start = std::time::Instant::now();
    ok(&load(&[
        "fetch-noop",
        "--url",
        &url(&server),
        "--user",
        "admin",
        "--password",
        &server.admin_password,
        "-d",
        "1s",
        "-c",
        "3",
        "-q",
        "--json",
        report.to_str().expect("utf-8"),
    ]));
    assert!(start.elapsed() < Duration::from_secs(20));
    let r = json(&report);
    assert!(r["ok"].as_u64().expect("ok") > 0);
    assert_eq!(r["errors_total"], 0);
}

#[test]
fn compare_passes_equal_runs_and_fails_a_regression() {
    let (server, work) = setup();
    let current = work.path().join("current.json");
    let creds = ["--user", "admin", "--password", &server.admin_password];
    let u = url(&server);
    let mut args = vec!["fetch-noop", "--url", &u, "-n", "5", "-q", "--json"];
    args.push(current.to_str().expect("utf-8"));
    args.extend(creds);
    ok(&load(&args));
    // Equal runs pass.
    let cur = current.to_str().expect("utf-8");
    let same = load(&["compare", cur, cur]);
    ok(&same);
    assert!(String::from_utf8_lossy(&same.stdout).contains("+0.0%"));
    // A baseline ten times faster makes the current run a regression.
    let mut base = json(&current);
    base["throughput"] = serde_json::json!(base["throughput"].as_f64().expect("tp") * 10.0);
    base["latency_ms"]["p99"] =
        serde_json::json!(base["latency_ms"]["p99"].as_f64().expect("p99") / 10.0);
    let synthetic = work.path().join("fast-baseline.json");
    std::fs::write(&synthetic, base.to_string()).expect("write");
    let syn = synthetic.to_str().expect("utf-8");
    let out = load(&["compare", syn, cur, "--max-regression", "5%"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("REGRESSION"));
    // The same through a live run with --compare.
    let mut args = vec!["fetch-noop", "--url", &u, "-n", "3", "-q", "--compare", syn];
    args.extend(creds);
    let out = load(&args);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    // A slow baseline is no regression.
    base["throughput"] = serde_json::json!(0.001);
    base["latency_ms"]["p99"] = serde_json::json!(1e9);
    std::fs::write(&synthetic, base.to_string()).expect("write");
    ok(&load(&args));
}

#[test]
fn failures_are_counted_by_kind() {
    let (server, _work) = setup();
    let out = load(&[
        "clone",
        "--url",
        &url(&server),
        "--user",
        "admin",
        "--password",
        "wrong",
        "-n",
        "2",
        "-q",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("http_401"),
        "{}",
        text(&out)
    );
    // Nothing listens on port 1.
    let out = load(&[
        "fetch-noop",
        "--url",
        "http://127.0.0.1:1/o/r.git",
        "-n",
        "1",
        "-q",
        "--allow-errors",
    ]);
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("connect"),
        "{}",
        text(&out)
    );
}

fn ssh_url(server: &Server, repo: &str) -> String {
    format!("ssh://git@{}/{repo}.git", server.listening["ssh"])
}

#[test]
fn clone_and_fetch_noop_over_git_daemon() {
    let (server, work) = setup();
    // The server's repositories on disk, served by a real `git daemon`.
    let daemon = GitDaemon::start(&server.data_dir().join("repos"));
    let u = daemon.url("admin/load.git");
    let report = work.path().join("git.json");
    let out = load(&[
        "clone",
        "--url",
        &u,
        "-n",
        "5",
        "-c",
        "2",
        "--verify",
        "--verify-samples",
        "2",
        "-q",
        "--json",
        report.to_str().expect("utf-8"),
    ]);
    ok(&out);
    let r = json(&report);
    assert_eq!(
        (r["ok"].as_u64(), r["errors_total"].as_u64()),
        (Some(5), Some(0)),
        "{r}"
    );
    assert_eq!(r["verified_packs"], 2, "{r}");
    assert_eq!(r["url"], u.as_str());
    // The daemon passed our request for protocol v2 on to upload-pack.
    assert_eq!(r["protocols"]["v2"], 5, "{r}");
    assert!(r["bytes"].as_u64().expect("bytes") > 5 * 100, "{r}");
    ok(&load(&[
        "fetch-noop",
        "--url",
        &u,
        "--rate",
        "50",
        "-n",
        "5",
        "-q",
    ]));
    // A repository the daemon does not serve: the daemon's error, counted by kind.
    let out = load(&[
        "clone",
        "--url",
        &daemon.url("admin/none.git"),
        "-n",
        "2",
        "-q",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("git_remote_error"),
        "{}",
        text(&out)
    );
}

#[test]
fn ssh_clone_with_a_registered_key() {
    let (server, work) = setup();
    let key = ssh_keygen(work.path(), "load_key");
    server.admin(
        &["key", "add", "admin", &format!("{}.pub", key.display())],
        None,
    );
    let kh = ssh_known_hosts(&server, work.path());
    let (key_s, kh_s) = (key.to_str().expect("utf-8"), kh.to_str().expect("utf-8"));
    let u = ssh_url(&server, "admin/load");
    let execs = || metric(&server, "gitplane_ssh_execs_total");
    let handshakes = || {
        metric(
            &server,
            "gitplane_ssh_handshakes_total{outcome=\"completed\"}",
        )
    };
    let before = (execs(), handshakes());
    let report = work.path().join("ssh.json");
    let out = load(&[
        "ssh-clone",
        "--url",
        &u,
        "--identity",
        key_s,
        "--known-hosts",
        kh_s,
        "-n",
        "6",
        "-c",
        "3",
        "-t",
        "2",
        "--verify",
        "--verify-samples",
        "2",
        "-q",
        "--json",
        report.to_str().expect("utf-8"),
    ]);
    ok(&out);
    let r = json(&report);
    assert_eq!(
        (r["ok"].as_u64(), r["errors_total"].as_u64()),
        (Some(6), Some(0)),
        "{r}"
    );
    assert_eq!(r["verified_packs"], 2, "{r}");
    // gitplane honours GIT_PROTOCOL from the env request.
    assert_eq!(r["protocols"]["v2"], 6, "{r}");
    // A new SSH connection and one upload-pack per clone.
    assert_eq!((execs() - before.0, handshakes() - before.1), (6, 6));
    // Open loop works the same.
    ok(&load(&[
        "ssh-clone",
        "--url",
        &u,
        "--identity",
        key_s,
        "--known-hosts",
        kh_s,
        "--rate",
        "20",
        "-n",
        "3",
        "-q",
    ]));

    // A host key that is not the server's: refused before authenticating.
    let other = ssh_keygen(work.path(), "other_key");
    let wrong_kh = work.path().join("wrong_known_hosts");
    let other_pub = std::fs::read_to_string(format!("{}.pub", other.display())).expect("pub");
    std::fs::write(
        &wrong_kh,
        format!(
            "[127.0.0.1]:{} {}\n",
            server.listening["ssh"].port(),
            other_pub.trim()
        ),
    )
    .expect("write");
    let out = load(&[
        "ssh-clone",
        "--url",
        &u,
        "--identity",
        key_s,
        "--known-hosts",
        wrong_kh.to_str().expect("utf-8"),
        "-n",
        "1",
        "-q",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ssh_host_key"),
        "{}",
        text(&out)
    );
    // An unregistered key, host key unchecked on purpose.
    let out = load(&[
        "ssh-clone",
        "--url",
        &u,
        "--identity",
        other.to_str().expect("utf-8"),
        "--insecure-accept-host-key",
        "-n",
        "1",
        "-q",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ssh_auth"),
        "{}",
        text(&out)
    );
    // A repository that does not exist: upload-pack's refusal with its message.
    let out = load(&[
        "ssh-clone",
        "--url",
        &ssh_url(&server, "admin/none"),
        "--identity",
        key_s,
        "--known-hosts",
        kh_s,
        "-n",
        "1",
        "-q",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ssh_remote_failed") && stdout.contains("not found"),
        "{}",
        text(&out)
    );
}

/// Every LFS object stored on the server's disk: (oid, size).
fn stored_lfs_objects(server: &Server) -> Vec<(String, u64)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&server.data_dir().join("lfs/objects"), &mut files);
    let mut objects: Vec<(String, u64)> = files
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).expect("read object");
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            assert_eq!(
                hex::encode(Sha256::digest(&bytes)),
                name,
                "{} holds other content",
                p.display()
            );
            (name, bytes.len() as u64)
        })
        .collect();
    objects.sort();
    objects
}

#[test]
fn lfs_upload_stores_objects_and_download_checks_them() {
    let (server, work) = setup();
    let creds = ["--user", "admin", "--password", &server.admin_password];
    let u = url(&server);
    let batches = || metric(&server, "gitplane_lfs_batch_requests_total");
    let bytes_in = || metric(&server, "gitplane_lfs_bytes_in_total");
    let bytes_out = || metric(&server, "gitplane_lfs_bytes_out_total");
    let size: u64 = 100 * 1024 + 7;

    let before = (batches(), bytes_in());
    let report = work.path().join("up.json");
    let mut args = vec![
        "lfs-upload",
        "--url",
        &u,
        "--object-size",
        "102407",
        "-n",
        "3",
        "-c",
        "2",
        "-q",
        "--json",
    ];
    args.push(report.to_str().expect("utf-8"));
    args.extend(creds);
    ok(&load(&args));
    let r = json(&report);
    assert_eq!(
        (r["ok"].as_u64(), r["errors_total"].as_u64()),
        (Some(3), Some(0)),
        "{r}"
    );
    assert_eq!(r["bytes"].as_u64(), Some(3 * size), "{r}");
    assert_eq!((batches() - before.0, bytes_in() - before.1), (3, 3 * size));
    // Really stored: three distinct objects of that size, each holding what its id says.
    let stored = stored_lfs_objects(&server);
    assert_eq!(stored.len(), 3, "{stored:?}");
    assert!(stored.iter().all(|(_, s)| *s == size), "{stored:?}");

    // Download one of them by id, several times.
    let (oid, _) = stored[0].clone();
    let before = bytes_out();
    let mut args = vec![
        "lfs-download",
        "--url",
        &u,
        "--oid",
        &oid,
        "--object-size",
        "102407",
        "-n",
        "4",
        "-c",
        "2",
        "-q",
    ];
    args.extend(creds);
    let out = load(&args);
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("4 ok, 0 errors"),
        "{}",
        text(&out)
    );
    assert_eq!(bytes_out() - before, 4 * size);

    // The wrong size for it: the server refuses the object in the batch answer.
    let mut args = vec![
        "lfs-download",
        "--url",
        &u,
        "--oid",
        &oid,
        "--object-size",
        "102408",
        "-n",
        "1",
        "-q",
    ];
    args.extend(creds);
    let out = load(&args);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("lfs_object_422"),
        "{}",
        text(&out)
    );

    // Content that no longer matches its id (the file changed on the server's disk): the client
    // hashes what it receives and says so.
    let path = server
        .data_dir()
        .join("lfs/objects")
        .join(&oid[..2])
        .join(&oid[2..4])
        .join(&oid);
    let mut bytes = std::fs::read(&path).expect("object");
    bytes[1000] ^= 0xff;
    std::fs::write(&path, &bytes).expect("corrupt");
    let mut args = vec![
        "lfs-download",
        "--url",
        &u,
        "--oid",
        &oid,
        "--object-size",
        "102407",
        "-n",
        "2",
        "-q",
    ];
    args.extend(creds);
    let out = load(&args);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("lfs_sha256_mismatch"),
        "{}",
        text(&out)
    );
    bytes[1000] ^= 0xff;
    std::fs::write(&path, &bytes).expect("restore");

    // Without --oid, one object is uploaded before the run and downloaded by every iteration.
    let before = (batches(), bytes_in(), bytes_out());
    let mut args = vec![
        "lfs-download",
        "--url",
        &u,
        "--object-size",
        "64K",
        "--rate",
        "40",
        "-n",
        "3",
        "-q",
    ];
    args.extend(creds);
    ok(&load(&args));
    assert_eq!(
        (
            batches() - before.0,
            bytes_in() - before.1,
            bytes_out() - before.2
        ),
        (1 + 3, 64 * 1024, 3 * 64 * 1024)
    );
    assert_eq!(stored_lfs_objects(&server).len(), 4);
}

#[test]
fn grpc_calls_and_errors_by_status() {
    let (server, work) = setup();
    let rpc = format!("http://{}", server.listening["rpc"]);
    let token = server.data_dir().join("rpc-token");
    let token = token.to_str().expect("utf-8");
    // Series by status code appear with their first call: read them after the calls.
    let responses = |method: &str, code: u8| {
        metric(
            &server,
            &format!(
                "gitplane_rpc_responses_total{{method=\"gitplane.v1.RepositoryService/{method}\",code=\"{code}\"}}"
            ),
        )
    };
    let repo = format!("{rpc}/admin/load");
    let report = work.path().join("grpc.json");
    ok(&load(&[
        "grpc",
        "--url",
        &repo,
        "--rpc",
        "list-branches",
        "--token-file",
        token,
        "-n",
        "20",
        "-c",
        "3",
        "-t",
        "2",
        "-q",
        "--json",
        report.to_str().expect("utf-8"),
    ]));
    let r = json(&report);
    assert_eq!(
        (r["ok"].as_u64(), r["errors_total"].as_u64()),
        (Some(20), Some(0)),
        "{r}"
    );
    assert!(r["bytes"].as_u64().expect("bytes") > 20 * 40, "{r}");
    assert_eq!(responses("ListBranches", 0), 20);
    for (rpc_name, method) in [
        ("find-commit", "FindCommit"),
        ("repository-info", "RepositoryInfo"),
    ] {
        // Open loop: the calls of the thread share one connection as concurrent streams.
        ok(&load(&[
            "grpc",
            "--url",
            &repo,
            "--rpc",
            rpc_name,
            "--token-file",
            token,
            "--rate",
            "100",
            "-n",
            "5",
            "-q",
        ]));
        assert_eq!(responses(method, 0), 5, "{method}");
    }
    let out = load(&[
        "grpc",
        "--url",
        &format!("{rpc}/admin/none"),
        "--rpc",
        "find-commit",
        "--token-file",
        token,
        "-n",
        "2",
        "-q",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("grpc_NOT_FOUND"),
        "{}",
        text(&out)
    );
    let out = load(&[
        "grpc",
        "--url",
        &repo,
        "--rpc",
        "find-commit",
        "--revision",
        "no-such-branch",
        "--token-file",
        token,
        "-n",
        "1",
        "-q",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("grpc_NOT_FOUND"),
        "{}",
        text(&out)
    );
    let out = Command::new(load_bin())
        .args([
            "grpc",
            "--url",
            &repo,
            "--rpc",
            "list-branches",
            "-n",
            "1",
            "-q",
        ])
        .env("GITPLANE_LOAD_TOKEN", "not-the-token-0123456789")
        .output()
        .expect("run gitplane-load");
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("grpc_UNAUTHENTICATED"),
        "{}",
        text(&out)
    );
    // The server counted the same outcomes.
    assert_eq!(responses("FindCommit", 5), 3);
    assert_eq!(responses("ListBranches", 16), 1);
}

#[test]
fn bad_arguments_fail_clearly() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["clone", "--url", "http://127.0.0.1:1/o/r"],
            "refusing to run unbounded",
        ),
        (
            &[
                "clone",
                "--url",
                "http://127.0.0.1:1/o/r",
                "-n",
                "1",
                "--rate",
                "0",
            ],
            "positive rate",
        ),
        (
            &[
                "clone",
                "--url",
                "http://127.0.0.1:1/o/r",
                "-n",
                "1",
                "-c",
                "2",
                "--rate",
                "3",
            ],
            "cannot be used with",
        ),
        (
            &["clone", "--url", "https://127.0.0.1:1/o/r", "-n", "1"],
            "not an http:// or git:// URL",
        ),
        (
            &["clone", "--url", "http://127.0.0.1:1/o", "-n", "1"],
            "names no repository",
        ),
        (
            &[
                "clone",
                "--url",
                "http://127.0.0.1:1/o/r",
                "-d",
                "5 parsecs",
            ],
            "unknown unit",
        ),
        (
            &[
                "push",
                "--url",
                "http://127.0.0.1:1/o/r",
                "-n",
                "1",
                "--verify",
            ],
            "unexpected argument '--verify'",
        ),
        (
            &["push", "--url", "git://127.0.0.1:1/o/r", "-n", "1"],
            "push needs an http:// URL",
        ),
        (
            &["clone", "--url", "git://u:p@127.0.0.1:1/o/r", "-n", "1"],
            "takes no user or password",
        ),
        (
            &[
                "clone",
                "--url",
                "http://127.0.0.1:1/o/r",
                "-n",
                "1",
                "--max-regression",
                "lots",
            ],
            "not a percentage",
        ),
        (
            &[
                "ssh-clone",
                "--url",
                "ssh://git@127.0.0.1:1/o/r.git",
                "-n",
                "1",
                "--insecure-accept-host-key",
            ],
            "--identity <FILE>",
        ),
        (
            &[
                "ssh-clone",
                "--url",
                "ssh://git@127.0.0.1:1/o/r.git",
                "-n",
                "1",
                "--identity",
                "/nonexistent/key",
            ],
            "refusing to connect without checking the host key",
        ),
        (
            &[
                "ssh-clone",
                "--url",
                "ssh://git@127.0.0.1:1/o/r.git",
                "-n",
                "1",
                "--identity",
                "/nonexistent/key",
                "--insecure-accept-host-key",
            ],
            "--identity /nonexistent/key",
        ),
        (
            &[
                "ssh-clone",
                "--url",
                "http://127.0.0.1:1/o/r.git",
                "-n",
                "1",
                "--identity",
                "k",
                "--insecure-accept-host-key",
            ],
            "not an ssh:// URL",
        ),
        (
            &[
                "grpc",
                "--url",
                "http://127.0.0.1:1/o/r",
                "--rpc",
                "merge",
                "-n",
                "1",
            ],
            "invalid value 'merge' for '--rpc <RPC>'",
        ),
        (
            &[
                "grpc",
                "--url",
                "http://127.0.0.1:1/o/r",
                "--rpc",
                "list-branches",
                "-n",
                "1",
            ],
            "needs the server's bearer token",
        ),
        (
            &[
                "lfs-upload",
                "--url",
                "http://127.0.0.1:1/o/r",
                "--object-size",
                "8",
                "-n",
                "1",
            ],
            "smaller than 16 bytes",
        ),
        (
            &[
                "lfs-download",
                "--url",
                "http://127.0.0.1:1/o/r",
                "--oid",
                "xyz",
                "-n",
                "1",
            ],
            "not a SHA-256 object id",
        ),
        (&["teleport"], "unrecognized subcommand"),
    ];
    for (args, expected) in cases {
        let out = load(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(expected),
            "{args:?}: expected `{expected}` in:\n{err}"
        );
    }
    let out = load(&["compare", "/nonexistent/a.json", "/nonexistent/b.json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/a.json"));
}
