//! Shared harness for integration tests: a real `gitplane serve` on an ephemeral loopback port
//! with its own temporary data dir, the admin CLI, and the real `git` client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod grpc;

pub const BIN: &str = env!("CARGO_BIN_EXE_gitplane");

/// Fails with a clear message when a tool the tests need is missing (never skips).
pub fn require_tool(tool: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        ok,
        "required tool `{tool}` is missing: run scripts/test.sh, which installs it"
    );
}

/// A PostgreSQL store several test servers share (each with its own node id).
#[derive(Clone)]
pub struct SharedStore {
    pub url: String,
    /// Dropped (the database with it) when the last server using it is gone.
    db: Option<Arc<gitplane::store::scratch::ScratchDb>>,
}

impl SharedStore {
    /// A fresh scratch database; fails (never skips) when PostgreSQL is not there.
    pub fn create() -> Self {
        let db = gitplane::store::scratch::ScratchDb::create().unwrap_or_else(|e| panic!("{e}"));
        Self {
            url: db.url().to_owned(),
            db: Some(Arc::new(db)),
        }
    }

    /// A database the test runs itself (see [`PrivatePostgres`]).
    pub fn at(url: String) -> Self {
        Self { url, db: None }
    }
}

/// Whether test servers use PostgreSQL: `GITPLANE_TEST_STORE=postgres` (the test command's
/// second pass over the suites that touch the store); otherwise the embedded SQLite file.
pub fn postgres_pass() -> bool {
    match std::env::var("GITPLANE_TEST_STORE").as_deref() {
        Ok("postgres") => true,
        Ok("") | Ok("sqlite") | Err(_) => false,
        Ok(other) => panic!("GITPLANE_TEST_STORE={other}: expected sqlite or postgres"),
    }
}

pub struct Server {
    pub child: Option<Child>,
    /// (database URL, node id) when the server uses a PostgreSQL store.
    pub database: Option<(String, String)>,
    _scratch: Option<SharedStore>,
    pub addr: SocketAddr,
    /// Every listener the server reported, by service name ("http", "ssh", "rpc", ...).
    pub listening: std::collections::HashMap<String, SocketAddr>,
    pub data: tempfile::TempDir,
    pub admin_password: String,
    stderr_log: PathBuf,
    /// Kept for [`Server::restart`].
    opts: ServerOptions,
}

#[derive(Clone)]
pub struct ServerOptions {
    pub shards: usize,
    pub config: Option<String>,
    pub force_epoll: bool,
    /// Runs the server in a user and mount namespace of its own with `DATA/lfs` on a ramfs
    /// mount, a filesystem that refuses O_DIRECT. Its files are visible to the server only.
    pub lfs_on_ramfs: bool,
    /// A store shared with other servers, and this one's node id. None: a store of its own
    /// (a scratch PostgreSQL database in the postgres pass, else the embedded file).
    pub shared_store: Option<(SharedStore, String)>,
    /// Join a cluster with this secret file (needs `shared_store`): `--cluster-listen` on a
    /// free loopback port.
    pub cluster_secret: Option<PathBuf>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            shards: 2,
            config: None,
            force_epoll: false,
            lfs_on_ramfs: false,
            shared_store: None,
            cluster_secret: None,
        }
    }
}

impl Server {
    pub fn start() -> Self {
        Self::start_with(ServerOptions::default())
    }

    pub fn start_with(opts: ServerOptions) -> Self {
        require_tool("git");
        let data = tempfile::tempdir().expect("tempdir");
        let stderr_log = data.path().join("server.log");
        let (scratch, node) = match &opts.shared_store {
            Some((shared, node)) => (Some(shared.clone()), node.clone()),
            None if postgres_pass() => (Some(SharedStore::create()), "n1".to_owned()),
            None => (None, String::new()),
        };
        let mut server = Self {
            child: None,
            database: scratch.as_ref().map(|s| (s.url.clone(), node)),
            _scratch: scratch,
            addr: "127.0.0.1:0".parse().expect("address"),
            listening: std::collections::HashMap::new(),
            data,
            admin_password: String::new(),
            stderr_log,
            opts,
        };
        server.launch();
        // With a shared store only the first node makes `admin` (and its password file).
        let password = std::fs::read_to_string(server.data_dir().join("initial-admin-password"));
        server.admin_password = match (password, &server.opts.shared_store) {
            (Ok(p), _) => p.trim().to_owned(),
            (Err(_), Some(_)) => String::new(),
            (Err(e), None) => panic!("initial admin password: {e}"),
        };
        server
    }

    /// Starts `gitplane serve` on the data dir and waits until it is ready. Every listener gets
    /// a fresh ephemeral port, so parallel test servers never share one; the log is appended to.
    fn launch(&mut self) {
        let opts = &self.opts;
        let mut cmd = if opts.lfs_on_ramfs {
            require_tool("unshare");
            let lfs = self.data_dir().join("lfs");
            std::fs::create_dir_all(&lfs).expect("lfs dir");
            let mut c = Command::new("unshare");
            c.args(["--user", "--map-root-user", "--mount", "sh", "-c"])
                .arg(r#"mount -t ramfs ramfs "$0" && exec "$@""#)
                .arg(lfs)
                .arg(BIN);
            c
        } else {
            Command::new(BIN)
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_log)
            .expect("log file");
        self.store_env(&mut cmd);
        cmd.arg("--data-dir")
            .arg(self.data_dir())
            .args(["serve", "--http-listen", "127.0.0.1:0", "--shards"])
            .arg(opts.shards.to_string())
            .args(["--ssh-listen", "127.0.0.1:0", "--rpc-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "gitplane=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        if opts.force_epoll {
            cmd.arg("--force-epoll");
        }
        if opts.cluster_secret.is_some() {
            cmd.args(["--cluster-listen", "127.0.0.1:0"]);
        }
        if let Some(cfg) = &opts.config {
            let path = self.data.path().join("gitplane.toml");
            std::fs::write(&path, cfg).expect("config");
            cmd.arg("--config").arg(path);
        }
        let mut child = cmd.spawn().expect("start gitplane serve");
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        self.listening.clear();
        loop {
            let mut line = String::new();
            let n = reader.read_line(&mut line).expect("read server stdout");
            assert!(n > 0, "server exited before it was ready: {}", self.log());
            let line = line.trim();
            if line == "gitplane: ready" {
                break;
            }
            let (service, addr) = line
                .strip_prefix("gitplane: ")
                .and_then(|l| l.split_once(" listening on "))
                .unwrap_or_else(|| panic!("unexpected line from server: {line:?}"));
            self.listening.insert(
                service.to_owned(),
                addr.parse::<SocketAddr>().expect("address"),
            );
        }
        self.addr = self.listening["http"];
        self.child = Some(child);
    }

    /// SIGKILL, as a crash or an OOM kill would end the server, and reap it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    /// Starts the server again on the same data dir (new ports).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart after kill9 or exit");
        self.launch();
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data.path().join("d")
    }

    /// Where the disk LFS backend keeps object `oid`.
    pub fn lfs_object_path(&self, oid: &str) -> PathBuf {
        self.data_dir()
            .join(format!("lfs/objects/{}/{}/{oid}", &oid[0..2], &oid[2..4]))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Runs `gitplane --data-dir D ARGS`, with optional stdin, asserting success.
    pub fn admin(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.admin_raw(args, stdin);
        assert!(
            out.status.success(),
            "gitplane {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Points a gitplane command at this server's store (and nothing else's).
    pub fn store_env(&self, cmd: &mut Command) {
        match &self.opts.cluster_secret {
            Some(file) => cmd.env("GITPLANE_CLUSTER_SECRET_FILE", file),
            None => cmd.env_remove("GITPLANE_CLUSTER_SECRET_FILE"),
        };
        match &self.database {
            Some((url, node)) => cmd
                .env("GITPLANE_DATABASE_URL", url)
                .env("GITPLANE_NODE_ID", node),
            None => cmd
                .env_remove("GITPLANE_DATABASE_URL")
                .env_remove("GITPLANE_NODE_ID"),
        };
    }

    /// This server's store, for tests that read it directly.
    pub fn location(&self) -> gitplane::store::Location {
        let (url, node) = match &self.database {
            Some((u, n)) => (Some(u.as_str()), Some(n.as_str())),
            None => (None, None),
        };
        gitplane::store::Location::new(&self.data_dir(), url, node, 2).expect("store location")
    }

    pub fn admin_raw(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(BIN);
        self.store_env(&mut cmd);
        let mut child = cmd
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run gitplane admin command");
        let mut input = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).expect("write stdin");
        }
        drop(input);
        child.wait_with_output().expect("wait admin command")
    }

    pub fn add_user(&self, name: &str, password: &str) {
        self.admin(
            &["user", "add", name, "--password-stdin"],
            Some(&format!("{password}\n")),
        );
    }

    pub fn create_repo(&self, name: &str, public: bool) {
        let mut args = vec!["repo", "create", name];
        if public {
            args.push("--public");
        }
        self.admin(&args, None);
    }

    pub fn repo_path(&self, name: &str) -> PathBuf {
        self.data_dir().join("repos").join(format!("{name}.git"))
    }

    /// `http://user:password@addr/name.git`, or anonymous without a user.
    pub fn url(&self, name: &str, creds: Option<(&str, &str)>) -> String {
        match creds {
            Some((u, p)) => format!("http://{u}:{p}@{}/{name}.git", self.addr),
            None => format!("http://{}/{name}.git", self.addr),
        }
    }

    pub fn admin_url(&self, name: &str) -> String {
        self.url(name, Some(("admin", &self.admin_password.clone())))
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Waits for the server to exit; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Direct and indirect child processes of the server (e.g. git upload-pack, pack-objects).
    pub fn descendants(&self) -> Vec<(u32, String)> {
        descendants_of(self.pid())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn parent_and_name(pid: u32) -> Option<(u32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = stat.get(close + 2..)?.split(' ').collect();
    let ppid = rest.get(1)?.parse().ok()?;
    Some((ppid, name))
}

pub fn descendants_of(root: u32) -> Vec<(u32, String)> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        {
            if let Some((ppid, name)) = parent_and_name(pid) {
                all.push((pid, ppid, name));
            }
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (pid, ppid, name) in &all {
            if *ppid == p {
                found.push((*pid, name.clone()));
                frontier.push(*pid);
            }
        }
    }
    found
}

/// Runs git with a clean, predictable environment; returns the output (not asserted).
pub fn git_raw(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "Test Author")
        .env("GIT_AUTHOR_EMAIL", "author@example.com")
        .env("GIT_COMMITTER_NAME", "Test Committer")
        .env("GIT_COMMITTER_EMAIL", "committer@example.com")
        .env("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z")
        .env_remove("GIT_DIR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run git")
}

/// Runs git and asserts success; returns stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    git_env(dir, args, &[])
}

pub fn git_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = git_raw(dir, args, env);
    assert!(
        out.status.success(),
        "git {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A working repository with `commits` commits on main, each adding one small file.
pub fn make_worktree(dir: &Path, commits: usize) {
    std::fs::create_dir_all(dir).expect("mkdir");
    git(dir, &["init", "-q", "-b", "main"]);
    for i in 0..commits {
        std::fs::write(
            dir.join(format!("file{i}.txt")),
            format!("content {i}\n").repeat(50),
        )
        .expect("write");
        git(dir, &["add", "."]);
        git(dir, &["commit", "-q", "-m", &format!("commit {i}")]);
    }
}

/// A server with a private repo `admin/proj` holding `commits` commits, pushed by the admin over
/// HTTP; the temp dir holds the source worktree at `src`.
pub fn server_with_pushed_repo(commits: usize) -> (Server, tempfile::TempDir) {
    let server = Server::start();
    let work = push_new_repo(&server, "admin/proj", commits);
    (server, work)
}

/// Creates private `name` on `server` and pushes `commits` commits to it over HTTP from a new
/// worktree at `src` in the returned temp dir.
pub fn push_new_repo(server: &Server, name: &str, commits: usize) -> tempfile::TempDir {
    server.create_repo(name, false);
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    make_worktree(&src, commits);
    git(&src, &["push", "-q", &server.admin_url(name), "main"]);
    work
}

pub fn rev_count(dir: &Path, rev: &str) -> usize {
    git(dir, &["rev-list", "--count", rev])
        .trim()
        .parse()
        .expect("count")
}

/// Creates `name` on the server holding one commit with `size` random bytes, pushed straight to
/// the bare repository on disk (faster than over HTTP; the HTTP push path has its own test).
pub fn make_big_repo(server: &Server, name: &str, size: usize) -> String {
    server.create_repo(name, false);
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path();
    git(dir, &["init", "-q", "-b", "main"]);
    std::fs::write(dir.join("big.bin"), random_bytes(size, 42)).expect("write");
    git(dir, &["add", "."]);
    git(dir, &["commit", "-q", "-m", "big"]);
    let bare = server.repo_path(name);
    git(
        dir,
        &["push", "-q", bare.to_str().expect("utf-8 path"), "main"],
    );
    git(dir, &["rev-parse", "HEAD"]).trim().to_owned()
}

/// Polls `cond` every 10 ms until it holds or `limit` passes.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// Deterministic incompressible bytes (xorshift), fast enough for tens of megabytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Sends raw bytes on a fresh connection and returns everything the server answers until it
/// closes (bounded by `limit`).
pub fn raw_request(addr: SocketAddr, request: &[u8], limit: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(limit)).expect("timeout");
    s.write_all(request).expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// An HTTP `Authorization` value for Basic credentials.
pub fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// The status code of the first response in `raw`.
pub fn status_of(raw: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(raw);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"))
}

/// A loopback port nothing listens on right now (bound and released: for servers such as
/// `git daemon` that cannot listen on port 0 and report the port). Taken below the kernel's
/// ephemeral range: a port from `bind(:0)` is one the kernel may hand, a moment later, to any
/// test's outgoing connection as its local port, and the server then cannot bind it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOWEST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(LOWEST).max(1);
    // Processes start at different places; calls in one process never repeat a port.
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let port = LOWEST + start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free loopback port in {LOWEST}..{ephemeral_low}");
}

/// A real `git daemon` serving every repository under `base` (read-only, `--export-all`) on
/// 127.0.0.1, stopped on drop.
pub struct GitDaemon {
    child: Child,
    pub port: u16,
}

impl GitDaemon {
    pub fn start(base: &Path) -> Self {
        require_tool("git");
        // Another process may take the released port first: the daemon then exits, and we try
        // another one.
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new("git")
                .arg("daemon")
                .args(["--export-all", "--reuseaddr", "--listen=127.0.0.1"])
                .arg(format!("--port={port}"))
                .arg(format!("--base-path={}", base.display()))
                .arg(base)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start git daemon");
            let up = wait_for(Duration::from_secs(10), || {
                matches!(child.try_wait(), Ok(None))
                    && TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            if up {
                return Self { child, port };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "`git daemon` did not start on a free loopback port in 5 attempts \
             (it ships with Debian's `git`; run `git daemon --help` to check)"
        );
    }

    /// `git://127.0.0.1:PORT/PATH`.
    pub fn url(&self, path: &str) -> String {
        format!("git://127.0.0.1:{}/{path}", self.port)
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A new unencrypted Ed25519 key pair `dir/name` and `dir/name.pub` (OpenSSH format).
pub fn ssh_keygen(dir: &Path, name: &str) -> PathBuf {
    require_tool("ssh-keygen");
    let key = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .output()
        .expect("run ssh-keygen");
    assert!(out.status.success(), "ssh-keygen: {out:?}");
    key
}

/// `dir/known_hosts` holding the server's SSH host key for `[127.0.0.1]:PORT`.
pub fn ssh_known_hosts(server: &Server, dir: &Path) -> PathBuf {
    let port = server.listening["ssh"].port();
    let host_pub = std::fs::read_to_string(server.data_dir().join("ssh_host_ed25519_key.pub"))
        .expect("host public key");
    let path = dir.join("known_hosts");
    std::fs::write(&path, format!("[127.0.0.1]:{port} {}\n", host_pub.trim()))
        .expect("known_hosts");
    path
}

/// OpenSSH with only the test's options: no user config, no agent, strict host key checking.
pub fn openssh_command(key: &Path, known_hosts: &Path) -> String {
    format!(
        "ssh -F /dev/null -i {} -o IdentitiesOnly=yes -o IdentityAgent=none -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=10",
        key.display(),
        known_hosts.display()
    )
}

/// The value of one series (`name` or `name{labels}`) in the server's `/metrics`.
pub fn metric(server: &Server, series: &str) -> u64 {
    let raw = raw_request(
        server.addr,
        b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    let body = String::from_utf8_lossy(&raw);
    let key = format!("{series} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in metrics:\n{body}"))
}

/// A real S3-compatible server (moto's), on a free loopback port, for the life of the test.
pub struct S3Server {
    child: std::process::Child,
    pub addr: std::net::SocketAddr,
}

impl S3Server {
    pub fn start() -> Self {
        let ok = std::process::Command::new("python3")
            .args(["-c", "import moto.server"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "the S3 test needs moto's server (python3 -m pip install 'moto[server]'): run scripts/test.sh, which installs it");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert!(
            wait_for(Duration::from_secs(30), || TcpStream::connect(addr).is_ok()),
            "moto server did not start"
        );
        Self { child, addr }
    }

    /// A raw (unsigned: moto does not check signatures) request; returns the response.
    pub fn call(&self, head: &str) -> Vec<u8> {
        raw_request(
            self.addr,
            format!(
                "{head} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.addr
            )
            .as_bytes(),
            Duration::from_secs(20),
        )
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    /// A bucket made for the test, and the `[lfs.s3]` config section that points gitplane at it.
    pub fn bucket_config(&self, bucket: &str) -> String {
        assert_eq!(status_of(&self.call(&format!("PUT /{bucket}"))), 200);
        format!(
            "[lfs.s3]\nendpoint = \"{}\"\nbucket = \"{bucket}\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\npart_size_mib = 5\n",
            self.addr
        )
    }

    /// Where gitplane keeps `oid` in `bucket` (default `lfs/` prefix).
    pub fn object_key(bucket: &str, oid: &str) -> String {
        format!("/{bucket}/lfs/{}/{}/{oid}", &oid[0..2], &oid[2..4])
    }

    /// Whether `bucket` has multipart uploads neither completed nor aborted.
    pub fn open_uploads(&self, bucket: &str) -> bool {
        String::from_utf8_lossy(&self.call(&format!("GET /{bucket}?uploads"))).contains("<Upload>")
    }
}

/// A webhook receiver on loopback: answers every POST with 200 and keeps the JSON bodies, in
/// order of arrival (a redelivery shows up twice). Returns its URL and the bodies.
pub fn webhook_receiver() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&got);
    std::thread::spawn(move || {
        for conn in listener.incoming().take(10_000) {
            let Ok(mut conn) = conn else { break };
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let body = loop {
                let Ok(n) = conn.read(&mut chunk) else {
                    break None;
                };
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    break Some(buf[end + 4..end + 4 + len].to_vec());
                }
            };
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            if let Some(body) = body.and_then(|b| serde_json::from_slice(&b).ok()) {
                keep.lock().unwrap().push(body);
            }
        }
    });
    (url, got)
}

/// A PostgreSQL server of the test's own (initdb into a temporary directory, a free port on
/// 127.0.0.1, trust auth), so that a test may stop and start it without touching the machine's.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// With TLS: the CA that signed the server's certificate (for 127.0.0.1): the clients' root.
    pub tls_cert: Option<PathBuf>,
}

/// Makes, in `dir`, a CA (`ca.crt`) and a server certificate for IP 127.0.0.1 it signed
/// (`server.crt`, `server.key`) with the `openssl` CLI. A self-signed certificate marked CA is
/// refused as a server's by rustls, rightly, hence the two.
pub fn test_certificates(dir: &Path) {
    require_tool("openssl");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=gitplane-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
}

impl PrivatePostgres {
    pub fn start() -> Self {
        Self::launch(false)
    }

    /// The same, with TLS on (a certificate made with `openssl` for IP 127.0.0.1).
    pub fn start_with_tls() -> Self {
        Self::launch(true)
    }

    fn launch(tls: bool) -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                versions
                    .filter_map(|v| v.ok().map(|v| v.path().join("bin")))
                    .filter(|b| b.join("pg_ctl").exists())
                    .max()
            })
            .expect("PostgreSQL server binaries under /usr/lib/postgresql/*/bin: run scripts/test.sh, which installs the postgresql package");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut pg = Self {
            dir,
            bin,
            port: free_port(),
            tls_cert: None,
        };
        if tls {
            test_certificates(pg.dir.path());
            let cert = pg.dir.path().join("ca.crt");
            pg.tls_cert = Some(cert);
        }
        // initdb refuses to run as root: run the server as the package's `postgres` user.
        if as_root() {
            let out = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pg.dir.path())
                .output()
                .expect("chown");
            assert!(out.status.success(), "chown: {out:?}");
        }
        let out = pg
            .command("initdb")
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(pg.data())
            .output()
            .expect("initdb");
        assert!(out.status.success(), "initdb: {out:?}");
        pg.start_again();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn start_again(&self) {
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        if self.tls_cert.is_some() {
            let d = self.dir.path().display();
            opts.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key"
            ));
        }
        let out = self
            .command("pg_ctl")
            .args(["-w", "-t", "30", "-l"])
            .arg(self.dir.path().join("log"))
            .arg("-D")
            .arg(self.data())
            .args(["-o", &opts, "start"])
            .output()
            .expect("pg_ctl start");
        assert!(out.status.success(), "pg_ctl start: {out:?}");
    }

    /// A fast shutdown: sessions are told and closed, as when an operator stops the service.
    pub fn stop(&self) {
        let out = self
            .command("pg_ctl")
            .args(["-w", "-t", "30", "-m", "fast", "-D"])
            .arg(self.data())
            .arg("stop")
            .output()
            .expect("pg_ctl stop");
        assert!(out.status.success(), "pg_ctl stop: {out:?}");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-m", "immediate", "-D"])
            .arg(self.data())
            .arg("stop")
            .output();
    }
}

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
