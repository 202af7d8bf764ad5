//! A running git child driven by tokio (the sidecar runtimes: SSH), the counterpart of
//! [`super::stream::RunningGit`] on the monoio shards.
//!
//! [`super::process::GitCommand::spawn`] hands back raw ends; here they become tokio I/O:
//! - stdout (a non-blocking pipe) as [`tokio::net::unix::pipe::Receiver`];
//! - stdin and stderr (socketpairs) as [`tokio::net::UnixStream`];
//! - the exit through the pidfd, which becomes readable when the child exits, so waiting never
//!   blocks the runtime thread and needs no SIGCHLD handler.
//!
//! Children are never left behind: dropping a [`TokioGit`] that was not waited for SIGKILLs its
//! process group (so `pack-objects` dies too) and reaps it, on the runtime when one is running,
//! else synchronously (a SIGKILLed process exits at once), so no zombie survives a cut session.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use tokio::net::UnixStream;

use super::child::Child;
use super::process::SpawnedGit;
use crate::metrics::METRICS;

#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("cannot register git's {what} with the runtime: {source}")]
    Register {
        what: &'static str,
        source: io::Error,
    },
}

/// A git child whose pipes are tokio I/O objects. Take the pipes, drive them, then [`wait`].
///
/// [`wait`]: TokioGit::wait
pub struct TokioGit {
    child: Child,
    ended: Option<AsyncFd<OwnedFd>>,
    reaped: bool,
    pub stdin: Option<UnixStream>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<UnixStream>,
}

impl TokioGit {
    /// Takes over a spawned child. Must run inside a tokio runtime with I/O enabled. On error
    /// the child has been killed and reaped.
    pub fn start(child: SpawnedGit) -> Result<Self, ChildError> {
        let mut git = Self {
            child: child.child,
            ended: None,
            reaped: false,
            stdin: None,
            stdout: None,
            stderr: None,
        };
        // From here on, Drop kills and reaps the child whatever fails below.
        METRICS.git_processes.inc();
        let reg = |what| move |source| ChildError::Register { what, source };
        // SAFETY: an OwnedFd stays open and keeps its number until the AsyncFd drops it.
        let ended =
            unsafe { AsyncFd::register_with_interest(child.ended, tokio::io::Interest::READABLE) };
        git.ended = Some(ended.map_err(|e| reg("exit fd")(io::Error::from(e)))?);
        git.stdout = Some(pipe::Receiver::from_owned_fd(child.stdout).map_err(reg("stdout pipe"))?);
        git.stderr = Some(stream(child.stderr).map_err(reg("stderr"))?);
        if let Some(stdin) = child.stdin {
            git.stdin = Some(stream(stdin).map_err(reg("stdin"))?);
        }
        Ok(git)
    }

    pub fn child(&self) -> &Child {
        &self.child
    }

    /// Waits for the child to exit and reaps it: its exit code, or 128 + signal number.
    /// Closes stdin first, so a child still reading it sees EOF.
    pub async fn wait(&mut self) -> i32 {
        self.stdin = None;
        loop {
            if let Some(code) = self.reap_now() {
                return code;
            }
            match self.ended.as_ref() {
                Some(fd) => match fd.readable().await {
                    // The pidfd stays readable once the child has exited; the next try_reap
                    // succeeds, so clearing readiness is only needed for a spurious wake.
                    Ok(mut guard) => guard.clear_ready(),
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                },
                None => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    fn reap_now(&mut self) -> Option<i32> {
        if self.reaped {
            return Some(-1);
        }
        let code = self.child.try_reap()?;
        self.reaped = true;
        METRICS.git_processes.dec();
        Some(code)
    }
}

fn stream(s: std::os::unix::net::UnixStream) -> io::Result<UnixStream> {
    s.set_nonblocking(true)?;
    UnixStream::from_std(s)
}

impl Drop for TokioGit {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        METRICS.git_processes.dec();
        METRICS.git_killed.inc();
        self.child.kill();
        if self.child.try_reap().is_some() {
            return;
        }
        let reaper = Reaper {
            child: self.child.clone(),
            ended: self.ended.take(),
            done: false,
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(reaper.run());
            }
            // Not on a runtime: the Reaper's Drop waits synchronously.
            Err(_) => drop(reaper),
        }
    }
}

/// Reaps one SIGKILLed child. If the runtime drops it before it ran (shutdown), Drop waits
/// synchronously: the child was SIGKILLed, so that wait is short.
struct Reaper {
    child: Child,
    ended: Option<AsyncFd<OwnedFd>>,
    done: bool,
}

impl Reaper {
    async fn run(mut self) {
        for _ in 0..2000 {
            if self.child.try_reap().is_some() {
                self.done = true;
                return;
            }
            match self.ended.as_ref() {
                Some(fd) => {
                    let ready =
                        tokio::time::timeout(Duration::from_millis(50), fd.readable()).await;
                    if let Ok(Ok(mut guard)) = ready {
                        guard.clear_ready();
                    }
                }
                None => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        // Still not gone after ~100 s of SIGKILL (uninterruptible I/O): Drop blocks for it.
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Deregister before closing: the fd must not be closed under the reactor.
        if let Some(fd) = self.ended.take() {
            drop(fd.into_inner());
        }
        self.child.wait_blocking();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::git::process::{GitCommand, Mode, Service};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn bare_repo(dir: &std::path::Path) -> std::path::PathBuf {
        let repo = dir.join("r.git");
        let ok = std::process::Command::new("git")
            .args(["init", "-q", "--bare"])
            .arg(&repo)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        repo
    }

    fn alive(pid: libc::pid_t) -> bool {
        // A zombie still has /proc/PID; check its state instead.
        crate::procfs::read_stat(pid as u32).is_some_and(|stat| {
            !crate::procfs::stat_fields(&stat)
                .and_then(|mut f| f.next())
                .is_some_and(|state| state.starts_with('Z'))
        })
    }

    #[test]
    fn runs_upload_pack_and_reports_exit() {
        let dir = tempfile::tempdir().unwrap();
        let repo = bare_repo(dir.path());
        runtime().block_on(async {
            let cmd = GitCommand {
                git: std::path::Path::new("git"),
                service: Service::UploadPack,
                repo_dir: &repo,
                mode: Mode::Interactive,
                protocol: Some("version=2"),
                env: &[],
                remote: None,
            };
            let mut git = TokioGit::start(cmd.spawn().unwrap()).unwrap();
            let mut stdout = git.stdout.take().unwrap();
            let mut stdin = git.stdin.take().unwrap();
            // v2 advertises capabilities first; a flush-pkt then ends the session.
            let mut buf = vec![0u8; 4096];
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).contains("version 2"));
            stdin.write_all(b"0000").await.unwrap();
            drop(stdin);
            let mut rest = Vec::new();
            stdout.read_to_end(&mut rest).await.unwrap();
            assert_eq!(git.wait().await, 0);
        });
    }

    #[test]
    fn drop_kills_and_reaps() {
        let dir = tempfile::tempdir().unwrap();
        let repo = bare_repo(dir.path());
        let pid = runtime().block_on(async {
            let cmd = GitCommand {
                git: std::path::Path::new("git"),
                service: Service::ReceivePack,
                repo_dir: &repo,
                mode: Mode::Interactive,
                protocol: None,
                env: &[],
                remote: None,
            };
            let git = TokioGit::start(cmd.spawn().unwrap()).unwrap();
            let pid = git.child().pid().unwrap();
            assert!(alive(pid));
            drop(git);
            // Let the reaper task run.
            for _ in 0..200 {
                if !alive(pid) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            pid
        });
        assert!(!alive(pid), "git {pid} survived its TokioGit");
        assert!(
            std::fs::metadata(format!("/proc/{pid}")).is_err(),
            "zombie left"
        );
    }
}
