//! Hot binary upgrade without a helper (`kill -USR2`, `gitplane upgrade`): the running server
//! starts the binary now on disk with the same arguments, passes it every listening socket
//! (`GITPLANE_LISTEN_FDS`, see [`super::inherit`]) and a pipe, and waits for the new generation to
//! write `ready` on it. Only then does the old one stop accepting and drain as on SIGTERM; if the
//! new one fails or is not ready in time, the old one keeps serving. The sockets are never
//! closed, so no connection is refused at any point: until the new generation accepts, the
//! kernel queues connections in the same accept queues.
//!
//! A generation reports ready ([`report_ready`]) on that pipe, to systemd (`NOTIFY_SOCKET`,
//! with `MAINPID` so that `Type=notify` units follow the new process), and in the pid file.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::inherit::{LISTEN_FDS, SERVER_STARTER_PORT};

/// The pipe a new generation reports `ready` on.
const READY_FD: &str = "GITPLANE_READY_FD";
const READY: &[u8] = b"ready\n";

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot start the new generation {exe}: {source}")]
    Spawn { exe: PathBuf, source: io::Error },
    #[error("the new generation (pid {pid}) exited before it was ready (see its log above)")]
    Exited { pid: u32 },
    #[error("the new generation (pid {pid}) was not ready within {secs} s; it was told to stop")]
    Timeout { pid: u32, secs: u64 },
    #[error("upgrade pipe: {0}")]
    Pipe(io::Error),
}

/// How to start the next generation.
pub struct NextGeneration {
    /// The executable's path as it was at start-up: after a package upgrade it names the new
    /// binary (`/proc/self/exe` would still name the old, deleted one).
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    /// Every service's listening sockets, by service name.
    pub listeners: Vec<(&'static str, Vec<RawFd>)>,
    pub ready_timeout: Duration,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl NextGeneration {
    /// Starts the new generation and waits until it is ready; returns its pid. On failure the
    /// new process is told to stop (SIGTERM) and reaped, and this one serves on.
    pub fn start(&self) -> Result<u32, UpgradeError> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills two fds.
        cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })
            .map_err(UpgradeError::Pipe)?;
        // SAFETY: pipe2 succeeded; we own both ends.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let listen = self
            .listeners
            .iter()
            .map(|(service, fds)| {
                let list: Vec<String> = fds.iter().map(|fd| fd.to_string()).collect();
                format!("{service}={}", list.join(","))
            })
            .collect::<Vec<_>>()
            .join(";");
        let mut keep: Vec<RawFd> = self.listeners.iter().flat_map(|(_, f)| f.clone()).collect();
        keep.push(write_end.as_raw_fd());
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args)
            .env(LISTEN_FDS, listen)
            .env(READY_FD, write_end.as_raw_fd().to_string())
            .env_remove(SERVER_STARTER_PORT)
            .stdin(Stdio::null());
        // SAFETY: the closure only calls fcntl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &keep {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| UpgradeError::Spawn {
            exe: self.exe.clone(),
            source,
        })?;
        drop(cmd);
        drop(write_end);
        let pid = child.id();
        match wait_ready(read_end, self.ready_timeout) {
            Ok(true) => Ok(pid),
            outcome => {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                let _ = child.wait();
                match outcome {
                    Ok(_) => Err(UpgradeError::Exited { pid }),
                    Err(_) => Err(UpgradeError::Timeout {
                        pid,
                        secs: self.ready_timeout.as_secs(),
                    }),
                }
            }
        }
    }
}

/// Ok(true): `ready` arrived; Ok(false): the pipe closed without it; Err: the time ran out.
fn wait_ready(pipe: OwnedFd, timeout: Duration) -> Result<bool, ()> {
    let deadline = Instant::now() + timeout;
    let mut file = std::fs::File::from(pipe);
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(());
        }
        let mut p = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, ms) } <= 0 {
            continue;
        }
        let mut buf = [0u8; 16];
        match file.read(&mut buf) {
            Ok(0) | Err(_) => return Ok(false),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.starts_with(READY) {
                    return Ok(true);
                }
                if got.len() >= READY.len() {
                    return Ok(false);
                }
            }
        }
    }
}

/// Tells whoever waits that this generation serves: the previous generation (ready pipe),
/// systemd (`NOTIFY_SOCKET`), and the pid file. Errors are logged: serving goes on regardless.
pub fn report_ready(pid_file: Option<&Path>) {
    let pid = std::process::id();
    if let Some(fd) = std::env::var(READY_FD)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok())
        .filter(|fd| *fd > 2)
    {
        // SAFETY: the previous generation passed this fd to us for exactly this write.
        let mut pipe = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        if let Err(e) = pipe.write_all(READY) {
            tracing::warn!(error = %e, "cannot report ready to the previous generation");
        }
    }
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        if let Err(e) = notify_systemd(&path, &format!("READY=1\nMAINPID={pid}\n")) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }
    if let Some(path) = pid_file {
        if let Err(e) = write_pid_file(path, pid) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the pid file");
        }
    }
}

fn notify_systemd(path: &OsString, message: &str) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name)?,
        None => SocketAddr::from_pathname(Path::new(path))?,
    };
    UnixDatagram::unbound()?.send_to_addr(message.as_bytes(), &addr)?;
    Ok(())
}

/// Replaces the pid file atomically (a reader never sees it half written).
fn write_pid_file(path: &Path, pid: u32) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{pid}"));
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, path)
}

/// Removes the pid file if it still names this process (after an upgrade it names the next).
pub fn remove_pid_file(path: &Path) {
    if read_pid_file(path).ok() == Some(std::process::id()) {
        let _ = std::fs::remove_file(path);
    }
}

pub fn read_pid_file(path: &Path) -> io::Result<u32> {
    std::fs::read_to_string(path)?.trim().parse().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_files_are_replaced_whole_and_removed_only_by_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gitplane.pid");
        write_pid_file(&path, 1).unwrap();
        assert_eq!(read_pid_file(&path).unwrap(), 1);
        remove_pid_file(&path);
        assert!(path.exists(), "names another process");
        write_pid_file(&path, std::process::id()).unwrap();
        remove_pid_file(&path);
        assert!(!path.exists());
    }

    #[test]
    fn ready_needs_the_word_and_the_time() {
        let pair = |data: &[u8]| {
            let (r, w) = std::os::unix::net::UnixStream::pair().unwrap();
            (&w).write_all(data).unwrap();
            drop(w);
            OwnedFd::from(r)
        };
        assert_eq!(
            wait_ready(pair(b"ready\n"), Duration::from_secs(5)),
            Ok(true)
        );
        assert_eq!(
            wait_ready(pair(b"nope!!\n"), Duration::from_secs(5)),
            Ok(false)
        );
        assert_eq!(wait_ready(pair(b""), Duration::from_secs(5)), Ok(false));
        let (r, _w) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(
            wait_ready(OwnedFd::from(r), Duration::from_millis(50)),
            Err(())
        );
    }
}
