//! Starting a git child without fork(2). glibc's posix_spawn runs the child with
//! clone(CLONE_VM | CLONE_VFORK): it does not copy the server's page tables, so its cost does
//! not grow with the server's address space (runtimes, rings, buffer pools, a large binary). A
//! fork of the server cost about 1 ms of CPU per git child, some 13% of a clone's CPU on the node
//! serving it (perf of a relayed clone's holder, docs/BENCHMARKS.md, "Cluster"). std's Command
//! forks whenever it has a `pre_exec` closure, which gitplane needed for the two things below.
//!
//! The child gets what that closure gave it: its own process group (a kill reaches the
//! pack-objects it starts), and no fd above 2 (monoio's pipes and some sockets are not
//! close-on-exec; no other connection's socket may leak into git), here through glibc's
//! `closefrom` file action. As std does, the signal mask is emptied and SIGPIPE is back to its
//! default.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;

/// Starts `cmd` (built by [`super::process::git_command`]: its environment cleared, so the
/// variables it sets are the child's whole environment) with `stdin` (None: /dev/null),
/// `stdout` and `stderr` as fds 0-2. Returns the child's pid; the caller reaps it.
pub fn spawn(
    cmd: &Command,
    stdin: Option<RawFd>,
    stdout: RawFd,
    stderr: RawFd,
) -> io::Result<libc::pid_t> {
    if cmd.get_current_dir().is_some() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "spawn does not change the child's directory",
        ));
    }
    let args = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(c_string)
        .collect::<io::Result<Vec<_>>>()?;
    let env = cmd
        .get_envs()
        .filter_map(|(key, value)| {
            let value = value?;
            let mut pair = key.as_bytes().to_vec();
            pair.push(b'=');
            pair.extend_from_slice(value.as_bytes());
            Some(c_string(OsStr::from_bytes(&pair)))
        })
        .collect::<io::Result<Vec<_>>>()?;
    let argv = null_terminated(&args);
    let envp = null_terminated(&env);
    let attributes = Attributes::new()?;
    let mut actions = FileActions::new()?;
    actions.stdio(stdin, stdout, stderr)?;
    let program = &args[0];
    let mut pid: libc::pid_t = 0;
    let spawn_fn = if program.as_bytes().contains(&b'/') {
        libc::posix_spawn
    } else {
        // Looked up in the server's PATH, which is the PATH git_command hands the child.
        libc::posix_spawnp
    };
    // SAFETY: argv and envp are null-terminated arrays of pointers into `args` and `env`, which
    // outlive the call; the file actions and attributes are initialised.
    let r = unsafe {
        spawn_fn(
            &mut pid,
            program.as_ptr(),
            &actions.0,
            &attributes.0,
            argv.as_ptr(),
            envp.as_ptr(),
        )
    };
    check(r)?;
    Ok(pid)
}

fn c_string(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a NUL byte in a git argument or variable",
        )
    })
}

fn null_terminated(strings: &[CString]) -> Vec<*mut libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr().cast_mut())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect()
}

fn check(r: libc::c_int) -> io::Result<()> {
    match r {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// posix_spawn's attributes: own process group, empty signal mask, SIGPIPE at its default.
struct Attributes(libc::posix_spawnattr_t);

impl Attributes {
    fn new() -> io::Result<Self> {
        // SAFETY: a zeroed struct is what init expects to overwrite; on failure nothing was
        // allocated and Drop does not run (no Self is made).
        let mut attr = unsafe { std::mem::zeroed() };
        // SAFETY: initialising a struct we own.
        check(unsafe { libc::posix_spawnattr_init(&mut attr) })?;
        let mut this = Self(attr);
        // SAFETY: sigset manipulation on local sets; the attributes are initialised.
        unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            let mut default: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut default);
            libc::sigaddset(&mut default, libc::SIGPIPE);
            check(libc::posix_spawnattr_setsigmask(&mut this.0, &empty))?;
            check(libc::posix_spawnattr_setsigdefault(&mut this.0, &default))?;
            check(libc::posix_spawnattr_setpgroup(&mut this.0, 0))?;
            let flags = libc::POSIX_SPAWN_SETPGROUP
                | libc::POSIX_SPAWN_SETSIGMASK
                | libc::POSIX_SPAWN_SETSIGDEF;
            check(libc::posix_spawnattr_setflags(
                &mut this.0,
                flags as libc::c_short,
            ))?;
        }
        Ok(this)
    }
}

impl Drop for Attributes {
    fn drop(&mut self) {
        // SAFETY: initialised in new(), destroyed once.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

/// posix_spawn's file actions: stdio onto fds 0-2, every fd above closed.
struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<Self> {
        // SAFETY: as for Attributes::new.
        let mut actions = unsafe { std::mem::zeroed() };
        // SAFETY: initialising a struct we own.
        check(unsafe { libc::posix_spawn_file_actions_init(&mut actions) })?;
        Ok(Self(actions))
    }

    fn stdio(&mut self, stdin: Option<RawFd>, stdout: RawFd, stderr: RawFd) -> io::Result<()> {
        // SAFETY: the actions are initialised; the fds are open for the duration of the spawn
        // (the caller's), and the path is a NUL-terminated literal.
        unsafe {
            match stdin {
                Some(fd) => check(libc::posix_spawn_file_actions_adddup2(&mut self.0, fd, 0))?,
                None => check(libc::posix_spawn_file_actions_addopen(
                    &mut self.0,
                    0,
                    c"/dev/null".as_ptr(),
                    libc::O_RDONLY,
                    0,
                ))?,
            }
            check(libc::posix_spawn_file_actions_adddup2(
                &mut self.0,
                stdout,
                1,
            ))?;
            check(libc::posix_spawn_file_actions_adddup2(
                &mut self.0,
                stderr,
                2,
            ))?;
            check(libc::posix_spawn_file_actions_addclosefrom_np(
                &mut self.0,
                3,
            ))
        }
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised in new(), destroyed once.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;

    /// The child sees exactly the command's variables, its own process group, fds 0-2 only, an
    /// empty signal mask and SIGPIPE at its default, even from a parent that leaks an fd and
    /// blocks a signal.
    #[test]
    fn the_child_gets_a_clean_start() {
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        // An fd that is not close-on-exec, like monoio's pipes.
        // SAFETY: dup of an fd we own; the copy is closed below.
        let leaky = unsafe { libc::dup(theirs.as_raw_fd()) };
        assert!(leaky > 2);
        let mut cmd = Command::new("sh");
        cmd.env_clear().env("ONLY", "this").args([
            "-c",
            "echo env=$(env | grep -v -e '^PWD=' -e '^SHLVL=' -e '^_=' | tr '\\n' ' '); \
             echo fds=$(ls /proc/self/fd | tr '\\n' ' '); \
             echo pgid=$(cut -d' ' -f5 /proc/self/stat) pid=$$; \
             grep -e SigBlk -e SigIgn /proc/self/status",
        ]);
        // SAFETY: blocking a signal on this thread only, restored below.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        }
        let pid = spawn(&cmd, None, theirs.as_raw_fd(), theirs.as_raw_fd()).unwrap();
        // SAFETY: restoring this thread's mask; closing the dup made above.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            libc::close(leaky);
        }
        drop(theirs);
        let mut out = String::new();
        ours.read_to_string(&mut out).unwrap();
        assert_eq!(super::super::process::wait_blocking(pid), 0, "{out}");
        assert!(out.contains("env=ONLY=this\n"), "{out}");
        // ls lists its own directory fd (3): a leaked fd would show as 4 or above.
        assert!(out.contains("fds=0 1 2 3\n"), "only stdio: {out}");
        assert!(out.contains(&format!("pgid={pid} pid={pid}")), "{out}");
        assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
        let ignored = out
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .expect("SigIgn line");
        assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "{out}");
        let missing = Command::new("/nonexistent/git");
        let err = spawn(&missing, None, 1, 2).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
