//! Releases that cut nothing (issue #15): hot binary upgrades under server_starter (HUP) and on
//! gitplane's own (SIGUSR2), while real git clients clone and push without pause. Real
//! `start_server` (Debian's libserver-starter-perl), real git, real OpenSSH, real curl.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Old generations are re-parented to this process, so their exit status can be read.
fn become_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER affects only this process.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER");
}

/// Waits for `pid` (a child or an adopted orphan) to exit; its exit code.
fn wait_pid(pid: u32, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let mut status = 0;
        // SAFETY: waitpid on one pid with a valid status pointer.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if r == pid as libc::pid_t {
            return Some(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: signalling a process this test started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0);
}

/// A data dir with the admin user, a repository pushed over the server, and the admin's URL.
struct Site {
    dir: tempfile::TempDir,
    http: u16,
    ssh: u16,
    rpc: u16,
}

impl Site {
    fn new() -> Self {
        require_tool("git");
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            http: free_port(),
            ssh: free_port(),
            rpc: free_port(),
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.path().join("gitplane.pid")
    }

    fn serve_args(&self, exe: &Path) -> Vec<String> {
        vec![
            exe.display().to_string(),
            "--data-dir".into(),
            self.data().display().to_string(),
            "serve".into(),
            "--shards".into(),
            "2".into(),
            "--http-listen".into(),
            format!("127.0.0.1:{}", self.http),
            "--ssh-listen".into(),
            format!("127.0.0.1:{}", self.ssh),
            "--rpc-listen".into(),
            format!("127.0.0.1:{}", self.rpc),
            "--pid-file".into(),
            self.pid_file().display().to_string(),
        ]
    }

    fn password(&self) -> String {
        std::fs::read_to_string(self.data().join("initial-admin-password"))
            .expect("admin password")
            .trim()
            .to_owned()
    }

    fn url(&self, repo: &str) -> String {
        format!(
            "http://admin:{}@127.0.0.1:{}/{repo}.git",
            self.password(),
            self.http
        )
    }

    fn admin(&self, args: &[&str]) {
        let out = Command::new(BIN)
            .arg("--data-dir")
            .arg(self.data())
            .args(args)
            .output()
            .expect("admin command");
        assert!(out.status.success(), "{args:?}: {out:?}");
    }

    fn serving_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// Starts `cmd` (gitplane or start_server), waits for the first `gitplane: ready`, and keeps
/// reading its stdout so later generations never block on a full pipe.
fn launch(mut cmd: Command, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .env("RUST_LOG", "gitplane=info")
        .spawn()
        .expect("start");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line == "gitplane: ready" {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the server did not become ready");
    child
}

/// The warnings and errors in a server log, for failure messages.
fn log_problems(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Clients that clone and push in a loop until told to stop; every failure is kept.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(site: &Site, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let url = site.url("admin/proj");
        let base = site.dir.path().to_owned();
        let threads = (0..clients)
            .map(|i| {
                let (stop, done, failures, url) = (
                    Arc::clone(&stop),
                    Arc::clone(&done),
                    Arc::clone(&failures),
                    url.clone(),
                );
                let mine = base.join(format!("client-{i}"));
                std::thread::spawn(move || {
                    std::fs::create_dir_all(&mine).expect("client dir");
                    let mut n = 0;
                    // Bounded: stops when told, or after 10 minutes whatever happens.
                    let give_up = Instant::now() + Duration::from_secs(600);
                    while !stop.load(Ordering::SeqCst) && Instant::now() < give_up {
                        let dest = mine.join(format!("c{n}"));
                        let clone =
                            git_raw(&mine, &["clone", "-q", &url, dest.to_str().unwrap()], &[]);
                        if !clone.status.success() {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("clone: {}", String::from_utf8_lossy(&clone.stderr)));
                            n += 1;
                            continue;
                        }
                        std::fs::write(dest.join(format!("f{i}-{n}")), "x").unwrap();
                        git(&dest, &["add", "."]);
                        git(&dest, &["commit", "-q", "-m", "load"]);
                        let push = git_raw(
                            &dest,
                            &["push", "-q", "origin", &format!("HEAD:refs/heads/c{i}-{n}")],
                            &[],
                        );
                        if !push.status.success() {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("push: {}", String::from_utf8_lossy(&push.stderr)));
                        }
                        let _ = std::fs::remove_dir_all(&dest);
                        done.fetch_add(1, Ordering::SeqCst);
                        n += 1;
                    }
                })
            })
            .collect();
        Self {
            stop,
            done,
            failures,
            threads,
        }
    }

    /// Lets the clients run 2 s more, stops them, and checks that none of their operations
    /// failed (with the server's warnings from `log` if some did); the operations done.
    fn finish_without_failures(self, log: &Path) -> usize {
        std::thread::sleep(Duration::from_secs(2));
        let (done, failures) = self.finish();
        assert!(
            failures.is_empty(),
            "{} failures: {failures:#?}\nserver log:\n{}",
            failures.len(),
            log_problems(log)
        );
        assert!(done >= 16, "only {done} clone+push rounds completed");
        done
    }

    /// Stops the clients; (operations done, failures).
    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("client thread");
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.done.load(Ordering::SeqCst), failures)
    }
}

/// 16 clients clone and push while `upgrade` runs five times, `pause` apart, each time waiting
/// for the next generation to serve. Returns the pids that served, in order, and the load,
/// still running.
fn five_upgrades_under_load(
    site: &Site,
    pause: Duration,
    mut upgrade: impl FnMut(),
) -> (Vec<u32>, Load) {
    let load = Load::start(site, 16);
    let mut pids = vec![site.serving_pid().expect("pid file")];
    for round in 0..5 {
        std::thread::sleep(pause);
        let before = *pids.last().unwrap();
        upgrade();
        assert!(
            wait_for(Duration::from_secs(60), || site
                .serving_pid()
                .is_some_and(|p| p != before && alive(p))),
            "round {round}: no new generation"
        );
        pids.push(site.serving_pid().unwrap());
    }
    (pids, load)
}

/// Branches the load clients pushed (each push creates one).
fn pushed_branches(site: &Site) -> usize {
    let out = Command::new("git")
        .args(["for-each-ref", "--format=%(refname)", "refs/heads/"])
        .current_dir(site.data().join("repos/admin/proj.git"))
        .output()
        .expect("for-each-ref");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|r| *r != "refs/heads/main")
        .count()
}

fn seed_repo(site: &Site) {
    site.admin(&["repo", "create", "admin/proj"]);
    let src = site.dir.path().join("src");
    make_worktree(&src, 3);
    git(&src, &["push", "-q", &site.url("admin/proj"), "main"]);
}

#[test]
fn five_hups_under_server_starter_refuse_and_fail_nothing() {
    require_tool("start_server");
    become_subreaper();
    let site = Site::new();
    let status = site.dir.path().join("status");
    let mut cmd = Command::new("start_server");
    cmd.args([
        format!("--port=127.0.0.1:{}", site.http),
        format!("--port=127.0.0.1:{}", site.ssh),
        format!("--port=127.0.0.1:{}", site.rpc),
        format!("--status-file={}", status.display()),
        "--".into(),
    ])
    .args(site.serve_args(Path::new(BIN)));
    let log = site.dir.path().join("start_server.log");
    let mut starter = launch(cmd, &log);
    seed_repo(&site);

    let starter_pid = starter.id();
    let (mut pids, load) = five_upgrades_under_load(&site, Duration::from_secs(3), || {
        signal(starter_pid, libc::SIGHUP)
    });
    let done = load.finish_without_failures(&log);
    pids.dedup();
    assert_eq!(pids.len(), 6, "generations that served: {pids:?}");

    // Every old generation drained and exited 0 (start_server reports each one).
    assert!(wait_for(Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        pids[..5]
            .iter()
            .all(|p| text.contains(&format!("old worker {p} died, status:0")))
    }));
    signal(starter.id(), libc::SIGTERM);
    let exit = starter.wait().expect("start_server exit");
    assert!(exit.success(), "start_server: {exit:?}");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("status:1"), "{text}");
    eprintln!("server_starter: {done} clone+push rounds, 0 failures, generations {pids:?}");
}

/// Native upgrades: a plain `gitplane serve`, SIGUSR2 five times under load.
#[test]
fn five_usr2_upgrades_refuse_and_fail_nothing_and_a_broken_binary_changes_nothing() {
    become_subreaper();
    let site = Site::new();
    // The server runs from a copy of the binary, so the test can break and mend "the binary
    // now on disk" the way a package upgrade replaces it.
    let exe = site.dir.path().join("gitplane");
    std::fs::copy(BIN, &exe).expect("copy binary");
    let args = site.serve_args(&exe);
    let mut cmd = Command::new(&args[0]);
    cmd.args(&args[1..]);
    let log = site.dir.path().join("server.log");
    let mut first = launch(cmd, &log);
    let (hook_url, deliveries) = webhook_receiver();
    site.admin(&["repo", "create", "admin/proj"]);
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(site.data())
        .args(["webhook", "add", "admin/proj", &hook_url, "--secret-stdin"])
        .stdin(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(b"s3cret\n")?;
            c.wait_with_output()
        })
        .expect("webhook add");
    assert!(out.status.success(), "{out:?}");
    let src = site.dir.path().join("src");
    make_worktree(&src, 3);
    git(&src, &["push", "-q", &site.url("admin/proj"), "main"]);

    let (pids, load) = five_upgrades_under_load(&site, Duration::from_secs(2), || {
        let out = Command::new(BIN)
            .args(["upgrade", "--pid-file"])
            .arg(site.pid_file())
            .output()
            .expect("gitplane upgrade");
        assert!(out.status.success(), "{out:?}");
    });

    // A new binary that cannot start: the serving generation keeps serving and says why.
    std::fs::rename(&exe, site.dir.path().join("gitplane.good")).expect("move binary");
    std::fs::write(&exe, "#!/bin/sh\necho 'broken build' >&2\nexit 3\n").expect("write");
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let serving = *pids.last().unwrap();
    signal(serving, libc::SIGUSR2);
    assert!(
        wait_for(Duration::from_secs(30), || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("upgrade failed: this generation keeps serving")),
        "no failure logged"
    );
    assert!(alive(serving));
    assert_eq!(site.serving_pid(), Some(serving));
    let done = load.finish_without_failures(&log);

    // Every push's event was delivered exactly once, though two generations shared the outbox
    // during each upgrade (one dispatcher per data directory, see hooks::lease).
    let branches = pushed_branches(&site);
    assert!(
        wait_for(Duration::from_secs(60), || deliveries.lock().unwrap().len()
            > branches),
        "{} deliveries for {} pushes",
        deliveries.lock().unwrap().len(),
        branches + 1
    );
    std::thread::sleep(Duration::from_secs(2));
    let got = deliveries.lock().unwrap().clone();
    let ids: std::collections::HashSet<_> = got.iter().map(|d| d["id"].to_string()).collect();
    assert_eq!(ids.len(), got.len(), "an event was delivered twice");
    assert_eq!(
        got.len(),
        branches + 1,
        "pushes without exactly one delivery"
    );

    // Old generations exited 0: the first is our child, the others were adopted by this process.
    assert_eq!(first.wait().expect("first generation").code(), Some(0));
    for &pid in &pids[1..5] {
        assert_eq!(wait_pid(pid, Duration::from_secs(60)), Some(0), "pid {pid}");
    }
    signal(serving, libc::SIGTERM);
    assert_eq!(wait_pid(serving, Duration::from_secs(60)), Some(0));
    assert!(
        !site.pid_file().exists(),
        "the last generation removes its pid file"
    );
    eprintln!("USR2: {done} clone+push rounds, 0 failures, generations {pids:?}");
}

/// An SSH session and a 200 MB LFS upload that are in flight across an upgrade both complete,
/// on the old generation, while new connections already go to the new one.
#[test]
fn an_ssh_session_and_a_large_lfs_upload_span_an_upgrade() {
    require_tool("ssh");
    require_tool("curl");
    become_subreaper();
    let site = Site::new();
    let args = site.serve_args(Path::new(BIN));
    let mut cmd = Command::new(&args[0]);
    cmd.args(&args[1..]);
    let log = site.dir.path().join("server.log");
    let mut first = launch(cmd, &log);
    seed_repo(&site);
    let old = site.serving_pid().unwrap();

    // SSH: a git-upload-pack session that has read its advertisement and waits to negotiate.
    let key = ssh_keygen(site.dir.path(), "id");
    site.admin(&[
        "key",
        "add",
        "admin",
        key.with_extension("pub").to_str().unwrap(),
    ]);
    let host_pub =
        std::fs::read_to_string(site.data().join("ssh_host_ed25519_key.pub")).expect("host key");
    let known = site.dir.path().join("known_hosts");
    std::fs::write(
        &known,
        format!("[127.0.0.1]:{} {}\n", site.ssh, host_pub.trim()),
    )
    .unwrap();
    let ssh = openssh_command(&key, &known);
    let mut parts = ssh.split_whitespace();
    let mut session = Command::new(parts.next().unwrap())
        .args(parts)
        .args([
            "-p",
            &site.ssh.to_string(),
            "git@127.0.0.1",
            "git-upload-pack 'admin/proj.git'",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssh");
    let mut out = BufReader::new(session.stdout.take().unwrap());
    let mut first_line = String::new();
    out.read_line(&mut first_line).expect("advertisement");
    assert!(first_line.contains("refs/heads/main"), "{first_line:?}");

    // LFS: a 200 MB upload, rate-limited so that it is still running during the upgrade.
    let object = random_bytes(200 << 20, 7);
    let oid = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&object))
    };
    let file = site.dir.path().join("object.bin");
    std::fs::write(&file, &object).unwrap();
    drop(object);
    let upload = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--limit-rate",
            "40M",
        ])
        .args(["-u", &format!("admin:{}", site.password())])
        .args(["-H", "Content-Type: application/octet-stream", "-T"])
        .arg(&file)
        .arg(format!(
            "http://127.0.0.1:{}/admin/proj.git/info/lfs/objects/{oid}",
            site.http
        ))
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    std::thread::sleep(Duration::from_millis(1500));

    let out_up = Command::new(BIN)
        .args(["upgrade", "--pid-file"])
        .arg(site.pid_file())
        .output()
        .expect("gitplane upgrade");
    assert!(out_up.status.success(), "{out_up:?}");
    let new = site.serving_pid().unwrap();
    assert_ne!(new, old);
    assert!(
        alive(old),
        "the old generation still drains the SSH session and the upload"
    );

    // The SSH session finishes on the old generation: flush, and upload-pack exits 0.
    session.stdin.take().unwrap().write_all(b"0000").unwrap();
    let status = session.wait().expect("ssh exit");
    assert!(status.success(), "ssh session: {status:?}");
    let upload = upload.wait_with_output().expect("curl exit");
    assert_eq!(String::from_utf8_lossy(&upload.stdout), "200", "{upload:?}");

    // The object is whole, served by the new generation.
    let back = Command::new("curl")
        .args(["-sS", "-u", &format!("admin:{}", site.password())])
        .arg(format!(
            "http://127.0.0.1:{}/admin/proj.git/info/lfs/objects/{oid}",
            site.http
        ))
        .output()
        .expect("curl download");
    let got = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&back.stdout))
    };
    assert_eq!(got, oid);
    assert_eq!(first.wait().expect("old generation").code(), Some(0));
    signal(new, libc::SIGTERM);
    assert_eq!(wait_pid(new, Duration::from_secs(60)), Some(0));
}
