//! Git smart HTTP end to end: the real `git` client against a real `gitplane serve` on loopback.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn clone_v0_and_v2_negotiate_the_asked_protocol() {
    let (server, work) = server_with_pushed_repo(3);
    let url = server.admin_url("admin/proj");
    for (version, expect_v2) in [("0", false), ("2", true)] {
        let dest = work.path().join(format!("clone-v{version}"));
        let out = git_raw(
            work.path(),
            &[
                "-c",
                &format!("protocol.version={version}"),
                "clone",
                &url,
                dest.to_str().unwrap(),
            ],
            &[("GIT_TRACE_PACKET", "1")],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let trace = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            trace.contains("< version 2"),
            expect_v2,
            "protocol v{version} trace:\n{trace}"
        );
        if !expect_v2 {
            assert!(trace.contains("# service=git-upload-pack"), "{trace}");
        }
        assert_eq!(rev_count(&dest, "HEAD"), 3);
        git(&dest, &["fsck", "--strict"]);
    }
}

#[test]
fn shallow_clone_then_deepen() {
    let (server, work) = server_with_pushed_repo(5);
    let dest = work.path().join("shallow");
    git(
        work.path(),
        &[
            "clone",
            "-q",
            "--depth",
            "1",
            &server.admin_url("admin/proj"),
            dest.to_str().unwrap(),
        ],
    );
    assert_eq!(rev_count(&dest, "HEAD"), 1);
    assert!(dest.join(".git/shallow").exists());
    git(&dest, &["fetch", "-q", "--deepen", "2"]);
    assert_eq!(rev_count(&dest, "HEAD"), 3);
    git(&dest, &["fetch", "-q", "--unshallow"]);
    assert_eq!(rev_count(&dest, "HEAD"), 5);
}

#[test]
fn partial_clone_fetches_blobs_lazily() {
    let (server, work) = server_with_pushed_repo(4);
    let dest = work.path().join("partial");
    git(
        work.path(),
        &[
            "clone",
            "-q",
            "--filter=blob:none",
            &server.admin_url("admin/proj"),
            dest.to_str().unwrap(),
        ],
    );
    // The checkout of HEAD fetched its blobs; an old version of a file is still missing.
    std::fs::write(dest.join("file0.txt"), "changed\n").unwrap();
    git(&dest, &["commit", "-q", "-am", "local change"]);
    let missing = git(
        &dest,
        &["rev-list", "--objects", "--missing=print", "HEAD~1"],
    );
    let _ = missing;
    let old_blob = git(&dest, &["rev-parse", "HEAD~1:file0.txt"])
        .trim()
        .to_owned();
    let before = git(
        &dest,
        &["rev-list", "--objects", "--missing=print", "--all"],
    );
    let count_missing = before.lines().filter(|l| l.starts_with('?')).count();
    assert_eq!(
        count_missing, 0,
        "HEAD's blobs were fetched by checkout:\n{before}"
    );
    // Lazy fetch: ask for a blob through cat-file on a fresh partial clone with no checkout.
    let bare = work.path().join("partial-bare");
    git(
        work.path(),
        &[
            "clone",
            "-q",
            "--bare",
            "--filter=blob:none",
            &server.admin_url("admin/proj"),
            bare.to_str().unwrap(),
        ],
    );
    let missing = git(
        &bare,
        &["rev-list", "--objects", "--missing=print", "--all"],
    );
    assert!(
        missing.lines().any(|l| l == format!("?{old_blob}")),
        "blob should be missing before lazy fetch:\n{missing}"
    );
    let content = git(&bare, &["cat-file", "-p", &old_blob]);
    assert_eq!(content, "content 0\n".repeat(50));
}

#[test]
fn push_branch_force_push_delete_and_fetch() {
    let (server, work) = server_with_pushed_repo(2);
    let url = server.admin_url("admin/proj");
    let a = work.path().join("a");
    git(work.path(), &["clone", "-q", &url, a.to_str().unwrap()]);
    git(&a, &["checkout", "-q", "-b", "feature"]);
    std::fs::write(a.join("f.txt"), "one\n").unwrap();
    git(&a, &["add", "."]);
    git(&a, &["commit", "-q", "-m", "feature 1"]);
    git(&a, &["push", "-q", "origin", "feature"]);
    let bare = server.repo_path("admin/proj");
    let server_feature = git(&bare, &["rev-parse", "refs/heads/feature"]);
    assert_eq!(server_feature, git(&a, &["rev-parse", "HEAD"]));

    // Rewrite history and force-push.
    git(
        &a,
        &["commit", "-q", "--amend", "-m", "feature 1 rewritten"],
    );
    let rejected = git_raw(&a, &["push", "-q", "origin", "feature"], &[]);
    assert!(
        !rejected.status.success(),
        "a non-fast-forward push must be refused"
    );
    git(&a, &["push", "-q", "--force", "origin", "feature"]);
    assert_eq!(
        git(&bare, &["rev-parse", "refs/heads/feature"]),
        git(&a, &["rev-parse", "HEAD"])
    );

    // Another clone fetches the new branch, then sees it deleted.
    let b = work.path().join("b");
    git(work.path(), &["clone", "-q", &url, b.to_str().unwrap()]);
    assert_eq!(
        git(&b, &["rev-parse", "origin/feature"]),
        git(&a, &["rev-parse", "HEAD"])
    );
    git(&a, &["push", "-q", "origin", "--delete", "feature"]);
    assert!(!git_raw(
        &bare,
        &["rev-parse", "--verify", "-q", "refs/heads/feature"],
        &[]
    )
    .status
    .success());
    git(&b, &["fetch", "-q", "--prune"]);
    assert!(
        !git_raw(&b, &["rev-parse", "--verify", "-q", "origin/feature"], &[])
            .status
            .success()
    );
}

#[test]
fn push_options_are_accepted() {
    let (server, work) = server_with_pushed_repo(1);
    let a = work.path().join("a");
    git(
        work.path(),
        &[
            "clone",
            "-q",
            &server.admin_url("admin/proj"),
            a.to_str().unwrap(),
        ],
    );
    std::fs::write(a.join("x.txt"), "x\n").unwrap();
    git(&a, &["add", "."]);
    git(&a, &["commit", "-q", "-m", "x"]);
    // The server advertises push-options, so git accepts -o; without it git refuses.
    git(&a, &["push", "-q", "-o", "ci.skip", "origin", "main"]);
}

#[test]
fn push_over_50_megabytes_streams_a_chunked_body() {
    let (server, work) = server_with_pushed_repo(1);
    let a = work.path().join("big");
    git(
        work.path(),
        &[
            "clone",
            "-q",
            &server.admin_url("admin/proj"),
            a.to_str().unwrap(),
        ],
    );
    std::fs::write(a.join("big.bin"), random_bytes(55 << 20, 7)).unwrap();
    git(&a, &["add", "."]);
    git(&a, &["commit", "-q", "-m", "big"]);
    let out = git_raw(
        &a,
        &["push", "origin", "main"],
        &[("GIT_TRACE_CURL", "1"), ("GIT_TRACE_CURL_NO_DATA", "1")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trace = String::from_utf8_lossy(&out.stderr);
    assert!(
        trace.contains("Transfer-Encoding: chunked"),
        "the push body should be chunked"
    );
    let bare = server.repo_path("admin/proj");
    assert_eq!(
        git(&bare, &["rev-parse", "main"]),
        git(&a, &["rev-parse", "HEAD"])
    );
    git(&bare, &["fsck", "--strict"]);
}

#[test]
fn sixteen_concurrent_clones_pass_fsck() {
    let (server, work) = server_with_pushed_repo(20);
    let url = server.admin_url("admin/proj");
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let url = url.clone();
            let dest = work.path().join(format!("c{i}"));
            std::thread::spawn(move || {
                git(
                    Path::new("/"),
                    &["clone", "-q", "--bare", &url, dest.to_str().unwrap()],
                );
                git(&dest, &["fsck", "--strict"]);
                rev_count(&dest, "main")
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 20);
    }
}

#[test]
fn access_control() {
    let server = Server::start();
    server.add_user("reader", "r-pass");
    server.add_user("writer", "w-pass");
    server.create_repo("admin/private", false);
    server.create_repo("admin/public", true);
    server.admin(&["repo", "grant", "admin/private", "reader", "read"], None);
    server.admin(&["repo", "grant", "admin/private", "writer", "write"], None);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_worktree(&src, 1);
    git(
        &src,
        &["push", "-q", &server.admin_url("admin/private"), "main"],
    );
    git(
        &src,
        &["push", "-q", &server.admin_url("admin/public"), "main"],
    );

    // Anonymous read of a public repo works; anonymous push does not.
    let anon = work.path().join("anon");
    git(
        work.path(),
        &[
            "clone",
            "-q",
            &server.url("admin/public", None),
            anon.to_str().unwrap(),
        ],
    );
    assert!(!git_raw(
        &src,
        &["push", &server.url("admin/public", None), "main:other"],
        &[]
    )
    .status
    .success());

    // Private repo: 401 with a Basic challenge for anonymous and wrong-password clients, and the
    // same answer for a repo that does not exist (existence is not revealed).
    for path in ["/admin/private.git", "/admin/nothing.git"] {
        let raw = raw_request(
            server.addr,
            format!("GET {path}/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(10),
        );
        assert_eq!(status_of(&raw), 401, "{}", String::from_utf8_lossy(&raw));
        assert!(String::from_utf8_lossy(&raw).contains("WWW-Authenticate: Basic"));
    }
    let wrong = server.url("admin/private", Some(("reader", "nope")));
    let out = git_raw(work.path(), &["ls-remote", &wrong], &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Authentication failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Readers read but cannot push (403); writers push.
    let reader_url = server.url("admin/private", Some(("reader", "r-pass")));
    let r = work.path().join("r");
    git(
        work.path(),
        &["clone", "-q", &reader_url, r.to_str().unwrap()],
    );
    let out = git_raw(&r, &["push", &reader_url, "main:refs/heads/nope"], &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let writer_url = server.url("admin/private", Some(("writer", "w-pass")));
    git(&r, &["push", "-q", &writer_url, "main:refs/heads/yes"]);

    // An authenticated user gets 404 for a missing repo, and for a private repo it cannot see.
    let out = git_raw(
        work.path(),
        &[
            "ls-remote",
            &server.url("admin/nothing", Some(("writer", "w-pass"))),
        ],
        &[],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.create_repo("admin/hidden", false);
    let auth = basic_auth("reader", "r-pass");
    let raw = raw_request(
        server.addr,
        format!("GET /admin/hidden.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n").as_bytes(),
        Duration::from_secs(10),
    );
    assert_eq!(status_of(&raw), 404);
}

#[test]
fn traversal_and_option_injection_are_refused() {
    let server = Server::start();
    server.create_repo("admin/proj", true);
    let marker = server.data.path().join("pwned");
    let attempts = [
        "/../../etc/info/refs?service=git-upload-pack".to_owned(),
        "/admin/../../info/refs?service=git-upload-pack".to_owned(),
        "/admin/%2e%2e/info/refs?service=git-upload-pack".to_owned(),
        "/-admin/proj/info/refs?service=git-upload-pack".to_owned(),
        format!(
            "/admin/--upload-pack=touch%20{}/info/refs?service=git-upload-pack",
            marker.display()
        ),
        "/admin/proj/x/info/refs?service=git-upload-pack".to_owned(),
        "//etc/passwd/info/refs?service=git-upload-pack".to_owned(),
        "/admin/proj.git/info/refs?service=git-upload-archive".to_owned(),
        "/admin/proj.git/info/refs?service=--help".to_owned(),
    ];
    for path in &attempts {
        let raw = raw_request(
            server.addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(10),
        );
        let status = status_of(&raw);
        assert!((400..500).contains(&status), "{path} answered {status}");
    }
    assert!(!marker.exists());
    // Dumb HTTP is refused with a message.
    let raw = raw_request(
        server.addr,
        b"GET /admin/proj.git/info/refs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(status_of(&raw), 403);
    assert!(String::from_utf8_lossy(&raw).contains("dumb HTTP"));
    let raw = raw_request(
        server.addr,
        b"GET /admin/proj.git/HEAD HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(status_of(&raw), 404);
}

#[test]
fn malformed_and_oversized_heads_get_clean_errors() {
    let server = Server::start_with(ServerOptions {
        config: Some("[http]\nhead_timeout_secs = 1\n".into()),
        ..ServerOptions::default()
    });
    let cases: [(&[u8], u16); 4] = [
        (b"GARBAGE\r\n\r\n", 400),
        (
            b"GET / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (
            b"POST /a/b/git-upload-pack HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
        ),
        (b"GET / HTTP/1.1\r\nContent-Length: nope\r\n\r\n", 400),
    ];
    for (req, status) in cases {
        let raw = raw_request(server.addr, req, Duration::from_secs(10));
        assert_eq!(status_of(&raw), status, "{}", String::from_utf8_lossy(req));
    }
    let mut big = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..2000 {
        big.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(20)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    assert_eq!(
        status_of(&raw_request(server.addr, &big, Duration::from_secs(10))),
        431
    );

    // Slowloris: a head that never completes is answered 408 and closed after the deadline.
    let start = Instant::now();
    let raw = raw_request(
        server.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(status_of(&raw), 408);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        start.elapsed()
    );
    // The server is still healthy.
    let raw = raw_request(
        server.addr,
        b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(status_of(&raw), 200);
}

#[test]
fn metrics_and_health_endpoints() {
    let (server, work) = server_with_pushed_repo(2);
    let dest = work.path().join("c");
    git(
        work.path(),
        &[
            "clone",
            "-q",
            &server.admin_url("admin/proj"),
            dest.to_str().unwrap(),
        ],
    );
    let raw = raw_request(
        server.addr,
        b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(status_of(&raw), 200);
    let text = String::from_utf8_lossy(&raw);
    let value = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("metric {name} missing:\n{text}"))
    };
    assert!(value("gitplane_http_requests_total{route=\"upload_pack\"}") >= 1);
    assert!(value("gitplane_http_requests_total{route=\"receive_pack\"}") >= 1);
    assert!(value("gitplane_bytes_spliced_total") > 0);
    assert_eq!(value("gitplane_git_processes"), 0);
}
