//! Git over SSH end to end: the real OpenSSH client and real `git` against a real
//! `gitplane serve` on loopback, with a test key and a known_hosts file holding the server's
//! host key (StrictHostKeyChecking=yes, so a wrong host key fails every test).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A running server, a work dir and the admin's registered key.
struct Ssh {
    server: Server,
    work: tempfile::TempDir,
    port: u16,
    known_hosts: PathBuf,
    admin_key: PathBuf,
}

fn pub_of(key: &Path) -> String {
    format!("{}.pub", key.display())
}

impl Ssh {
    fn start() -> Self {
        Self::start_with(ServerOptions::default())
    }

    fn start_with(opts: ServerOptions) -> Self {
        require_tool("ssh");
        let server = Server::start_with(opts);
        let addr = server.listening["ssh"];
        let work = tempfile::tempdir().expect("tempdir");
        let known_hosts = ssh_known_hosts(&server, work.path());
        let admin_key = ssh_keygen(work.path(), "admin_key");
        server.admin(&["key", "add", "admin", &pub_of(&admin_key)], None);
        Self {
            server,
            work,
            port: addr.port(),
            known_hosts,
            admin_key,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.listening["ssh"]
    }

    /// `ssh` with only our options: no user config, no agent, strict host key checking.
    fn ssh_base(&self, key: &Path) -> String {
        openssh_command(key, &self.known_hosts)
    }

    fn url(&self, repo: &str) -> String {
        format!("ssh://git@127.0.0.1:{}/{repo}.git", self.port)
    }

    fn git_env<'a>(&'a self, cmd: &'a str) -> [(&'a str, &'a str); 1] {
        [("GIT_SSH_COMMAND", cmd)]
    }

    /// Runs git with GIT_SSH_COMMAND using `key`.
    fn git(&self, key: &Path, dir: &Path, args: &[&str]) -> Output {
        let cmd = self.ssh_base(key);
        git_raw(dir, args, &self.git_env(&cmd))
    }

    fn git_ok(&self, dir: &Path, args: &[&str]) -> String {
        let out = self.git(&self.admin_key, dir, args);
        assert!(
            out.status.success(),
            "git {args:?} failed ({}):\n{}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            tail(&self.server.log())
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ssh [extra...] git@127.0.0.1 [command...]` with `key`, bounded by a timeout.
    fn ssh(&self, key: &Path, extra: &[&str], command: &[&str]) -> Output {
        let base = self.ssh_base(key);
        let mut cmd = Command::new("timeout");
        cmd.arg("30")
            .args(base.split(' '))
            .args(["-p", &self.port.to_string()])
            .args(extra)
            .arg("git@127.0.0.1")
            .args(command)
            .stdin(Stdio::null());
        cmd.output().expect("run ssh")
    }

    /// A private repo `admin/proj` with `commits` commits, pushed over SSH.
    fn with_repo(commits: usize) -> Self {
        let s = Self::start();
        s.server.create_repo("admin/proj", false);
        let src = s.work.path().join("src");
        make_worktree(&src, commits);
        s.git_ok(&src, &["push", "-q", &s.url("admin/proj"), "main"]);
        s
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn clone_v0_and_v2_negotiate_the_asked_protocol() {
    let s = Ssh::with_repo(3);
    for (version, expect_v2) in [("0", false), ("2", true)] {
        let dest = s.work.path().join(format!("clone-v{version}"));
        let cmd = s.ssh_base(&s.admin_key);
        let out = git_raw(
            s.work.path(),
            &[
                "-c",
                &format!("protocol.version={version}"),
                "clone",
                &s.url("admin/proj"),
                dest.to_str().unwrap(),
            ],
            &[("GIT_SSH_COMMAND", &cmd), ("GIT_TRACE_PACKET", "1")],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let trace = stderr(&out);
        assert_eq!(
            trace.contains("< version 2"),
            expect_v2,
            "protocol v{version} trace:\n{trace}"
        );
        assert_eq!(rev_count(&dest, "HEAD"), 3);
        git(&dest, &["fsck", "--strict"]);
    }
    // The scp-like form (`git@host:OWNER/NAME.git`, no leading slash) and `~/` work too.
    for (i, url) in [
        format!("ssh://git@127.0.0.1:{}/~/admin/proj.git", s.port),
        format!("ssh://git@127.0.0.1:{}/~admin/proj", s.port),
    ]
    .iter()
    .enumerate()
    {
        let dest = s.work.path().join(format!("clone-form-{i}"));
        s.git_ok(s.work.path(), &["clone", "-q", url, dest.to_str().unwrap()]);
        assert_eq!(rev_count(&dest, "HEAD"), 3);
    }
    let out = s.ssh(
        &s.admin_key,
        &["-v"],
        &["git-upload-pack", "'admin/proj.git'"],
    );
    // Without input, upload-pack advertises and exits when stdin closes.
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("refs/heads/main"),
        "{out:?}"
    );
    // The cipher OpenSSH ends up with: AES-GCM where this CPU has AES and carry-less multiply
    // instructions (chacha20-poly1305, OpenSSH's first choice, is then not offered).
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo");
    let hardware_aes = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| {
            let flags: Vec<&str> = l.split_whitespace().collect();
            flags.contains(&"aes") && flags.contains(&"pclmulqdq")
        });
    let expected = if hardware_aes {
        "cipher: aes128-gcm@openssh.com"
    } else {
        "cipher: chacha20-poly1305@openssh.com"
    };
    assert!(stderr(&out).contains(expected), "{}", stderr(&out));
}

#[test]
fn shallow_and_partial_clones() {
    let s = Ssh::with_repo(5);
    let dest = s.work.path().join("shallow");
    s.git_ok(
        s.work.path(),
        &[
            "clone",
            "-q",
            "--depth",
            "1",
            &s.url("admin/proj"),
            dest.to_str().unwrap(),
        ],
    );
    assert_eq!(rev_count(&dest, "HEAD"), 1);
    s.git_ok(&dest, &["fetch", "-q", "--deepen", "2"]);
    assert_eq!(rev_count(&dest, "HEAD"), 3);
    s.git_ok(&dest, &["fetch", "-q", "--unshallow"]);
    assert_eq!(rev_count(&dest, "HEAD"), 5);

    let bare = s.work.path().join("partial.git");
    s.git_ok(
        s.work.path(),
        &[
            "clone",
            "-q",
            "--bare",
            "--filter=blob:none",
            &s.url("admin/proj"),
            bare.to_str().unwrap(),
        ],
    );
    let missing = git(
        &bare,
        &["rev-list", "--objects", "--missing=print", "--all"],
    );
    let missing: Vec<&str> = missing
        .lines()
        .filter_map(|l| l.strip_prefix('?'))
        .collect();
    assert_eq!(missing.len(), 5, "every blob is left out: {missing:?}");
    // Reading one fetches it lazily, over SSH again.
    let blob = s.git_ok(&bare, &["cat-file", "-p", missing[0]]);
    assert!(blob.starts_with("content "), "{blob}");
}

#[test]
fn push_force_push_and_delete() {
    let s = Ssh::with_repo(2);
    let url = s.url("admin/proj");
    let dest = s.work.path().join("c");
    s.git_ok(
        s.work.path(),
        &["clone", "-q", &url, dest.to_str().unwrap()],
    );
    // A new branch with a new commit.
    git(&dest, &["checkout", "-q", "-b", "topic"]);
    std::fs::write(dest.join("new.txt"), "new\n").unwrap();
    git(&dest, &["add", "."]);
    git(&dest, &["commit", "-q", "-m", "topic work"]);
    s.git_ok(&dest, &["push", "-q", "origin", "topic"]);
    let remote = s.git_ok(&dest, &["ls-remote", "origin"]);
    assert!(remote.contains("refs/heads/topic"), "{remote}");
    // Rewrite it: a plain push is refused, a forced one goes through.
    git(&dest, &["commit", "-q", "--amend", "-m", "rewritten"]);
    let out = s.git(&s.admin_key, &dest, &["push", "-q", "origin", "topic"]);
    assert!(!out.status.success(), "non-fast-forward push was accepted");
    s.git_ok(&dest, &["push", "-q", "--force", "origin", "topic"]);
    let head = git(&dest, &["rev-parse", "HEAD"]);
    let on_server = git(&s.server.repo_path("admin/proj"), &["rev-parse", "topic"]);
    assert_eq!(head, on_server);
    // Delete it.
    s.git_ok(&dest, &["push", "-q", "origin", "--delete", "topic"]);
    let remote = s.git_ok(&dest, &["ls-remote", "origin"]);
    assert!(!remote.contains("refs/heads/topic"), "{remote}");
    git(&s.server.repo_path("admin/proj"), &["fsck", "--strict"]);
}

#[test]
fn eight_concurrent_clones_pass_fsck() {
    let s = Ssh::start();
    make_big_repo(&s.server, "admin/big", 4 << 20);
    let url = s.url("admin/big");
    let cmd = s.ssh_base(&s.admin_key);
    let work = s.work.path().to_owned();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (url, cmd, work) = (url.clone(), cmd.clone(), work.clone());
            std::thread::spawn(move || {
                let dest = work.join(format!("c{i}"));
                let out = git_raw(
                    &work,
                    &["clone", "-q", &url, dest.to_str().unwrap()],
                    &[("GIT_SSH_COMMAND", &cmd)],
                );
                assert!(out.status.success(), "clone {i}: {}", stderr(&out));
                git(&dest, &["fsck", "--strict"]);
                dest
            })
        })
        .collect();
    for h in handles {
        let dest = h.join().expect("clone thread");
        assert_eq!(
            std::fs::metadata(dest.join("big.bin")).unwrap().len(),
            4 << 20
        );
    }
}

#[test]
fn unknown_key_and_wrong_user_are_refused() {
    let s = Ssh::with_repo(1);
    let stranger = ssh_keygen(s.work.path(), "stranger");
    let out = s.ssh(&stranger, &[], &["git-upload-pack", "'admin/proj.git'"]);
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert!(
        stderr(&out).contains("Permission denied (publickey)"),
        "{out:?}"
    );
    let dest = s.work.path().join("nope");
    let out = s.git(
        &stranger,
        s.work.path(),
        &["clone", "-q", &s.url("admin/proj"), dest.to_str().unwrap()],
    );
    assert!(!out.status.success());
    // A registered key with a user name other than `git` is refused as well.
    let base = s.ssh_base(&s.admin_key);
    let out = Command::new("timeout")
        .arg("30")
        .args(base.split(' '))
        .args([
            "-p",
            &s.port.to_string(),
            "admin@127.0.0.1",
            "git-upload-pack",
            "admin/proj",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert!(metric(&s.server, "gitplane_ssh_auth_rejected_total") >= 2);
}

#[test]
fn read_only_key_cannot_push_and_strangers_see_nothing() {
    let s = Ssh::with_repo(1);
    s.server.add_user("bob", "pw-bob");
    let bob = ssh_keygen(s.work.path(), "bob");
    s.server.admin(&["key", "add", "bob", &pub_of(&bob)], None);
    // Without a grant the private repository does not exist for bob.
    let dest = s.work.path().join("bob-clone");
    let url = s.url("admin/proj");
    let out = s.git(
        &bob,
        s.work.path(),
        &["clone", "-q", &url, dest.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("repository admin/proj not found"),
        "{}",
        stderr(&out)
    );
    // Read access: clone works, push is refused with a clear message.
    s.server
        .admin(&["repo", "grant", "admin/proj", "bob", "read"], None);
    let out = s.git(
        &bob,
        s.work.path(),
        &["clone", "-q", &url, dest.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(dest.join("x.txt"), "x\n").unwrap();
    git(&dest, &["add", "."]);
    git(&dest, &["commit", "-q", "-m", "bob's change"]);
    let out = s.git(&bob, &dest, &["push", "-q", "origin", "main"]);
    assert!(!out.status.success(), "read-only push accepted");
    assert!(
        stderr(&out).contains("bob may not push to admin/proj"),
        "{}",
        stderr(&out)
    );
    // Write access: the same push goes through.
    s.server
        .admin(&["repo", "grant", "admin/proj", "bob", "write"], None);
    let out = s.git(&bob, &dest, &["push", "-q", "origin", "main"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn shells_commands_ptys_and_forwarding_are_refused() {
    let s = Ssh::with_repo(1);
    let key = &s.admin_key;
    // No command: a shell request.
    let out = s.ssh(key, &[], &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("no shell access"), "{out:?}");
    // An arbitrary command.
    let out = s.ssh(key, &[], &["bash", "-c", "id"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains("`bash` is not a command this server runs"),
        "{out:?}"
    );
    assert!(out.stdout.is_empty());
    // Traversal in the path.
    let out = s.ssh(key, &[], &["git-upload-pack", "'../../etc'"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("invalid repository path"), "{out:?}");
    // A pty request is refused (the command after it still gets its own answer).
    let out = s.ssh(key, &["-tt"], &["bash"]);
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    let text = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    assert!(text.contains("PTY allocation request failed"), "{out:?}");
    // A subsystem (sftp).
    let out = s.ssh(key, &["-s"], &["sftp"]);
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stderr(&out).contains("subsystem `sftp` is not available"),
        "{out:?}"
    );
    // Remote forwarding.
    let out = s.ssh(
        key,
        &[
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            "0:127.0.0.1:9",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert!(stderr(&out).contains("forwarding failed"), "{out:?}");
    // Local forwarding through stdio (a direct-tcpip channel).
    let out = s.ssh(key, &["-W", &s.server.addr.to_string()], &[]);
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert!(stderr(&out).contains("open failed"), "{out:?}");
    // Agent forwarding is refused without breaking the command.
    let out = s.ssh(
        key,
        &["-A"],
        &["git-lfs-authenticate", "admin/proj", "download"],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(metric(&s.server, "gitplane_ssh_requests_refused_total") >= 7);
    // git-lfs-transfer runs (its protocol is tested in tests/lfs_ssh.rs): it advertises its
    // capabilities and ends cleanly when the client closes.
    let out = s.ssh(key, &[], &["git-lfs-transfer", "admin/proj", "download"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.starts_with(b"000eversion=1\n"), "{out:?}");
}

#[test]
fn lfs_authenticate_returns_a_signed_short_lived_token() {
    use gitplane::git::repo_name::RepoName;
    use gitplane::token::{verify, Operation, TokenSecret};

    let s = Ssh::with_repo(1);
    let out = s.ssh(
        &s.admin_key,
        &[],
        &["git-lfs-authenticate", "admin/proj.git", "upload"],
    );
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        v["href"],
        format!("http://{}/admin/proj.git/info/lfs", s.server.addr)
    );
    assert_eq!(v["expires_in"], 600);
    let auth = v["header"]["Authorization"]
        .as_str()
        .expect("Authorization");
    let token = auth.strip_prefix("Bearer ").expect("Bearer token");
    let secret = TokenSecret::load_or_create(&s.server.data_dir()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let repo = RepoName::parse("admin/proj").unwrap();
    let claims = verify(&secret, token, &repo, Operation::Upload, now).expect("valid token");
    assert_eq!(claims.user, "admin");
    assert!(claims.expires_at > now && claims.expires_at <= now + 601);
    assert!(verify(&secret, token, &repo, Operation::Upload, now + 601).is_err());
    let other = RepoName::parse("admin/other").unwrap();
    assert!(verify(&secret, token, &other, Operation::Download, now).is_err());
    // The HTTP LFS endpoint (issue #4) accepts the token, and refuses a tampered one.
    let batch = |authorization: &str| {
        let body = format!(
            "{{\"operation\":\"upload\",\"transfers\":[\"basic\"],\"objects\":[{{\"oid\":\"{}\",\"size\":1}}]}}",
            "a".repeat(64)
        );
        let req = format!(
            "POST /admin/proj.git/info/lfs/objects/batch HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\nAccept: application/vnd.git-lfs+json\r\nContent-Type: application/vnd.git-lfs+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        status_of(&raw_request(
            s.server.addr,
            req.as_bytes(),
            Duration::from_secs(10),
        ))
    };
    assert_eq!(batch(auth), 200);
    let forged = auth.replace(".upload.", ".download.");
    assert_eq!(batch(&forged), 401);
    // Someone without write access gets no upload token.
    s.server.add_user("carol", "pw");
    let carol = ssh_keygen(s.work.path(), "carol");
    s.server
        .admin(&["key", "add", "carol", &pub_of(&carol)], None);
    s.server
        .admin(&["repo", "grant", "admin/proj", "carol", "read"], None);
    let out = s.ssh(
        &carol,
        &[],
        &["git-lfs-authenticate", "admin/proj", "upload"],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
    let out = s.ssh(
        &carol,
        &[],
        &["git-lfs-authenticate", "admin/proj", "download"],
    );
    assert!(out.status.success(), "{out:?}");
}

/// Reads from `stream` until EOF or error; the time it took, or None if still open at `limit`.
fn wait_closed(stream: &mut TcpStream, limit: Instant) -> Option<Instant> {
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).ok()?;
        match stream.read(&mut buf) {
            Ok(0) => return Some(Instant::now()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(_) => return Some(Instant::now()),
        }
    }
}

#[test]
fn stalled_handshakes_are_cut_at_the_deadline_while_clones_work() {
    const DEADLINE: Duration = Duration::from_secs(3);
    let s = Ssh::start_with(ServerOptions {
        config: Some(
            "[ssh]\nhandshake_timeout_secs = 3\nmax_unauthenticated = 1000\nmax_unauthenticated_per_ip = 1000\n"
                .into(),
        ),
        ..ServerOptions::default()
    });
    s.server.create_repo("admin/proj", false);
    let src = s.work.path().join("src");
    make_worktree(&src, 2);
    s.git_ok(&src, &["push", "-q", &s.url("admin/proj"), "main"]);

    let opened = Instant::now();
    // 200 connections that never send a byte.
    let mut silent: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(s.addr()).expect("connect"))
        .collect();
    // 50 that send their version line and then stop (the server moves on to key exchange).
    let mut after_version: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut c = TcpStream::connect(s.addr()).expect("connect");
            c.write_all(b"SSH-2.0-OpenSSH_9.2 stall\r\n")
                .expect("version");
            c
        })
        .collect();
    // Each of those got the server's version line: the server took them.
    for c in after_version.iter_mut() {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 8];
        c.read_exact(&mut buf).expect("server version");
        assert_eq!(&buf, b"SSH-2.0-");
    }
    // While they stall, a real clone works.
    let dest = s.work.path().join("during-stall");
    s.git_ok(
        s.work.path(),
        &["clone", "-q", &s.url("admin/proj"), dest.to_str().unwrap()],
    );
    assert!(
        opened.elapsed() < DEADLINE,
        "the clone must finish inside the stall window; took {:?}",
        opened.elapsed()
    );
    // Every stalled connection is closed after the deadline, none long before it.
    let limit = opened + DEADLINE + Duration::from_secs(10);
    for c in silent.iter_mut().chain(after_version.iter_mut()) {
        let closed = wait_closed(c, limit).expect("connection still open well past the deadline");
        let after = closed.duration_since(opened);
        assert!(
            after + Duration::from_millis(500) >= DEADLINE,
            "closed after {after:?}, before the {DEADLINE:?} deadline"
        );
    }
    assert!(
        wait_for(Duration::from_secs(5), || {
            metric(
                &s.server,
                "gitplane_ssh_handshakes_total{outcome=\"timed_out\"}",
            ) >= 250
        }),
        "timed-out handshakes not counted"
    );
    // The counter moves at the cut; the gauge when the cut session has ended, moments later.
    assert!(
        wait_for(Duration::from_secs(5), || {
            metric(&s.server, "gitplane_ssh_unauthenticated_connections") == 0
        }),
        "unauthenticated connections still counted 5 s after every one was cut: {}",
        metric(&s.server, "gitplane_ssh_unauthenticated_connections")
    );
    // And the server still serves.
    let again = s.work.path().join("after-stall");
    s.git_ok(
        s.work.path(),
        &["clone", "-q", &s.url("admin/proj"), again.to_str().unwrap()],
    );
}

/// A CI farm behind one NAT address: 128 clones at once from 127.0.0.1 with the default config
/// (32 handshakes per address). The rest wait their turn instead of being refused.
#[test]
fn a_burst_of_128_clones_from_one_address_all_succeed_with_the_defaults() {
    let s = Ssh::start();
    s.server.create_repo("admin/proj", false);
    let src = s.work.path().join("src");
    make_worktree(&src, 2);
    git(
        &src,
        &["push", "-q", &s.server.admin_url("admin/proj"), "main"],
    );
    let url = s.url("admin/proj");
    let cmd = s.ssh_base(&s.admin_key);
    let work = s.work.path().to_owned();
    // 31 silent connections hold all but one of the address's 32 handshake slots while the
    // burst starts, so that it surely exceeds the share (on a fast machine 128 OpenSSH clients
    // may otherwise never have 32 handshakes open at once); they close a moment later.
    let silent: Vec<TcpStream> = (0..31)
        .map(|_| TcpStream::connect(s.addr()).expect("connect"))
        .collect();
    let start = std::sync::Arc::new(std::sync::Barrier::new(129));
    let handles: Vec<_> = (0..128)
        .map(|i| {
            let (url, cmd, work, start) = (url.clone(), cmd.clone(), work.clone(), start.clone());
            std::thread::spawn(move || {
                let dest = work.join(format!("burst{i}"));
                start.wait();
                let out = git_raw(
                    &work,
                    &["clone", "-q", &url, dest.to_str().unwrap()],
                    &[("GIT_SSH_COMMAND", &cmd)],
                );
                (out.status.success(), stderr(&out))
            })
        })
        .collect();
    start.wait();
    std::thread::sleep(Duration::from_secs(1));
    drop(silent);
    let failed: Vec<String> = handles
        .into_iter()
        .map(|h| h.join().expect("clone thread"))
        .filter(|(ok, _)| !ok)
        .map(|(_, err)| err)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 128 clones failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(
        metric(
            &s.server,
            "gitplane_ssh_handshakes_total{outcome=\"queued\"}"
        ) > 0,
        "the burst never exceeded the per-address share: the test proves nothing"
    );
    assert_eq!(
        metric(
            &s.server,
            "gitplane_ssh_handshakes_total{outcome=\"refused\"}"
        ),
        0
    );
}

#[test]
fn unauthenticated_connections_are_capped_per_source_and_globally() {
    let s = Ssh::start_with(ServerOptions {
        config: Some(
            "[ssh]\nmax_unauthenticated = 6\nmax_unauthenticated_per_ip = 4\nmax_queued_per_ip = 1\n"
                .into(),
        ),
        ..ServerOptions::default()
    });
    let connect_from = |ip: &str| -> TcpStream {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let from: SocketAddr = format!("{ip}:0").parse().unwrap();
        sock.bind(&from.into()).unwrap();
        sock.connect(&s.addr().into()).unwrap();
        sock.into()
    };
    // Admitted connections get the server's version line; refused ones are closed at once.
    let admitted = |c: &mut TcpStream| -> bool {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 8];
        c.read_exact(&mut buf).is_ok() && &buf == b"SSH-2.0-"
    };
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = connect_from("127.0.0.1");
        assert!(admitted(&mut c));
        held.push(c);
    }
    // A fifth from the same address waits its turn, its handshake not started ...
    let mut fifth = connect_from("127.0.0.1");
    fifth
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut probe = [0u8; 1];
    let waiting = matches!(fifth.read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut);
    assert!(
        waiting,
        "a fifth connection from one address was not held back"
    );
    assert_eq!(
        metric(
            &s.server,
            "gitplane_ssh_handshakes_total{outcome=\"queued\"}"
        ),
        1
    );
    // ... a sixth finds the address's queue (1) full and is closed at once ...
    let mut sixth = connect_from("127.0.0.1");
    sixth
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let closed = match sixth.read(&mut probe) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "a connection past the queue was not closed at once");
    // ... and the fifth starts as soon as one of its address's slots frees.
    drop(held.remove(0));
    assert!(admitted(&mut fifth), "the queued connection did not start");
    held.push(fifth);
    // Another address still gets in, up to the global cap of 6.
    for _ in 0..2 {
        let mut c = connect_from("127.0.0.2");
        assert!(admitted(&mut c));
        held.push(c);
    }
    let mut seventh = connect_from("127.0.0.3");
    assert!(!admitted(&mut seventh), "past the global cap");
    assert!(
        metric(
            &s.server,
            "gitplane_ssh_handshakes_total{outcome=\"refused\"}"
        ) >= 2
    );
    // Closing the stalled ones frees their slots: a real client gets in again.
    drop(held);
    s.server.create_repo("admin/proj", true);
    assert!(wait_for(Duration::from_secs(5), || {
        metric(&s.server, "gitplane_ssh_unauthenticated_connections") == 0
    }));
    let out = s.ssh(
        &s.admin_key,
        &[],
        &["git-lfs-authenticate", "admin/proj", "download"],
    );
    assert!(out.status.success(), "{out:?}");
}

fn git_descendants(server: &Server) -> Vec<(u32, String)> {
    server
        .descendants()
        .into_iter()
        .filter(|(_, name)| name.starts_with("git"))
        .collect()
}

/// git is gone within a bounded time, and no child is left, not even as a zombie (descendants()
/// lists every child).
fn assert_no_child_left(server: &Server) {
    assert!(
        wait_for(Duration::from_secs(15), || git_descendants(server)
            .is_empty()),
        "git left behind: {:?}",
        git_descendants(server)
    );
    assert!(
        server.descendants().is_empty(),
        "{:?}",
        server.descendants()
    );
}

#[test]
fn client_killed_mid_clone_leaves_no_git_process() {
    use std::os::unix::process::CommandExt;
    let s = Ssh::start();
    make_big_repo(&s.server, "admin/big", 48 << 20);
    let dest = s.work.path().join("killed");
    // The client runs in its own process group so that git and its ssh die together.
    let mut client = Command::new("git")
        .current_dir(s.work.path())
        .args(["clone", "-q", &s.url("admin/big"), dest.to_str().unwrap()])
        .env("GIT_SSH_COMMAND", s.ssh_base(&s.admin_key))
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start clone");
    assert!(
        wait_for(Duration::from_secs(20), || !git_descendants(&s.server)
            .is_empty()),
        "git never started on the server"
    );
    // SAFETY: signalling the process group we just created.
    unsafe { libc::kill(-(client.id() as i32), libc::SIGKILL) };
    let _ = client.wait();
    assert_no_child_left(&s.server);
}

/// Drives `git-upload-pack` over ssh by hand (protocol v0), reading the pack slowly.
struct SlowFetch {
    child: std::process::Child,
    out: std::process::ChildStdout,
}

impl SlowFetch {
    fn start(s: &Ssh, repo: &str, want: &str) -> Self {
        let base = s.ssh_base(&s.admin_key);
        let mut child = Command::new("timeout")
            .arg("120")
            .args(base.split(' '))
            .args(["-p", &s.port.to_string(), "git@127.0.0.1"])
            .arg(format!("git-upload-pack '{repo}.git'"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh");
        let mut out = child.stdout.take().unwrap();
        // The v0 advertisement ends with a flush-pkt.
        let mut adv = Vec::new();
        let mut byte = [0u8; 1];
        while !adv.ends_with(b"0000") {
            out.read_exact(&mut byte).expect("advertisement");
            adv.push(byte[0]);
        }
        let mut stdin = child.stdin.take().unwrap();
        let line = format!("want {want}\n");
        writeln!(stdin, "{:04x}{line}00000009done", line.len() + 4).unwrap();
        stdin.flush().unwrap();
        std::mem::forget(stdin); // keep it open: closing it early would end the session
        Self { child, out }
    }

    /// Reads everything left; returns the byte count.
    fn finish(mut self) -> (u64, std::process::ExitStatus) {
        let mut rest = Vec::new();
        self.out.read_to_end(&mut rest).expect("read pack");
        let status = self.child.wait().unwrap();
        (rest.len() as u64, status)
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn slow_reader_is_flow_controlled() {
    let s = Ssh::start();
    let size = 48 << 20;
    let head = make_big_repo(&s.server, "admin/big", size);
    let before = rss_kib(s.server.pid());
    let mut fetch = SlowFetch::start(&s, "admin/big", &head);
    let mut first = vec![0u8; 64 * 1024];
    fetch.out.read_exact(&mut first).expect("start of the pack");
    // The client stops reading; the server must stop too rather than buffer the pack.
    std::thread::sleep(Duration::from_secs(3));
    let during = rss_kib(s.server.pid());
    let (rest, status) = fetch.finish();
    assert!(status.success(), "{status:?}");
    assert!(rest + 64 * 1024 >= size as u64, "pack too short: {rest}");
    let grown = during.saturating_sub(before);
    eprintln!("server RSS {before} KiB before, {during} KiB with a stalled reader (+{grown} KiB)");
    assert!(
        grown < 24 * 1024,
        "server RSS grew by {grown} KiB while a {} MiB pack waited for a stalled reader",
        size >> 20
    );
}

#[test]
fn sigterm_lets_a_running_ssh_clone_finish() {
    let mut s = Ssh::start();
    let size = 24 << 20;
    let head = make_big_repo(&s.server, "admin/big", size);
    let mut fetch = SlowFetch::start(&s, "admin/big", &head);
    let mut first = vec![0u8; 64 * 1024];
    fetch.out.read_exact(&mut first).expect("start of the pack");
    s.server.signal(libc::SIGTERM);
    // New connections are refused once the listener is closed.
    assert!(
        wait_for(Duration::from_secs(5), || TcpStream::connect(s.addr())
            .is_err()),
        "SSH still accepting after SIGTERM"
    );
    let (rest, status) = fetch.finish();
    assert!(status.success(), "{status:?}");
    assert!(rest + 64 * 1024 >= size as u64, "pack cut short: {rest}");
    assert_eq!(s.server.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn key_admin_commands() {
    let s = Ssh::start();
    s.server.add_user("dave", "pw");
    let k = ssh_keygen(s.work.path(), "dave");
    let added = s.server.admin(&["key", "add", "dave", &pub_of(&k)], None);
    assert!(added.contains("SHA256:"), "{added}");
    let fp = added.split_whitespace().nth(1).unwrap().to_owned();
    // The fingerprint is the one OpenSSH prints.
    let keygen_fp = Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f", &pub_of(&k)])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&keygen_fp.stdout).contains(&fp));
    let listed = s.server.admin(&["key", "list", "dave"], None);
    assert!(listed.contains(&fp), "{listed}");
    // Duplicates (for anyone), malformed keys and unknown users are refused.
    for (user, file) in [("dave", pub_of(&k)), ("admin", pub_of(&k))] {
        let out = s.server.admin_raw(&["key", "add", user, &file], None);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("already registered"));
    }
    let bad = s.work.path().join("bad.pub");
    std::fs::write(&bad, "ssh-ed25519 not-base64 x\n").unwrap();
    let out = s
        .server
        .admin_raw(&["key", "add", "dave", bad.to_str().unwrap()], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an OpenSSH public key"));
    let other = ssh_keygen(s.work.path(), "other");
    let out = s
        .server
        .admin_raw(&["key", "add", "nobody", &pub_of(&other)], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no user `nobody`"));
    // The host key fingerprint is logged at start.
    assert!(
        s.server.log().contains("SSH host key"),
        "{}",
        s.server.log()
    );
}

/// A stand-in TCP load balancer for OpenSSH's ProxyCommand: connects to the server, sends a
/// PROXY protocol v1 header naming `SOURCE` as the client, then relays stdin and stdout.
const BALANCER: &str = r#"
import os, socket, sys, threading
host, port, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port))
s.sendall(f"PROXY TCP4 {source} {host} 40000 {port}\r\n".encode())
def upstream():
    while True:
        data = os.read(0, 65536)
        if not data:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(data)
threading.Thread(target=upstream, daemon=True).start()
while True:
    data = s.recv(65536)
    if not data:
        break
    while data:
        data = data[os.write(1, data):]
"#;

#[test]
fn proxy_protocol_from_a_trusted_balancer_names_the_client() {
    require_tool("python3");
    let s = Ssh::start_with(ServerOptions {
        config: Some("[ssh]\nproxy_protocol_from = [\"127.0.0.1\"]\n".into()),
        ..ServerOptions::default()
    });
    s.server.create_repo("admin/proj", false);
    let balancer = s.work.path().join("balancer.py");
    std::fs::write(&balancer, BALANCER).unwrap();
    let via_balancer = format!(
        "{} -o 'ProxyCommand=python3 {} %h %p 198.51.100.77'",
        s.ssh_base(&s.admin_key),
        balancer.display()
    );
    let env = [("GIT_SSH_COMMAND", via_balancer.as_str())];
    let src = s.work.path().join("src");
    make_worktree(&src, 3);
    let url = s.url("admin/proj");
    let out = git_raw(&src, &["push", "-q", &url, "main"], &env);
    assert!(
        out.status.success(),
        "push: {}\n{}",
        stderr(&out),
        tail(&s.server.log())
    );
    let dest = s.work.path().join("clone");
    let out = git_raw(
        s.work.path(),
        &["clone", "-q", &url, dest.to_str().unwrap()],
        &env,
    );
    assert!(out.status.success(), "clone: {}", stderr(&out));
    assert_eq!(rev_count(&dest, "main"), 3);
    assert!(
        s.server.log().contains("198.51.100.77:40000"),
        "the server did not take the client's address from the PROXY header:\n{}",
        tail(&s.server.log())
    );

    // Version 2 (binary), as HAProxy and cloud balancers send it: the SSH banner follows.
    let mut v2 = TcpStream::connect(s.addr()).unwrap();
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    header.extend_from_slice(&[203, 0, 113, 5, 127, 0, 0, 1, 0x9c, 0x41, 0, 22]);
    header.extend_from_slice(b"SSH-2.0-OpenSSH_9.2\r\n");
    v2.write_all(&header).unwrap();
    v2.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut banner = [0u8; 16];
    v2.read_exact(&mut banner).unwrap();
    assert_eq!(&banner, b"SSH-2.0-gitplane");

    // A connection from the balancer's address without a header gets no SSH session.
    let mut direct = TcpStream::connect(s.addr()).unwrap();
    direct.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
    direct
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let _ = direct.read_to_end(&mut got);
    assert!(
        got.is_empty(),
        "answered without a PROXY header: {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// A channel whose client stalls, while the connection itself stays up, is cut at
/// `ssh.channel_idle_secs` and its git process is gone: one client stops sending while git
/// waits for its wants, another stops reading a pack so that the channel window stays shut.
#[test]
fn stalled_channels_are_cut_and_their_git_is_gone() {
    let s = Ssh::start_with(ServerOptions {
        config: Some("[ssh]\nchannel_idle_secs = 2\n".into()),
        ..ServerOptions::default()
    });
    let size = 24 << 20;
    let head = make_big_repo(&s.server, "admin/big", size);
    let cuts = "gitplane_stalled_cuts_total{reason=\"ssh_channel_idle\"}";

    // Stops sending: reads the advertisement, then says nothing with stdin still open.
    let base = s.ssh_base(&s.admin_key);
    let mut silent = Command::new("timeout")
        .arg("60")
        .args(base.split(' '))
        .args(["-p", &s.port.to_string(), "git@127.0.0.1"])
        .arg("git-upload-pack 'admin/big.git'")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh");
    let _stdin = silent.stdin.take();
    let mut adv = Vec::new();
    silent
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut adv)
        .expect("advertisement");
    assert!(adv.ends_with(b"0000"), "{}", String::from_utf8_lossy(&adv));
    let status = silent.wait().unwrap();
    // `timeout` exits 124 if it had to kill ssh: the server must have closed the channel.
    assert_ne!(status.code(), Some(124), "the silent channel was never cut");
    assert!(metric(&s.server, cuts) >= 1);

    // Stops reading: takes the start of the pack, then nothing.
    let mut fetch = SlowFetch::start(&s, "admin/big", &head);
    let mut first = vec![0u8; 64 * 1024];
    fetch.out.read_exact(&mut first).expect("start of the pack");
    assert!(
        wait_for(Duration::from_secs(30), || metric(&s.server, cuts) >= 2),
        "the channel whose client stopped reading was never cut"
    );
    let (rest, _) = fetch.finish();
    assert!(rest + 64 * 1024 < size as u64, "the whole pack arrived");
    assert_no_child_left(&s.server);
    // The server still serves the same user at once.
    let dest = s.work.path().join("after");
    s.git_ok(
        s.work.path(),
        &["clone", "-q", &s.url("admin/big"), dest.to_str().unwrap()],
    );
}

/// 500 connections from one address that never send a byte, with the default per-address cap
/// (32 handshakes) and queue: at most the cap are in the handshake (only those got the server's
/// version line), all are cut at the deadline, and clones from another address work meanwhile.
#[test]
fn five_hundred_silent_connections_from_one_address_hold_only_its_share() {
    const DEADLINE: Duration = Duration::from_secs(3);
    const CAP: usize = 32;
    let s = Ssh::start_with(ServerOptions {
        config: Some("[ssh]\nhandshake_timeout_secs = 3\n".into()),
        ..ServerOptions::default()
    });
    s.server.create_repo("admin/proj", false);
    let src = s.work.path().join("src");
    make_worktree(&src, 2);
    let other_address = format!("{} -o BindAddress=127.0.0.2", s.ssh_base(&s.admin_key));
    let out = git_raw(
        &src,
        &["push", "-q", &s.url("admin/proj"), "main"],
        &s.git_env(&other_address),
    );
    assert!(
        out.status.success(),
        "push: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let opened = Instant::now();
    let mut silent: Vec<TcpStream> = (0..500)
        .map(|_| TcpStream::connect(s.addr()).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    let in_handshake = silent
        .iter()
        .filter(|c| {
            c.set_nonblocking(true).unwrap();
            let mut b = [0u8; 8];
            let got = matches!(c.peek(&mut b), Ok(n) if n > 0);
            c.set_nonblocking(false).unwrap();
            got
        })
        .count();
    eprintln!("{in_handshake} of 500 in the handshake");
    assert!(
        (1..=CAP).contains(&in_handshake),
        "{in_handshake} of 500 connections from one address were in the handshake (cap {CAP})"
    );
    // Another address is not held up by them.
    let dest = s.work.path().join("other-address");
    let out = git_raw(
        s.work.path(),
        &["clone", "-q", &s.url("admin/proj"), dest.to_str().unwrap()],
        &s.git_env(&other_address),
    );
    assert!(
        out.status.success(),
        "clone from 127.0.0.2 during the stall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        opened.elapsed() < DEADLINE,
        "the clone must finish inside the stall window; took {:?}",
        opened.elapsed()
    );
    // All 500 are cut at the deadline, none long before it.
    let limit = opened + DEADLINE + Duration::from_secs(10);
    for c in silent.iter_mut() {
        let closed = wait_closed(c, limit).expect("connection still open well past the deadline");
        assert!(
            closed.duration_since(opened) + Duration::from_millis(500) >= DEADLINE,
            "closed after {:?}, before the {DEADLINE:?} deadline",
            closed.duration_since(opened)
        );
    }
    // And the address that stalled is served again.
    let again = s.work.path().join("after-stall");
    s.git_ok(
        s.work.path(),
        &["clone", "-q", &s.url("admin/proj"), again.to_str().unwrap()],
    );
}
