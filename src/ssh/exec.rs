//! Running one git service for an SSH `exec` and streaming it over the channel.
//!
//! - git's stdout → channel data, git's stderr → channel extended data (stderr). Writes go
//!   through russh's `ChannelTx`, which sends only what the client's window allows: a slow
//!   reader stops us reading git's pipe, git blocks on the full pipe, and nothing piles up in
//!   memory beyond one window and one buffer per stream (256 KiB for stdout, 8 KiB for stderr).
//! - channel data → git's stdin; channel EOF closes git's stdin.
//! - git's exit code → `exit-status`, then EOF and close.
//! - The client closing the channel (or the connection dying, signalled by the supervisor)
//!   before git ends drops the [`TokioGit`], which kills git's process group and reaps it.
//! - A channel that moves no byte either way for `ssh.channel_idle_secs` ([`super::idle`]) is
//!   closed the same way, even while the connection itself stays alive.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::server::Msg;
use russh::{Channel, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::git::process::RemoteExec;
use tokio::sync::watch;

use super::idle::{Activity, ChannelStalled};
use super::phase::ExecGuard;
use super::SshShared;
use crate::git::limiter::{PackPermit, Requester};
use crate::git::process::{GitCommand, Mode, Service};
use crate::git::repo_name::RepoName;
use crate::git::tokio_child::{ChildError, TokioGit};
use crate::metrics::METRICS;

/// Read size from git's stdout; the channel splits it into packets. 256 KiB rather than 64 cut
/// the server's CPU per SSH clone of the 52 MB bench fixture by about 10% (fewer reads and
/// wake-ups per byte; git's stdout pipe holds 1 MiB).
const STDOUT_BUF: usize = 256 * 1024;
/// Read size from git's stderr: progress lines and messages.
const STDERR_BUF: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
enum ExecError {
    #[error("server busy: too many pack operations, retry later")]
    Busy,
    #[error("cannot start git: {0}")]
    Spawn(#[from] crate::git::process::SpawnError),
    #[error("cannot drive git: {0}")]
    Child(#[from] ChildError),
    #[error("reading git's output: {0}")]
    GitIo(io::Error),
    /// The client closed the channel, or the connection is gone: nothing to tell anyone.
    #[error("client went away")]
    ClientGone,
    /// The client moved no byte for the channel idle time: the channel is closed, and nothing
    /// is written first (its window may be shut).
    #[error(transparent)]
    Stalled(#[from] ChannelStalled),
}

/// Everything an exec needs, detached from the handler.
pub(super) struct ExecContext {
    pub shared: Arc<SshShared>,
    pub user: String,
    pub repo: RepoName,
    pub service: Service,
    pub protocol: Option<String>,
    pub peer: SocketAddr,
    /// Flips when the supervisor finds the connection dead.
    pub dead: watch::Receiver<bool>,
    /// The node to run git on when this one's copy is not current (a cluster).
    pub remote: Option<RemoteExec>,
}

/// Runs the exec to the end; always closes the channel.
pub(super) async fn run(ctx: ExecContext, guard: ExecGuard, channel: Channel<Msg>) {
    let (mut read, write) = channel.split();
    let mut dead = ctx.dead.clone();
    let started = Instant::now();
    let result = tokio::select! {
        r = serve(&ctx, &mut read, &write) => r,
        _ = dead.wait_for(|d| *d) => Err(ExecError::ClientGone),
    };
    let code = match result {
        Ok(code) => {
            tracing::debug!(peer = %ctx.peer, repo = %ctx.repo, service = ctx.service.wire_name(), code, elapsed_ms = started.elapsed().as_millis() as u64, "SSH git session done");
            code
        }
        Err(ExecError::ClientGone) => {
            tracing::info!(peer = %ctx.peer, repo = %ctx.repo, service = ctx.service.wire_name(), "SSH client went away; git killed");
            drop(guard);
            return;
        }
        Err(e @ ExecError::Stalled(_)) => {
            tracing::info!(peer = %ctx.peer, repo = %ctx.repo, service = ctx.service.wire_name(), error = %e, "SSH channel cut; git killed");
            let _ = write.close().await;
            drop(guard);
            return;
        }
        Err(e) => {
            tracing::warn!(peer = %ctx.peer, repo = %ctx.repo, service = ctx.service.wire_name(), error = %e, "SSH git session failed");
            let msg = match e {
                ExecError::Busy => format!("gitplane: {e}\n"),
                _ => "gitplane: internal error\n".to_owned(),
            };
            let _ = write.extended_data_bytes(1, msg.into_bytes()).await;
            1
        }
    };
    let _ = write.exit_status(u32::try_from(code).unwrap_or(1)).await;
    let _ = write.eof().await;
    let _ = write.close().await;
    drop(guard);
}

async fn serve(
    ctx: &ExecContext,
    read: &mut ChannelReadHalf,
    write: &ChannelWriteHalf<Msg>,
) -> Result<i32, ExecError> {
    let _permit = pack_slot(ctx).await.ok_or(ExecError::Busy)?;
    let dir = ctx.shared.repos.path_of(&ctx.repo);
    let repo_text = ctx.repo.to_string();
    let peer = ctx.peer.ip().to_string();
    let env = [
        ("GITPLANE_REPO", repo_text.as_str()),
        ("GITPLANE_USER", ctx.user.as_str()),
        ("GITPLANE_REMOTE_ADDR", peer.as_str()),
        ("GITPLANE_TRANSPORT", "ssh"),
    ];
    let cmd = GitCommand {
        git: &ctx.shared.config.git.binary,
        service: ctx.service,
        repo_dir: &dir,
        mode: Mode::Interactive,
        protocol: ctx.protocol.as_deref(),
        env: &env,
        remote: ctx.remote.as_ref(),
    };
    let spawned = cmd.spawn()?;
    METRICS.git_spawned.inc();
    let mut git = TokioGit::start(spawned)?;
    let (Some(stdout), Some(stderr)) = (git.stdout.take(), git.stderr.take()) else {
        return Err(ExecError::GitIo(io::ErrorKind::BrokenPipe.into()));
    };
    let stdin = git.stdin.take();
    let activity = Activity::new(ctx.shared.config.ssh.channel_idle);
    let outputs = async {
        let (out, err) = tokio::join!(
            copy_out(stdout, write.make_writer(), STDOUT_BUF, &activity),
            copy_out(
                stderr,
                write.make_writer_ext(Some(1)),
                STDERR_BUF,
                &activity
            )
        );
        out.and(err)
    };
    tokio::select! {
        r = outputs => r?,
        // The channel closed before git finished: the client is gone.
        _ = pump_stdin(read, stdin, &activity) => return Err(ExecError::ClientGone),
        stalled = activity.stalled() => return Err(stalled.into()),
    }
    // Both pipes reached EOF: git and its children have exited or are about to.
    Ok(git.wait().await)
}

/// Copies git's output to the channel; the channel write waits for the client's window.
async fn copy_out(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    buf_size: usize,
    activity: &Activity,
) -> Result<(), ExecError> {
    let mut buf = vec![0u8; buf_size];
    loop {
        let n = from.read(&mut buf).await.map_err(ExecError::GitIo)?;
        if n == 0 {
            return Ok(());
        }
        let chunk = buf.get(..n).unwrap_or_default();
        to.write_all(chunk)
            .await
            .map_err(|_| ExecError::ClientGone)?;
        activity.moved();
    }
}

/// Feeds channel data to git's stdin until the channel closes. Returns only then: EOF from
/// the client closes stdin but keeps watching, so the caller learns of an early close.
async fn pump_stdin(
    read: &mut ChannelReadHalf,
    mut stdin: Option<UnixStream>,
    activity: &Activity,
) {
    while let Some(msg) = read.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                activity.moved();
                if let Some(s) = stdin.as_mut() {
                    // git stopped reading (it exited or failed): drop the rest; its exit
                    // status and stderr tell the client why.
                    if s.write_all(&data).await.is_err() {
                        stdin = None;
                    }
                }
            }
            ChannelMsg::Eof => stdin = None,
            ChannelMsg::Close => return,
            _ => {}
        }
    }
}

/// Waits for a node-wide pack slot, bounded in queue length and time (as HTTP does).
async fn pack_slot(ctx: &ExecContext) -> Option<PackPermit> {
    let limiter = &ctx.shared.packs;
    let key = ctx.repo.to_string();
    if let Some(p) = limiter.try_acquire(&key, Requester::Authenticated) {
        return Some(p);
    }
    let Some(_ticket) = limiter.enqueue() else {
        METRICS.pack_queue_rejected.inc();
        return None;
    };
    METRICS.pack_queue_waits.inc();
    let deadline = Instant::now() + ctx.shared.config.git.queue_timeout;
    let mut delay = Duration::from_millis(1);
    loop {
        tokio::time::sleep(delay).await;
        if let Some(p) = limiter.try_acquire(&key, Requester::Authenticated) {
            return Some(p);
        }
        if Instant::now() >= deadline {
            METRICS.pack_queue_rejected.inc();
            return None;
        }
        delay = (delay * 2).min(Duration::from_millis(20));
    }
}
