//! Spawning `git upload-pack` / `git receive-pack` / `git upload-archive` for one request.
//!
//! The child gets a minimal environment (no inherited secrets, no user or system git config), the
//! server-wide git settings through `GIT_CONFIG_COUNT`, and its own process group so that killing
//! it also stops the `pack-objects` it started. It keeps no fd above 2: no other connection's
//! socket or pipe may leak into a git process (monoio's pipes and some sockets are not
//! close-on-exec). It is started without fork ([`super::spawn`]).
//!
//! Runtime-agnostic: this hands back raw fds; [`super::stream`] drives them on a shard.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::child::Child;
use super::relay::{self, RelayRequest, RelayStdio};

pub use gitplane_wire::git::service::Service;

/// How the service talks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Smart HTTP `GET info/refs`: print the advertisement and exit.
    AdvertiseRefs,
    /// Smart HTTP `POST`: one request on stdin, one response on stdout.
    StatelessRpc,
    /// SSH: a full bidirectional conversation.
    Interactive,
}

/// Whether git reads its whole request before it writes a byte of its answer: upload-pack over
/// smart HTTP. Such a request can be sent up before the answer is read, on one thread; a push's
/// receive-pack reports progress while it reads, and an interactive (SSH) git talks both ways.
pub fn reads_request_first(service: Service, mode: Mode) -> bool {
    service == Service::UploadPack && mode == Mode::StatelessRpc
}

/// Server-wide settings every git child runs with. They make hosting behave as users expect:
/// partial clone and lazy fetches work, push options are accepted, pushed objects are checked,
/// and refs and objects are fsynced before receive-pack reports success (nothing acknowledged is
/// lost on power failure). No git ever runs `gc --auto` on its own (issue #12): a push would wait
/// for an unbounded, unscheduled repack; the housekeeping jobs maintain repositories instead.
const GIT_SETTINGS: &[(&str, &str)] = &[
    ("receive.autogc", "false"),
    ("gc.auto", "0"),
    ("maintenance.auto", "false"),
    ("uploadpack.allowFilter", "true"),
    ("uploadpack.allowAnySHA1InWant", "true"),
    ("receive.advertisePushOptions", "true"),
    ("receive.fsckObjects", "true"),
    ("core.fsync", "committed,index"),
    ("core.fsyncMethod", "fsync"),
    ("safe.directory", "*"),
];

/// Where receive-pack finds gitplane's hooks (`core.hooksPath`, e.g. `DATA/hooks`), set once at
/// server start by the hook workers; None leaves repositories' own hooks directories in use.
static HOOKS_PATH: std::sync::RwLock<Option<PathBuf>> = std::sync::RwLock::new(None);

/// Makes every receive-pack spawned from now on run the hooks in `dir` (issue #6: post-receive
/// records the push in the hook outbox before receive-pack reports success).
pub fn set_hooks_path(dir: &Path) {
    *HOOKS_PATH.write().unwrap_or_else(|p| p.into_inner()) = Some(dir.to_owned());
}

fn hooks_path() -> Option<PathBuf> {
    HOOKS_PATH.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Accepts `GIT_PROTOCOL` values like `version=2` or `version=2:object-format=sha1`; anything
/// else is dropped rather than passed to git.
pub fn sanitize_git_protocol(value: &str) -> Option<&str> {
    let ok = !value.is_empty()
        && value.len() <= 256
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b':' | b'.' | b'-' | b'_'));
    ok.then_some(value)
}

/// A `git` command with a clean environment: no inherited variables or secrets, no user or
/// system config, `HOME` at `home`, and [`GIT_SETTINGS`] through `GIT_CONFIG_COUNT` (protected
/// config, which a repository's own config cannot override). Every git gitplane runs starts here.
pub fn git_command(git: &Path, home: &Path) -> Command {
    let mut cmd = Command::new(git);
    cmd.env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin")),
        )
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("HOME", home)
        .env("GIT_CONFIG_COUNT", GIT_SETTINGS.len().to_string());
    for (i, (k, v)) in GIT_SETTINGS.iter().enumerate() {
        cmd.env(format!("GIT_CONFIG_KEY_{i}"), k)
            .env(format!("GIT_CONFIG_VALUE_{i}"), v);
    }
    cmd
}

/// A request to run one git service.
pub struct GitCommand<'a> {
    pub git: &'a Path,
    pub service: Service,
    pub repo_dir: &'a Path,
    pub mode: Mode,
    /// Already sanitized with [`sanitize_git_protocol`].
    pub protocol: Option<&'a str>,
    /// Extra variables for hooks, e.g. who pushed.
    pub env: &'a [(&'a str, &'a str)],
    /// Run it on another node of the cluster (whose copy is current) instead of here.
    pub remote: Option<&'a RemoteExec>,
}

/// A node's copy of a repository to run git on, through the cluster transport
/// ([`super::relay`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteExec {
    pub node: String,
    /// Its `--cluster-listen` address.
    pub addr: String,
    /// The cluster token for `exec` on `repo`, made when the request was routed.
    pub token: String,
    /// `OWNER/NAME`.
    pub repo: String,
    /// The repository's state when the request was routed, which the relay's cache keys its
    /// copies of answers on; None: nothing is kept (`[cluster] relay_cache = false`).
    pub generation: Option<RepoGeneration>,
}

/// A repository's state in the cluster's shared store: its row (a repository deleted and created
/// again under the same name gets another) and its generation (one more per acknowledged write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepoGeneration {
    pub repo_id: i64,
    pub number: i64,
}

/// The parent's ends of a running git child.
pub struct SpawnedGit {
    pub child: Child,
    /// Readable when the child ends (a pidfd, or a relay's pipe), so waiting never blocks.
    pub ended: OwnedFd,
    /// Our end of the child's stdin (a socketpair); None in advertise mode.
    pub stdin: Option<UnixStream>,
    /// The read end of the child's stdout pipe: non-blocking, close-on-exec, enlarged.
    pub stdout: OwnedFd,
    /// Our end of the child's stderr (a socketpair).
    pub stderr: UnixStream,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start `{git} {service}` in {repo}: {source}")]
    Spawn {
        git: PathBuf,
        service: &'static str,
        repo: PathBuf,
        source: io::Error,
    },
    #[error("cannot set up pipes for git: {0}")]
    Pipes(io::Error),
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A pipe whose read end is non-blocking; both ends close-on-exec.
fn stdout_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = super::splice::pipe()?;
    super::splice::enlarge_pipe(read.as_raw_fd());
    set_nonblocking(read.as_raw_fd(), true)?;
    Ok((read, write))
}

/// Sets or clears O_NONBLOCK, returning the previous flags.
pub fn set_nonblocking(fd: libc::c_int, on: bool) -> io::Result<libc::c_int> {
    // SAFETY: fcntl on a caller-provided open fd.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    if new != flags {
        // SAFETY: as above.
        cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, new) })?;
    }
    Ok(flags)
}

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

impl GitCommand<'_> {
    pub fn spawn(&self) -> Result<SpawnedGit, SpawnError> {
        let (stdout_read, stdout_write) = stdout_pipe().map_err(SpawnError::Pipes)?;
        let (stderr_ours, stderr_child) = UnixStream::pair().map_err(SpawnError::Pipes)?;
        let (stdin_ours, stdin_child_end) = match self.mode {
            Mode::AdvertiseRefs => (None, None),
            _ => {
                let (ours, child) = UnixStream::pair().map_err(SpawnError::Pipes)?;
                (Some(ours), Some(child))
            }
        };

        if let Some(remote) = self.remote {
            let request = RelayRequest {
                remote,
                service: self.service,
                mode: self.mode,
                protocol: self.protocol,
                env: self.env,
            };
            let stdio = RelayStdio {
                stdin: stdin_child_end,
                stdout: stdout_write,
                stderr: stderr_child,
            };
            let (ending, ended) = relay::start(&request, stdio).map_err(SpawnError::Pipes)?;
            return Ok(SpawnedGit {
                child: Child::Relay(ending),
                ended,
                stdin: stdin_ours,
                stdout: stdout_read,
                stderr: stderr_ours,
            });
        }
        let cmd = self.local_command();
        let spawned = super::spawn::spawn(
            &cmd,
            stdin_child_end.as_ref().map(AsRawFd::as_raw_fd),
            stdout_write.as_raw_fd(),
            stderr_child.as_raw_fd(),
        );
        // The child has its copies: ours must close so that EOF can reach us.
        drop((stdin_child_end, stdout_write, stderr_child));
        let pid = spawned.map_err(|source| SpawnError::Spawn {
            git: self.git.to_owned(),
            service: self.service.subcommand(),
            repo: self.repo_dir.to_owned(),
            source,
        })?;
        self.start(pid, stdin_ours, stdout_read, stderr_ours)
    }

    /// `git SERVICE [--stateless-rpc [--advertise-refs]] DIR` with this node's settings.
    fn local_command(&self) -> Command {
        let mut cmd = git_command(self.git, self.repo_dir);
        let per_service = match self.service {
            Service::ReceivePack => hooks_path().map(|p| ("core.hooksPath", p.into_os_string())),
            Service::UploadPack => super::pack_cache::hook_command().map(|(hook, settings)| {
                cmd.env(super::pack_cache::HOOK_ENV, settings);
                ("uploadpack.packObjectsHook", hook)
            }),
            Service::UploadArchive => None,
        };
        let mut config_count = GIT_SETTINGS.len();
        if let Some((key, value)) = per_service {
            cmd.env(format!("GIT_CONFIG_KEY_{config_count}"), key)
                .env(format!("GIT_CONFIG_VALUE_{config_count}"), value);
            config_count += 1;
        }
        cmd.env("GIT_CONFIG_COUNT", config_count.to_string());
        if let Some(p) = self.protocol {
            cmd.env("GIT_PROTOCOL", p);
        }
        for (k, v) in self.env {
            cmd.env(k, v);
        }
        cmd.arg(self.service.subcommand());
        match self.mode {
            Mode::AdvertiseRefs => {
                cmd.args(["--stateless-rpc", "--advertise-refs"]);
            }
            Mode::StatelessRpc if self.service != Service::UploadArchive => {
                cmd.arg("--stateless-rpc");
            }
            _ => {}
        }
        // repo_dir is absolute (built from a validated name), so it can never read as an option.
        cmd.arg(self.repo_dir);
        cmd
    }

    fn start(
        &self,
        pid: libc::pid_t,
        stdin_ours: Option<UnixStream>,
        stdout_read: OwnedFd,
        stderr_ours: UnixStream,
    ) -> Result<SpawnedGit, SpawnError> {
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                kill_group(pid);
                // SAFETY: reaping our own child.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                return Err(SpawnError::Pipes(e));
            }
        };
        Ok(SpawnedGit {
            child: Child::Process(pid),
            ended: pidfd,
            stdin: stdin_ours,
            stdout: stdout_read,
            stderr: stderr_ours,
        })
    }
}

/// SIGKILLs the child's whole process group.
pub fn kill_group(pid: libc::pid_t) {
    // SAFETY: signalling a process group we created; harmless if it is already gone.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

/// The processes of group `pgid` still running (not yet zombies), from /proc. Not
/// `kill(-pgid, 0)`: that counts zombies too, and an orphan's zombie may never be reaped where
/// PID 1 does not reap (some containers).
pub fn running_in_group(pgid: libc::pid_t) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            crate::procfs::read_stat(pid).is_some_and(|stat| {
                state_and_group(&stat)
                    .is_some_and(|(state, group)| group == pgid && state != "Z" && state != "X")
            })
        })
        .collect()
}

/// After [`kill_group`] and reaping the leader: waits, at most `within`, until no process of the
/// group still runs (the leader's own children die on their own time). False if some still do.
pub fn wait_group_stopped(pgid: libc::pid_t, within: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if running_in_group(pgid).is_empty() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// (state, process group) of a `/proc/PID/stat` line.
fn state_and_group(stat: &str) -> Option<(&str, libc::pid_t)> {
    let mut fields = crate::procfs::stat_fields(stat)?;
    let state = fields.next()?;
    let _parent = fields.next()?;
    Some((state, fields.next()?.parse().ok()?))
}

/// Reaps the child if it has exited; Some(exit code, or 128+signal) when reaped.
pub fn try_reap(pid: libc::pid_t) -> Option<i32> {
    reap(pid, libc::WNOHANG)
}

/// Blocks until the child exits and reaps it: its exit code, or 128+signal.
pub fn wait_blocking(pid: libc::pid_t) -> i32 {
    loop {
        match reap(pid, 0) {
            Some(code) => return code,
            // Only EINTR gets here without a status.
            None => continue,
        }
    }
}

fn reap(pid: libc::pid_t, flags: libc::c_int) -> Option<i32> {
    let mut status = 0;
    // SAFETY: waitpid on our own child with a valid status pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, flags) };
    if r == pid {
        Some(if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        })
    } else if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
        None
    } else if r < 0 {
        // ECHILD: already reaped elsewhere; nothing left to wait for.
        Some(-1)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names() {
        assert_eq!(
            state_and_group("4681 (git) R 4600 4600 0 0"),
            Some(("R", 4600))
        );
        assert_eq!(state_and_group("7 (a) b (c)) Z 1 99 0"), Some(("Z", 99)));
        assert_eq!(state_and_group("7 (git"), None);
        assert_eq!(state_and_group("7 (git) T 1 x"), None);
    }

    #[test]
    fn a_killed_group_with_a_stopped_grandchild_stops_running() {
        use std::os::unix::process::CommandExt;
        // A leader whose child is stopped, as a frozen repack's pack-objects would be.
        let mut leader = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & kill -STOP $!; wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let group = leader.id() as libc::pid_t;
        let started = std::time::Instant::now();
        // The shell and its stopped sleep: a stopped process counts as running.
        while running_in_group(group).len() < 2
            && started.elapsed() < std::time::Duration::from_secs(5)
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            running_in_group(group).len(),
            2,
            "the shell and its stopped child never both showed"
        );
        kill_group(group);
        leader.wait().unwrap();
        wait_group_stopped(group, std::time::Duration::from_secs(5));
        assert_eq!(
            running_in_group(group),
            Vec::<u32>::new(),
            "members still run 5 s after SIGKILL"
        );
    }

    #[test]
    fn git_protocol_values() {
        assert_eq!(sanitize_git_protocol("version=2"), Some("version=2"));
        assert_eq!(
            sanitize_git_protocol("version=2:object-format=sha256"),
            Some("version=2:object-format=sha256")
        );
        assert_eq!(sanitize_git_protocol("version=2\nX=1"), None);
        assert_eq!(sanitize_git_protocol("a b"), None);
        assert_eq!(sanitize_git_protocol(""), None);
    }

    #[test]
    fn no_git_runs_gc_on_its_own() {
        let cmd = git_command(Path::new("git"), Path::new("/tmp"));
        let env: Vec<(String, String)> = cmd
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_str()?.to_owned(), v?.to_str()?.to_owned())))
            .collect();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let count: usize = get("GIT_CONFIG_COUNT").unwrap().parse().unwrap();
        let settings: Vec<(String, String)> = (0..count)
            .map(|i| {
                let key = get(&format!("GIT_CONFIG_KEY_{i}")).unwrap();
                (key, get(&format!("GIT_CONFIG_VALUE_{i}")).unwrap())
            })
            .collect();
        for (k, v) in [("receive.autogc", "false"), ("gc.auto", "0")] {
            assert!(settings.contains(&(k.to_owned(), v.to_owned())), "{k}");
        }
    }

    #[test]
    fn services() {
        assert_eq!(
            Service::from_wire("git-upload-pack"),
            Some(Service::UploadPack)
        );
        assert_eq!(
            Service::from_wire("git-receive-pack"),
            Some(Service::ReceivePack)
        );
        assert_eq!(Service::from_wire("git-shell"), None);
        assert!(Service::ReceivePack.writes());
        assert!(!Service::UploadPack.writes());
    }
}
