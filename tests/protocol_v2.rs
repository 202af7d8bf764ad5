//! Protocol v2 over smart HTTP answered without git (issue #12, item 6): the capability
//! advertisement and `ls-refs` must be byte for byte what `git upload-pack` itself answers, under
//! the same configuration, for the same repository.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The answer of `git upload-pack` itself, run the way gitplane runs its git children.
fn git_upload_pack(repo: &Path, advertise: bool, stdin: &[u8]) -> Vec<u8> {
    let home = tempfile::tempdir().expect("tempdir");
    let mut cmd: Command = gitplane::git::process::git_command(Path::new("git"), home.path());
    cmd.env("GIT_PROTOCOL", "version=2").arg("upload-pack");
    if advertise {
        cmd.arg("--advertise-refs");
    }
    let mut child = cmd
        .arg("--stateless-rpc")
        .arg(repo)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("git upload-pack");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    out.stdout
}

/// The body of the one HTTP/1.1 response in `raw` (Content-Length or chunked).
fn response_body(raw: &[u8]) -> Vec<u8> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of head");
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let mut body = &raw[split + 4..];
    assert!(head.starts_with("http/1.1 200"), "{head}");
    if !head.contains("transfer-encoding: chunked") {
        return body.to_vec();
    }
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size");
        let size = usize::from_str_radix(std::str::from_utf8(&body[..line_end]).unwrap(), 16)
            .expect("hex chunk size");
        body = &body[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

fn pkt(lines: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        match *l {
            "0000" | "0001" => out.extend_from_slice(l.as_bytes()),
            text => out.extend_from_slice(format!("{:04x}{text}", text.len() + 4).as_bytes()),
        }
    }
    out
}

/// The body of a 200 answer to a v2 upload-pack POST.
fn post_upload_pack(server: &Server, repo: &str, body: &[u8]) -> Vec<u8> {
    response_body(&post_upload_pack_raw(server, repo, body))
}

/// The whole answer, head included, to a v2 upload-pack POST.
fn post_upload_pack_raw(server: &Server, repo: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /{repo}.git/git-upload-pack HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
         Git-Protocol: version=2\r\nContent-Type: application/x-git-upload-pack-request\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    raw_request(server.addr, &request, Duration::from_secs(20))
}

fn get_advertisement(server: &Server, repo: &str) -> Vec<u8> {
    let request = format!(
        "GET /{repo}.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: t\r\n\
         Connection: close\r\nGit-Protocol: version=2\r\n\r\n"
    );
    response_body(&raw_request(
        server.addr,
        request.as_bytes(),
        Duration::from_secs(20),
    ))
}

/// The requests a client sends, and the corners of ls-refs: peeling, symrefs, unborn, prefixes,
/// capability lines.
fn ls_refs_requests() -> Vec<Vec<u8>> {
    let caps = [
        "command=ls-refs\n",
        "agent=git/2.47.3\n",
        "object-format=sha1\n",
    ];
    let with = |args: &[&str]| {
        let mut lines = caps.to_vec();
        lines.push("0001");
        lines.extend_from_slice(args);
        lines.push("0000");
        pkt(&lines)
    };
    vec![
        // What `git clone` sends.
        with(&[
            "peel\n",
            "symrefs\n",
            "unborn\n",
            "ref-prefix HEAD\n",
            "ref-prefix refs/heads/\n",
            "ref-prefix refs/tags/\n",
        ]),
        // What `git ls-remote` sends.
        with(&["symrefs\n", "peel\n", "unborn\n"]),
        with(&[]),
        pkt(&["command=ls-refs\n", "0000"]),
        with(&["symrefs\n"]),
        with(&["peel\n", "ref-prefix refs/tags/\n"]),
        with(&[
            "ref-prefix refs/heads/ma\n",
            "ref-prefix refs/heads/feature\n",
        ]),
        with(&["peel\n", "symrefs\n", "ref-prefix refs/heads/"]),
        with(&["unborn\n", "ref-prefix HEAD\n"]),
        pkt(&[
            "command=ls-refs\n",
            "server-option=ci.skip\n",
            "0001",
            "peel\n",
            "symrefs\n",
            "0000",
        ]),
    ]
}

#[test]
fn ls_refs_and_the_advertisement_are_byte_identical_to_git() {
    let server = Server::start();
    server.create_repo("admin/refs", true);
    let repo = server.repo_path("admin/refs");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_worktree(&src, 3);
    git(&src, &["branch", "feature/a"]);
    git(&src, &["branch", "maint"]);
    git(&src, &["tag", "light"]);
    git(&src, &["tag", "-a", "-m", "v1", "v1.0"]);
    git(
        &src,
        &["tag", "-a", "-m", "tag of a tag", "v1.0-signed", "v1.0"],
    );
    let blob = git(&src, &["rev-parse", "HEAD:file0.txt"]);
    git(
        &src,
        &["tag", "-a", "-m", "a blob", "blob-tag", blob.trim()],
    );
    let url = server.admin_url("admin/refs");
    git(
        &src,
        &[
            "push",
            "-q",
            &url,
            "refs/heads/*:refs/heads/*",
            "refs/tags/*:refs/tags/*",
        ],
    );
    // Some refs packed (as housekeeping leaves them), then more pushed loose, one of them over
    // its packed value, plus a symbolic ref and a dangling one, which git skips.
    git(&repo, &["pack-refs", "--all"]);
    git(&src, &["commit", "-q", "--allow-empty", "-m", "later"]);
    git(&src, &["branch", "feature/b"]);
    git(&src, &["tag", "-a", "-m", "v2", "v2.0"]);
    git(&src, &["push", "-q", &url, "main", "feature/b", "v2.0"]);
    git(
        &repo,
        &["symbolic-ref", "refs/heads/alias", "refs/heads/main"],
    );
    git(
        &repo,
        &["symbolic-ref", "refs/heads/dangling", "refs/heads/nothing"],
    );
    assert!(repo.join("packed-refs").exists() && repo.join("refs/heads/main").exists());

    let before = metric(&server, "gitplane_git_v2_ls_refs_total");
    let requests = ls_refs_requests();
    for body in &requests {
        let ours = post_upload_pack(&server, "admin/refs", body);
        let gits = git_upload_pack(&repo, false, body);
        assert!(
            gits.len() > 4,
            "git answered nothing to {}",
            body.escape_ascii()
        );
        assert_eq!(
            ours.escape_ascii().to_string(),
            gits.escape_ascii().to_string(),
            "request {}",
            body.escape_ascii()
        );
    }
    assert_eq!(
        metric(&server, "gitplane_git_v2_ls_refs_total") - before,
        requests.len() as u64,
        "every request above is answered without git"
    );
    let clone_answer = post_upload_pack(&server, "admin/refs", &requests[0]);
    let text = String::from_utf8_lossy(&clone_answer);
    assert!(
        text.contains(" HEAD symref-target:refs/heads/main\n"),
        "{text}"
    );
    assert!(text.contains(" refs/tags/v1.0-signed peeled:"), "{text}");
    assert!(!text.contains("dangling"), "{text}");

    // The advertisement, served from memory.
    let before = metric(&server, "gitplane_git_v2_advertisements_total");
    let ours = get_advertisement(&server, "admin/refs");
    assert_eq!(
        ours.escape_ascii().to_string(),
        git_upload_pack(&repo, true, b"").escape_ascii().to_string()
    );
    assert!(ours.starts_with(b"000eversion 2\n"));
    assert_eq!(
        metric(&server, "gitplane_git_v2_advertisements_total") - before,
        1
    );

    // An empty repository: HEAD is unborn.
    server.create_repo("admin/empty", true);
    let empty = server.repo_path("admin/empty");
    for body in &requests {
        assert_eq!(
            post_upload_pack(&server, "admin/empty", body)
                .escape_ascii()
                .to_string(),
            git_upload_pack(&empty, false, body)
                .escape_ascii()
                .to_string(),
            "request {}",
            body.escape_ascii()
        );
    }
    let unborn = post_upload_pack(&server, "admin/empty", &requests[0]);
    assert!(
        String::from_utf8_lossy(&unborn)[4..].starts_with("unborn HEAD symref-target:refs/heads/"),
        "{}",
        unborn.escape_ascii()
    );
}

#[test]
fn what_git_must_decide_goes_to_git() {
    let server = Server::start();
    server.create_repo("admin/hidden", true);
    let repo = server.repo_path("admin/hidden");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_worktree(&src, 2);
    git(&src, &["branch", "secret"]);
    let url = server.admin_url("admin/hidden");
    git(&src, &["push", "-q", &url, "main", "secret"]);

    // A repository's own upload-pack settings: git reads them, so git answers.
    git(
        &repo,
        &["config", "uploadpack.hideRefs", "refs/heads/secret"],
    );
    let answered = metric(&server, "gitplane_git_v2_ls_refs_total");
    let advertised = metric(&server, "gitplane_git_v2_advertisements_total");
    let clone_request = &ls_refs_requests()[0];
    let ours = post_upload_pack(&server, "admin/hidden", clone_request);
    assert_eq!(ours, git_upload_pack(&repo, false, clone_request));
    let text = String::from_utf8_lossy(&ours);
    assert!(
        text.contains("refs/heads/main") && !text.contains("secret"),
        "{text}"
    );
    assert_eq!(
        get_advertisement(&server, "admin/hidden"),
        git_upload_pack(&repo, true, b"")
    );

    // Requests outside the common shape: git's own answer, whatever it is.
    let unusual = [
        pkt(&["command=ls-refs\n", "object-format=sha256\n", "0000"]),
        pkt(&["command=ls-refs\n", "0001", "frobnicate\n", "0000"]),
        pkt(&["command=ls-refs\n", "0001", "peel\n"]),
    ];
    git(&repo, &["config", "--unset", "uploadpack.hideRefs"]);
    let answered_before_unusual = metric(&server, "gitplane_git_v2_ls_refs_total");
    for body in &unusual {
        let raw = post_upload_pack_raw(&server, "admin/hidden", body);
        assert!(!raw.is_empty(), "no answer to {}", body.escape_ascii());
        assert!(
            !String::from_utf8_lossy(&raw).contains("refs/heads/main"),
            "{} listed refs: {}",
            body.escape_ascii(),
            raw.escape_ascii()
        );
    }
    assert_eq!(
        metric(&server, "gitplane_git_v2_ls_refs_total"),
        answered_before_unusual
    );
    assert_eq!(metric(&server, "gitplane_git_v2_ls_refs_total"), answered);
    assert_eq!(
        metric(&server, "gitplane_git_v2_advertisements_total"),
        advertised
    );
}

#[test]
fn a_v2_clone_and_ls_remote_spawn_git_only_for_the_pack() {
    let (server, work) = server_with_pushed_repo(4);
    let repo = server.repo_path("admin/proj");
    let url = server.admin_url("admin/proj");
    git(&repo, &["tag", "-a", "-m", "t", "v1", "main"]);
    let spawned = metric(&server, "gitplane_git_spawned_total");
    let answered = metric(&server, "gitplane_git_v2_ls_refs_total");
    let advertised = metric(&server, "gitplane_git_v2_advertisements_total");

    let dest = work.path().join("clone");
    git(
        work.path(),
        &[
            "-c",
            "protocol.version=2",
            "clone",
            "-q",
            &url,
            dest.to_str().unwrap(),
        ],
    );
    assert_eq!(rev_count(&dest, "HEAD"), 4);
    git(&dest, &["fsck", "--strict"]);
    let remote = git(
        work.path(),
        &["-c", "protocol.version=2", "ls-remote", &url],
    );
    let local = git(work.path(), &["ls-remote", repo.to_str().unwrap()]);
    assert_eq!(remote, local);

    assert_eq!(
        metric(&server, "gitplane_git_v2_ls_refs_total") - answered,
        2
    );
    assert_eq!(
        metric(&server, "gitplane_git_v2_advertisements_total") - advertised,
        2
    );
    // One upload-pack for the clone's pack (none if the pack cache served it), none for
    // ls-remote.
    assert!(metric(&server, "gitplane_git_spawned_total") - spawned <= 1);
}

#[test]
fn ls_refs_never_misses_a_ref_while_pushes_and_pack_refs_run() {
    // Housekeeping packs refs after nearly every push: loose refs move into packed-refs while
    // ls-refs reads them.
    let server = Server::start_with(ServerOptions {
        config: Some(
            "[housekeeping]\nsweep_interval_secs = 0\nloose_refs_limit = 2\n\
             [hooks.concurrency]\nhousekeeping = 2\n"
                .into(),
        ),
        ..ServerOptions::default()
    });
    server.create_repo("admin/busy", true);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_worktree(&src, 2);
    let url = server.admin_url("admin/busy");
    let stable: Vec<String> = (0..20).map(|i| format!("refs/heads/stable-{i}")).collect();
    let mut refspecs = vec!["main".to_owned()];
    refspecs.extend(stable.iter().map(|r| format!("HEAD:{r}")));
    let mut args = vec!["push", "-q", url.as_str()];
    args.extend(refspecs.iter().map(String::as_str));
    git(&src, &args);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Each push moves every stable branch too: it is loose again until the next pack-refs moves
    // it into packed-refs, so the stable names keep crossing from one store to the other.
    let pusher = {
        let (src, url, stop) = (src.clone(), url.clone(), std::sync::Arc::clone(&stop));
        let refspecs = refspecs.clone();
        std::thread::spawn(move || {
            for i in 0..30 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                git(
                    &src,
                    &["commit", "-q", "--allow-empty", "-m", &format!("n{i}")],
                );
                let new = format!("HEAD:refs/heads/new-{i}");
                let mut args = vec!["push", "-q", url.as_str(), new.as_str()];
                args.extend(refspecs.iter().map(String::as_str));
                git(&src, &args);
            }
        })
    };
    let request = &ls_refs_requests()[2]; // every ref, no arguments
    let started = std::time::Instant::now();
    let mut answers = 0;
    while !pusher.is_finished() && started.elapsed() < Duration::from_secs(120) {
        let answer =
            String::from_utf8_lossy(&post_upload_pack(&server, "admin/busy", request)).into_owned();
        for name in &stable {
            assert!(
                answer.contains(&format!(" {name}\n")),
                "{name} missing from an ls-refs answer during pushes:\n{answer}"
            );
        }
        answers += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    pusher.join().expect("pusher");
    let packed = metric(
        &server,
        "gitplane_housekeeping_runs_total{task=\"pack_refs\",outcome=\"ok\"}",
    );
    eprintln!("{answers} ls-refs answers during 30 pushes and {packed} pack-refs runs");
    assert!(answers >= 10, "only {answers} answers during the pushes");
    assert!(
        packed >= 3,
        "only {packed} pack-refs runs: the race was not exercised"
    );
    // And once quiet, the answer is git's.
    let repo = server.repo_path("admin/busy");
    assert!(wait_for(Duration::from_secs(30), || metric(
        &server,
        "gitplane_housekeeping_running"
    ) == 0));
    assert_eq!(
        post_upload_pack(&server, "admin/busy", request),
        git_upload_pack(&repo, false, request)
    );
}
