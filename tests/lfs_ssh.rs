//! Git LFS over pure SSH (`git-lfs-transfer`) end to end: the real OpenSSH client and the real
//! `git-lfs` client against a real `gitplane serve` on loopback, plus raw protocol sessions
//! through `ssh` for what a well-behaved client never sends.
//!
//! git-lfs 3.x tries `git-lfs-transfer` first on an SSH remote and falls back to
//! `git-lfs-authenticate` + HTTP only if that fails; the tests check both sides of that: the
//! client's trace shows the pure-SSH command and no fallback, and the server's HTTP batch
//! counter stays at zero while its LFS byte counters move.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A server, a work dir, and a known_hosts file holding the server's host key.
struct Ssh {
    server: Server,
    work: tempfile::TempDir,
    port: u16,
    known_hosts: PathBuf,
}

impl Ssh {
    fn start_with(opts: ServerOptions) -> Self {
        require_tool("ssh");
        require_tool("git-lfs");
        let server = Server::start_with(opts);
        let port = server.listening["ssh"].port();
        let work = tempfile::tempdir().expect("tempdir");
        let known_hosts = ssh_known_hosts(&server, work.path());
        Self {
            server,
            work,
            port,
            known_hosts,
        }
    }

    fn start() -> Self {
        Self::start_with(ServerOptions::default())
    }

    /// Registers a fresh key for `user` (who must exist).
    fn key_for(&self, user: &str) -> PathBuf {
        let key = ssh_keygen(self.work.path(), &format!("{user}_key"));
        self.server.admin(
            &["key", "add", user, &format!("{}.pub", key.display())],
            None,
        );
        key
    }

    /// `ssh` with only our options: no user config, no agent, strict host key checking.
    fn ssh_command(&self, key: &Path) -> String {
        openssh_command(key, &self.known_hosts)
    }

    fn url(&self, repo: &str) -> String {
        format!("ssh://git@127.0.0.1:{}/{repo}.git", self.port)
    }

    /// A working copy with git-lfs installed locally and `origin` at `repo` over SSH with `key`.
    fn worktree(&self, name: &str, key: &Path, repo: &str) -> PathBuf {
        let dir = self.work.path().join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        git(&dir, &["init", "-q", "-b", "main"]);
        git(&dir, &["config", "user.name", name]);
        git(
            &dir,
            &["config", "user.email", &format!("{name}@example.com")],
        );
        git(&dir, &["config", "core.sshCommand", &self.ssh_command(key)]);
        git(&dir, &["lfs", "install", "--local"]);
        git(&dir, &["remote", "add", "origin", &self.url(repo)]);
        dir
    }

    /// Runs git with a trace of git-lfs's commands; asserts success, returns stderr (the trace).
    fn git_traced(&self, dir: &Path, args: &[&str]) -> String {
        let out = git_raw(
            dir,
            args,
            &[("GIT_TRACE", "1"), ("GIT_LFS_SKIP_SMUDGE", "0")],
        );
        let trace = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "git {args:?} failed ({}):\n{}\nserver log:\n{}",
            out.status,
            tail(&trace, 40),
            tail(&self.server.log(), 30)
        );
        trace
    }

    /// Runs `ssh git@127.0.0.1 COMMAND` with `input` on stdin (then EOF), bounded by a timeout.
    fn raw(&self, key: &Path, command: &str, input: &[u8]) -> Output {
        self.raw_then(key, command, input, true)
    }

    /// [`Self::raw`], with stdin closed after `input` or kept open (a client that goes quiet).
    fn raw_then(&self, key: &Path, command: &str, input: &[u8], eof: bool) -> Output {
        let base = self.ssh_command(key);
        let mut child = Command::new("timeout")
            .arg("30")
            .args(base.split(' '))
            .args(["-p", &self.port.to_string(), "git@127.0.0.1", command])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ssh");
        let mut stdin = child.stdin.take().expect("stdin");
        // The server may stop reading early (it refuses, or the session ends): fine.
        let _ = stdin.write_all(input);
        let open = (!eof).then_some(stdin);
        let out = child.wait_with_output().expect("wait ssh");
        drop(open);
        out
    }

    fn object_path(&self, oid: &str) -> PathBuf {
        self.server.lfs_object_path(oid)
    }

    /// Files left in the LFS staging directory.
    fn staged_files(&self) -> usize {
        std::fs::read_dir(self.server.data_dir().join("lfs/tmp"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// Peak resident memory of a process (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Asserts git-lfs used the pure-SSH protocol and did not fall back to HTTP.
fn assert_pure_ssh(trace: &str) {
    assert!(
        trace.contains("git-lfs-transfer"),
        "git-lfs did not run git-lfs-transfer:\n{}",
        tail(trace, 60)
    );
    for fallback in [
        "pure SSH protocol connection failed",
        "git-lfs-authenticate",
    ] {
        assert!(
            !trace.contains(fallback),
            "git-lfs fell back ({fallback}):\n{}",
            tail(trace, 60)
        );
    }
}

// ---- raw protocol helpers ----

fn pkt(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(format!("{:04x}", payload.len() + 4).as_bytes());
    out.extend_from_slice(payload);
}

fn line(out: &mut Vec<u8>, text: &str) {
    pkt(out, format!("{text}\n").as_bytes());
}

const FLUSH: &[u8] = b"0000";
const DELIM: &[u8] = b"0001";

/// The text packets of a server answer, with `<flush>` and `<delim>` markers; data packets that
/// are not UTF-8 show as `<N bytes>`.
fn packets(mut raw: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while raw.len() >= 4 {
        let len = usize::from_str_radix(std::str::from_utf8(&raw[..4]).unwrap(), 16).unwrap();
        match len {
            0 => out.push("<flush>".to_owned()),
            1 => out.push("<delim>".to_owned()),
            _ => {
                let payload = &raw[4..len];
                out.push(match std::str::from_utf8(payload) {
                    Ok(s) => s.trim_end_matches('\n').to_owned(),
                    Err(_) => format!("<{} bytes>", payload.len()),
                });
            }
        }
        raw = &raw[len.max(4)..];
    }
    assert!(raw.is_empty(), "trailing partial packet");
    out
}

fn start_session() -> Vec<u8> {
    let mut s = Vec::new();
    line(&mut s, "version 1");
    s.extend_from_slice(FLUSH);
    s
}

fn quit(s: &mut Vec<u8>) {
    line(s, "quit");
    s.extend_from_slice(FLUSH);
}

fn put_object(s: &mut Vec<u8>, oid: &str, size: usize, body: &[u8]) {
    line(s, &format!("put-object {oid}"));
    line(s, &format!("size={size}"));
    s.extend_from_slice(DELIM);
    for piece in body.chunks(1000) {
        pkt(s, piece);
    }
    s.extend_from_slice(FLUSH);
}

/// The answers of a session, after the capability advertisement and the version answer.
fn answers(out: &Output) -> Vec<String> {
    let all = packets(&out.stdout);
    assert_eq!(
        all.get(..5),
        Some(
            &[
                "version=1".to_owned(),
                "locking".into(),
                "<flush>".into(),
                "status 200".into(),
                "<flush>".into()
            ][..]
        ),
        "session start: {all:?}"
    );
    all[5..].to_vec()
}

#[test]
fn push_and_clone_binaries_over_git_lfs_transfer() {
    let s = Ssh::start();
    let key = s.key_for("admin");
    s.server.create_repo("admin/media", false);
    let src = s.worktree("src", &key, "admin/media");
    git(&src, &["lfs", "track", "*.bin"]);
    let sizes = [20usize << 20, 50 << 20];
    let mut expected = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let data = random_bytes(*size, i as u64 + 7);
        expected.push((format!("f{i}.bin"), sha256_hex(&data)));
        std::fs::write(src.join(format!("f{i}.bin")), data).unwrap();
    }
    git(&src, &["add", "."]);
    git(&src, &["commit", "-q", "-m", "binaries"]);
    let peak_before = peak_rss_kib(s.server.pid());
    let trace = s.git_traced(&src, &["push", "-q", "origin", "main"]);
    assert_pure_ssh(&trace);

    for (name, oid) in &expected {
        assert!(
            s.object_path(oid).exists(),
            "{name} ({oid}) missing on the server"
        );
    }
    let total: u64 = sizes.iter().map(|n| *n as u64).sum();
    assert!(metric(&s.server, "gitplane_lfs_bytes_in_total") >= total);
    assert_eq!(s.staged_files(), 0, "staging files left behind");

    // Elsewhere: fetch over SSH and check the contents.
    let dest = s.worktree("dest", &key, "admin/media");
    let trace = s.git_traced(&dest, &["pull", "-q", "origin", "main"]);
    assert_pure_ssh(&trace);
    for (name, oid) in &expected {
        let got = std::fs::read(dest.join(name)).unwrap();
        assert_eq!(&sha256_hex(&got), oid, "{name} differs after the clone");
    }
    assert!(metric(&s.server, "gitplane_lfs_bytes_out_total") >= total);
    // Objects streamed through small buffers: the server's peak memory grew by far less than
    // one object (50 MiB), let alone both.
    let grown = peak_rss_kib(s.server.pid()).saturating_sub(peak_before);
    eprintln!("server peak RSS grew by {grown} KiB during the SSH LFS push and pull");
    assert!(grown < 24 * 1024, "peak RSS grew by {grown} KiB");
    // Nothing went through the HTTP LFS API.
    assert_eq!(metric(&s.server, "gitplane_lfs_batch_requests_total"), 0);
    assert!(s
        .server
        .log()
        .contains("git-lfs-transfer put-object stored"));
}

#[test]
fn locks_over_ssh_with_a_conflict_between_users() {
    let s = Ssh::start();
    let admin_key = s.key_for("admin");
    s.server.add_user("alice", "a-pass");
    s.server.add_user("bob", "b-pass");
    let (alice_key, bob_key) = (s.key_for("alice"), s.key_for("bob"));
    s.server.create_repo("admin/art", false);
    for u in ["alice", "bob"] {
        s.server
            .admin(&["repo", "grant", "admin/art", u, "write"], None);
    }
    let a = s.worktree("alice", &alice_key, "admin/art");
    git(&a, &["lfs", "track", "--lockable", "*.psd"]);
    std::fs::write(a.join("cover.psd"), random_bytes(4096, 3)).unwrap();
    git(&a, &["add", "."]);
    git(&a, &["commit", "-q", "-m", "art"]);
    s.git_traced(&a, &["push", "-q", "origin", "main"]);
    let b = s.worktree("bob", &bob_key, "admin/art");
    s.git_traced(&b, &["pull", "-q", "origin", "main"]);

    let trace = s.git_traced(&a, &["lfs", "lock", "cover.psd"]);
    assert_pure_ssh(&trace);
    let listed = s.git_traced(&b, &["lfs", "locks"]);
    let listed_out = git_raw(&b, &["lfs", "locks"], &[]);
    let listed_text = String::from_utf8_lossy(&listed_out.stdout);
    assert!(
        listed_text.contains("cover.psd") && listed_text.contains("alice"),
        "{listed_text}\n{listed}"
    );
    // Bob can neither take nor break Alice's lock.
    let out = git_raw(&b, &["lfs", "lock", "cover.psd"], &[]);
    assert!(!out.status.success(), "bob took alice's lock");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already locked"), "{err}");
    let out = git_raw(&b, &["lfs", "unlock", "--force", "cover.psd"], &[]);
    assert!(!out.status.success(), "a writer may not force-unlock");
    // Alice sees it as hers.
    let verify = git_raw(&a, &["lfs", "locks", "--verify"], &[]);
    let verify_text = String::from_utf8_lossy(&verify.stdout);
    assert!(verify_text.contains("cover.psd"), "{verify_text}");
    // Alice unlocks; then Bob can lock.
    s.git_traced(&a, &["lfs", "unlock", "cover.psd"]);
    s.git_traced(&b, &["lfs", "lock", "cover.psd"]);
    // The repository's owner may break Bob's lock.
    let c = s.worktree("admin", &admin_key, "admin/art");
    s.git_traced(&c, &["pull", "-q", "origin", "main"]);
    s.git_traced(&c, &["lfs", "unlock", "--force", "cover.psd"]);
    let after = git_raw(&b, &["lfs", "locks"], &[]);
    assert!(!String::from_utf8_lossy(&after.stdout).contains("cover.psd"));
    assert_eq!(metric(&s.server, "gitplane_lfs_batch_requests_total"), 0);
}

#[test]
fn corrupt_put_object_is_refused_and_leaves_nothing() {
    let s = Ssh::start();
    let key = s.key_for("admin");
    s.server.create_repo("admin/raw", false);
    let good = b"hello, lfs over ssh\n".repeat(300);
    let oid = sha256_hex(&good);
    let mut bad = good.clone();
    bad[100] ^= 1;

    let mut input = start_session();
    // Right size, wrong bytes.
    put_object(&mut input, &oid, good.len(), &bad);
    // Short body.
    put_object(&mut input, &oid, good.len(), &good[..good.len() - 1]);
    // Too long a body.
    let mut long = good.clone();
    long.push(b'!');
    put_object(&mut input, &oid, good.len(), &long);
    line(&mut input, &format!("verify-object {oid}"));
    line(&mut input, &format!("size={}", good.len()));
    input.extend_from_slice(FLUSH);
    quit(&mut input);
    let out = s.raw(&key, "git-lfs-transfer admin/raw upload", &input);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = answers(&out);
    let statuses: Vec<&String> = got.iter().filter(|l| l.starts_with("status ")).collect();
    assert_eq!(
        statuses,
        [
            "status 422",
            "status 400",
            "status 400",
            "status 404",
            "status 200"
        ],
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|l| l.contains("does not match the object id")),
        "{got:?}"
    );
    assert!(
        !s.object_path(&oid).exists(),
        "a corrupt object became visible"
    );
    assert_eq!(s.staged_files(), 0, "staging files left behind");
    assert!(metric(&s.server, "gitplane_lfs_verify_failures_total") >= 1);

    // The same object with the right bytes is stored, verified and served back.
    let mut input = start_session();
    put_object(&mut input, &oid, good.len(), &good);
    line(&mut input, &format!("verify-object {oid}"));
    line(&mut input, &format!("size={}", good.len()));
    input.extend_from_slice(FLUSH);
    quit(&mut input);
    let out = s.raw(&key, "git-lfs-transfer admin/raw upload", &input);
    let got = answers(&out);
    assert_eq!(
        got,
        [
            "status 200",
            "<flush>",
            "status 200",
            "<flush>",
            "status 200",
            "<flush>"
        ],
        "{got:?}"
    );
    assert!(s.object_path(&oid).exists());

    let mut input = start_session();
    line(&mut input, "batch");
    line(&mut input, "hash-algo=sha256");
    input.extend_from_slice(DELIM);
    line(&mut input, &format!("{oid} {}", good.len()));
    line(&mut input, &format!("{} 1", "0".repeat(64)));
    input.extend_from_slice(FLUSH);
    line(&mut input, &format!("get-object {oid}"));
    input.extend_from_slice(FLUSH);
    quit(&mut input);
    let out = s.raw(&key, "git-lfs-transfer '/admin/raw.git' download", &input);
    let raw = &out.stdout;
    let got = answers(&out);
    assert_eq!(
        got[..6],
        [
            "status 200".to_owned(),
            "hash-algo=sha256".into(),
            "<delim>".into(),
            format!("{oid} {} download", good.len()),
            format!("{} 1 noop", "0".repeat(64)),
            "<flush>".into()
        ],
        "{got:?}"
    );
    assert_eq!(
        got[6..9],
        [
            "status 200".to_owned(),
            format!("size={}", good.len()),
            "<delim>".into()
        ]
    );
    // The body round-trips byte for byte.
    let needle = format!("size={}\n", good.len());
    let at = raw
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .expect("get-object head")
        + needle.len()
        + 4;
    let mut body = Vec::new();
    let mut rest = &raw[at..];
    loop {
        let len = usize::from_str_radix(std::str::from_utf8(&rest[..4]).unwrap(), 16).unwrap();
        if len == 0 {
            break;
        }
        body.extend_from_slice(&rest[4..len]);
        rest = &rest[len..];
    }
    assert_eq!(body, good);
}

#[test]
fn malformed_input_gets_an_error_status_never_a_hang() {
    let s = Ssh::start();
    let key = s.key_for("admin");
    s.server.create_repo("admin/raw", false);
    let oid = "a".repeat(64);

    // Well-framed nonsense is answered and the session goes on.
    let mut input = Vec::new();
    line(&mut input, &format!("get-object {oid}"));
    input.extend_from_slice(FLUSH); // before version: refused
    input.extend(start_session());
    line(&mut input, "rm -rf /");
    input.extend_from_slice(FLUSH);
    line(&mut input, "batch");
    line(&mut input, "hash-algo=md5");
    input.extend_from_slice(FLUSH);
    line(&mut input, &format!("put-object {oid}"));
    input.extend_from_slice(DELIM);
    pkt(&mut input, b"no size given");
    input.extend_from_slice(FLUSH);
    line(&mut input, "lock");
    line(&mut input, "path=a.bin");
    input.extend_from_slice(FLUSH); // locks need an upload session
    quit(&mut input);
    let out = s.raw(&key, "git-lfs-transfer admin/raw download", &input);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = packets(&out.stdout);
    let statuses: Vec<&String> = all.iter().filter(|l| l.starts_with("status ")).collect();
    assert_eq!(
        statuses,
        [
            "status 400",
            "status 200",
            "status 400",
            "status 409",
            "status 400",
            "status 403",
            "status 200"
        ],
        "{all:?}"
    );
    assert_eq!(s.staged_files(), 0);

    // Broken framing ends the session with an error status and a failed exit.
    let mut input = start_session();
    input.extend_from_slice(b"zzzz garbage");
    let out = s.raw(&key, "git-lfs-transfer admin/raw upload", &input);
    assert!(!out.status.success());
    assert_eq!(out.status.code(), Some(1), "not a timeout");
    let got = answers(&out);
    assert_eq!(got[0], "status 400", "{got:?}");

    // A client that hangs up mid-upload leaves no staging file behind.
    let mut input = start_session();
    line(&mut input, &format!("put-object {oid}"));
    line(&mut input, "size=100000");
    input.extend_from_slice(DELIM);
    pkt(&mut input, &[7u8; 5000]);
    let out = s.raw(&key, "git-lfs-transfer admin/raw upload", &input);
    assert!(out.status.code() != Some(124), "timed out");
    assert!(wait_for(Duration::from_secs(5), || s.staged_files() == 0));
    assert!(!s.object_path(&oid).exists());

    // Read-only users cannot open an upload session at all.
    s.server.add_user("carol", "c-pass");
    let carol = s.key_for("carol");
    s.server
        .admin(&["repo", "grant", "admin/raw", "carol", "read"], None);
    let out = s.raw(
        &carol,
        "git-lfs-transfer admin/raw upload",
        &start_session(),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not push"));
    let out = s.raw(
        &carol,
        "git-lfs-transfer admin/raw download",
        &start_session(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn git_lfs_transfer_with_s3_storage_stores_verified_objects_in_s3() {
    let s3 = S3Server::start();
    let s = Ssh::start_with(ServerOptions {
        config: Some(s3.bucket_config("ssh-lfs")),
        ..ServerOptions::default()
    });
    let key = s.key_for("admin");
    s.server.create_repo("admin/media", false);

    // A corrupt put-object is refused before anything reaches S3.
    let good = random_bytes(6 << 20, 31);
    let oid = sha256_hex(&good);
    let mut bad = good.clone();
    bad[3 << 20] ^= 1;
    let mut input = start_session();
    put_object(&mut input, &oid, good.len(), &bad);
    quit(&mut input);
    let out = s.raw(&key, "git-lfs-transfer admin/media upload", &input);
    let got = answers(&out);
    assert!(got.contains(&"status 422".to_owned()), "{got:?}");
    let key_of = |oid: &str| S3Server::object_key("ssh-lfs", oid);
    assert_eq!(
        status_of(&s3.call(&format!("GET {}", key_of(&oid)))),
        404,
        "a refused upload reached S3"
    );

    // The real client, pure SSH both ways: 12 MiB (three 5 MiB parts), 1 byte and 6 MiB.
    let src = s.worktree("src", &key, "admin/media");
    git(&src, &["lfs", "track", "*.bin"]);
    let mut expected = Vec::new();
    for (i, data) in [random_bytes(12 << 20, 41), vec![7u8], good]
        .into_iter()
        .enumerate()
    {
        expected.push((format!("f{i}.bin"), sha256_hex(&data), data.len()));
        std::fs::write(src.join(format!("f{i}.bin")), data).unwrap();
    }
    git(&src, &["add", "."]);
    git(&src, &["commit", "-q", "-m", "binaries"]);
    assert_pure_ssh(&s.git_traced(&src, &["push", "-q", "origin", "main"]));
    for (name, oid, size) in &expected {
        let stored = s3.call(&format!("GET {}", key_of(oid)));
        assert_eq!(status_of(&stored), 200, "{name} not in S3");
        let body = &stored[stored.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
        assert_eq!(body.len(), *size, "{name}: size in S3");
        assert_eq!(&sha256_hex(body), oid, "{name}: content in S3");
        assert!(!s.object_path(oid).exists(), "{name} also on local disk");
    }
    assert!(!s3.open_uploads("ssh-lfs"), "multipart upload left open");
    assert_eq!(s.staged_files(), 0, "staging files left behind");

    let dest = s.worktree("dest", &key, "admin/media");
    assert_pure_ssh(&s.git_traced(&dest, &["pull", "-q", "origin", "main"]));
    for (name, oid, _) in &expected {
        let got = std::fs::read(dest.join(name)).unwrap();
        assert_eq!(&sha256_hex(&got), oid, "{name} differs after the clone");
    }
    assert_eq!(metric(&s.server, "gitplane_lfs_batch_requests_total"), 0);
}

/// A git-lfs-transfer client that goes quiet mid-upload, with its connection still up, is cut
/// at `ssh.channel_idle_secs`; its staging file is removed and nothing is stored.
#[test]
fn a_quiet_transfer_session_is_cut_and_leaves_nothing() {
    let s = Ssh::start_with(ServerOptions {
        config: Some("[ssh]\nchannel_idle_secs = 2\n".into()),
        ..ServerOptions::default()
    });
    let key = s.key_for("admin");
    s.server.create_repo("admin/quiet", false);
    let oid = "b".repeat(64);
    let mut input = start_session();
    line(&mut input, &format!("put-object {oid}"));
    line(&mut input, "size=100000");
    input.extend_from_slice(DELIM);
    pkt(&mut input, &[7u8; 5000]);
    let started = std::time::Instant::now();
    let out = s.raw_then(&key, "git-lfs-transfer admin/quiet upload", &input, false);
    assert_ne!(
        out.status.code(),
        Some(124),
        "the quiet session was never cut"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "cut before the deadline"
    );
    assert!(
        metric(
            &s.server,
            "gitplane_stalled_cuts_total{reason=\"ssh_channel_idle\"}"
        ) >= 1
    );
    assert!(wait_for(Duration::from_secs(5), || s.staged_files() == 0));
    assert!(!s.object_path(&oid).exists());
}
