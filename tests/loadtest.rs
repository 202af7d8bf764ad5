//! `gitplane-load` against a real `gitplane serve`: every implemented scenario completes with no
//! errors at small bounded counts, `--verify` checks a real pack, the request counts agree with
//! the server's `/metrics`, `--compare` catches a regression and passes an equal run, and bad
//! arguments fail clearly.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use common::{git, make_worktree, raw_request, Server};

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
    let raw = raw_request(
        server.addr,
        b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    let body = String::from_utf8_lossy(&raw);
    let key = format!("gitplane_http_requests_total{{route=\"{route}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in metrics:\n{body}"))
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
            "not an http:// URL",
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
            "only applies to the clone",
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
        (&["lfs-download", "--url", "x"], "not yet implemented"),
        (&["ssh-clone"], "not yet implemented"),
        (&["grpc"], "not yet implemented"),
        (&["lfs-upload"], "not yet implemented"),
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
