//! The node-to-node transport: a listener on `--cluster-listen` that creates, deletes and runs
//! git on this node's copies of repositories for other nodes, and the client that asks it.
//! Framing is in `gitplane_wire::cluster`. Connections are few and long (a relayed clone, a
//! replica's push, a repair's fetch), so each gets a thread: blocking I/O, no runtime.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gitplane_wire::cluster::{
    exit_payload, frame_head, parse_exit, parse_frame_head, Header, Kind, Op, FRAME_HEAD,
    MAX_FRAME, MAX_HEADER,
};

use super::auth::Secret;
use crate::git::process::{GitCommand, Mode, Service};
use crate::git::repo::RepoRoot;
use crate::git::repo_name::RepoName;
use crate::git::splice::{pipe_wait_readable, splice_exact};
use crate::reused_threads;

/// How long a peer may take to connect or to send its header.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once; past it new ones get an error frame.
const MAX_CONNECTIONS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("node {addr}: {source}")]
    Io { addr: String, source: io::Error },
    #[error("node {addr} refused: {message}")]
    Refused { addr: String, message: String },
    #[error("node {addr}: {message}")]
    Protocol { addr: String, message: String },
}

/// What the listener needs.
pub struct ServerContext {
    pub secret: Secret,
    pub repos: RepoRoot,
    pub git: PathBuf,
}

/// Accepts on `listener` until the process exits.
pub fn serve(listener: TcpListener, ctx: Arc<ServerContext>) -> io::Result<()> {
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("gitplane-cluster".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (ctx, active) = (Arc::clone(&ctx), Arc::clone(&active));
                let n = active.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                let spawned = reused_threads::run(move || {
                    if n >= MAX_CONNECTIONS {
                        let _ = send_error(&conn, "too many cluster connections");
                    } else if let Err(e) = handle(conn, &ctx) {
                        tracing::debug!(error = %e, "cluster connection ended");
                    }
                    active.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                });
                if spawned.is_err() {
                    tracing::warn!("cannot start a thread for a cluster connection");
                }
            }
        })
        .map(drop)
}

fn send_frame(mut w: impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    for chunk in payload.chunks(MAX_FRAME) {
        w.write_all(&frame_head(kind, chunk.len()))?;
        w.write_all(chunk)?;
    }
    if payload.is_empty() {
        w.write_all(&frame_head(kind, 0))?;
    }
    Ok(())
}

fn send_error(conn: &TcpStream, message: &str) -> io::Result<()> {
    send_frame(conn, Kind::Error, message.as_bytes())
}

fn handle(conn: TcpStream, ctx: &ServerContext) -> io::Result<()> {
    conn.set_read_timeout(Some(HEADER_TIMEOUT))?;
    conn.set_nodelay(true)?;
    let mut reader = BufReader::with_capacity(64 * 1024, conn.try_clone()?);
    let mut line = Vec::with_capacity(512);
    (&mut reader)
        .take(MAX_HEADER as u64)
        .read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return send_error(&conn, "request header too long or cut short");
    }
    line.pop();
    let header = match Header::decode(&line) {
        Ok(h) => h,
        Err(e) => return send_error(&conn, &e.to_string()),
    };
    if !ctx.secret.verify(&header.auth, header.op, &header.repo) {
        tracing::warn!(peer = ?conn.peer_addr().ok(), op = ?header.op, "cluster request with a bad token");
        return send_error(&conn, "not authorised: wrong or stale cluster token");
    }
    if header.op == Op::Ping {
        return send_frame(&conn, Kind::Exit, &exit_payload(0));
    }
    let repo = match RepoName::parse(&header.repo) {
        Ok(r) => r,
        Err(e) => return send_error(&conn, &format!("repository name: {e}")),
    };
    match header.op {
        Op::Ping => Ok(()),
        Op::Init => match ctx.repos.init_bare(&ctx.git, &repo) {
            Ok(_) => send_frame(&conn, Kind::Exit, &exit_payload(0)),
            Err(e) => send_error(&conn, &e.to_string()),
        },
        Op::Delete => {
            let dir = ctx.repos.path_of(&repo);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => send_frame(&conn, Kind::Exit, &exit_payload(0)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    send_frame(&conn, Kind::Exit, &exit_payload(0))
                }
                Err(e) => send_error(&conn, &format!("deleting {}: {e}", dir.display())),
            }
        }
        Op::Exec => {
            conn.set_read_timeout(None)?;
            run_git(conn, reader, ctx, &repo, &header)
        }
    }
}

/// Runs git and relays: the socket's rest -> stdin; stdout and stderr -> frames; then exit.
fn run_git(
    conn: TcpStream,
    mut reader: BufReader<TcpStream>,
    ctx: &ServerContext,
    repo: &RepoName,
    header: &Header,
) -> io::Result<()> {
    let dir = ctx.repos.path_of(repo);
    if !dir.is_dir() {
        return send_error(&conn, &format!("no copy of {repo} on this node"));
    }
    let service = match header.service.as_str() {
        "git-upload-pack" => Service::UploadPack,
        "git-receive-pack" => Service::ReceivePack,
        _ => Service::UploadArchive,
    };
    let mode = match header.args.as_slice() {
        [] => Mode::Interactive,
        [a] if a == "--stateless-rpc" => Mode::StatelessRpc,
        _ => Mode::AdvertiseRefs,
    };
    let mut env: Vec<(&str, &str)> = header
        .env
        .iter()
        .filter(|(k, _)| k != "GIT_PROTOCOL")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if header.replica {
        env.push(("GITPLANE_REPLICA", "1"));
    }
    let protocol = header
        .env
        .iter()
        .find(|(k, _)| k == "GIT_PROTOCOL")
        .and_then(|(_, v)| crate::git::process::sanitize_git_protocol(v));
    let cmd = GitCommand {
        git: &ctx.git,
        service,
        repo_dir: &dir,
        mode,
        protocol,
        env: &env,
        remote: None,
    };
    let spawned = match cmd.spawn() {
        Ok(s) => s,
        Err(e) => return send_error(&conn, &e.to_string()),
    };
    let child = spawned.child.clone();
    let writer = Arc::new(Mutex::new(conn.try_clone()?));
    // stdin: what the reader already buffered, then the socket, until the peer half-closes.
    if let Some(mut stdin) = spawned.stdin {
        reused_threads::run(move || {
            let _ = io::copy(&mut reader, &mut stdin);
            let _ = stdin.shutdown(std::net::Shutdown::Write);
        })?;
    }
    let stderr_writer = Arc::clone(&writer);
    let mut stderr = spawned.stderr;
    let (pumped_tx, pumped) = std::sync::mpsc::sync_channel::<()>(1);
    reused_threads::run(move || {
        let _ = pump(&mut stderr, &stderr_writer, Kind::Stderr);
        let _ = pumped_tx.send(());
    })?;
    let relayed = splice_stdout(&spawned.stdout, &writer);
    // Every stderr frame goes out before the exit frame (a disconnect also means done).
    let _ = pumped.recv();
    if relayed.is_err() {
        // The peer is gone: so is the point of the command.
        child.kill();
    }
    let code = child.wait_blocking();
    drop(spawned.ended);
    let w = writer.lock().unwrap_or_else(|p| p.into_inner());
    let sent = send_frame(&*w, Kind::Exit, &exit_payload(code));
    let _ = w.shutdown(std::net::Shutdown::Both);
    sent
}

/// git's stdout to the peer as frames whose payload is spliced from the pipe into the socket:
/// the bytes waiting (FIONREAD), a frame head, then exactly that many bytes, never through user
/// space.
fn splice_stdout(stdout: &OwnedFd, to: &Mutex<TcpStream>) -> io::Result<()> {
    let fd = stdout.as_raw_fd();
    loop {
        let waiting = pipe_wait_readable(fd)?.min(MAX_FRAME);
        if waiting == 0 {
            return Ok(());
        }
        let w = to.lock().unwrap_or_else(|p| p.into_inner());
        (&*w).write_all(&frame_head(Kind::Stdout, waiting))?;
        splice_exact(fd, w.as_raw_fd(), waiting)?;
    }
}

fn pump(from: &mut impl Read, to: &Mutex<TcpStream>, kind: Kind) -> io::Result<()> {
    // stderr is progress and error lines: a small buffer, not a pack's.
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let w = to.lock().unwrap_or_else(|p| p.into_inner());
        send_frame(&*w, kind, &buf[..n])?;
    }
}

/// Connects to a node's cluster listener.
fn connect(addr: &str) -> Result<TcpStream, TransportError> {
    let io_err = |source| TransportError::Io {
        addr: addr.to_owned(),
        source,
    };
    let sock: SocketAddr = addr.parse().map_err(|e| {
        io_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not an address: {e}"),
        ))
    })?;
    let conn = TcpStream::connect_timeout(&sock, CONNECT_TIMEOUT).map_err(io_err)?;
    conn.set_nodelay(true).map_err(io_err)?;
    Ok(conn)
}

/// Asks a node for `op` on `repo` (ping, init, delete) and waits for its answer.
pub fn call(addr: &str, secret: &Secret, op: Op, repo: &str) -> Result<(), TransportError> {
    let header = Header {
        op,
        auth: secret.token(op, repo),
        repo: repo.to_owned(),
        service: String::new(),
        args: Vec::new(),
        env: Vec::new(),
        replica: false,
    };
    let code = exec(
        addr,
        &header,
        io::empty(),
        io::sink(),
        io::sink(),
        Some(Duration::from_secs(60)),
    )?;
    if code != 0 {
        return Err(TransportError::Refused {
            addr: addr.to_owned(),
            message: format!("exit {code}"),
        });
    }
    Ok(())
}

/// `gitplane cluster-exec`: runs `service` on the node at `addr` with this process's stdio, and
/// returns the remote exit status. The variables git and the hooks need cross with it.
pub fn relay_stdio(
    addr: &str,
    secret_file: &std::path::Path,
    repo: &str,
    service: &str,
    args: Vec<String>,
    replica: bool,
) -> Result<i32, super::ClusterError> {
    let secret = Secret::load(secret_file)?;
    let env = [
        "GIT_PROTOCOL",
        "GITPLANE_USER",
        "GITPLANE_REMOTE_ADDR",
        "GITPLANE_TRANSPORT",
        "GITPLANE_REPO",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
    .collect();
    let header = Header {
        op: Op::Exec,
        auth: secret.token(Op::Exec, repo),
        repo: repo.to_owned(),
        service: service.to_owned(),
        args,
        env,
        replica,
    };
    Ok(exec(
        addr,
        &header,
        io::stdin(),
        io::stdout().lock(),
        io::stderr().lock(),
        None,
    )?)
}

/// Sends `header` and relays: `stdin` to the node, its stdout and stderr frames to ours. Returns
/// the remote command's exit status.
pub fn exec(
    addr: &str,
    header: &Header,
    mut stdin: impl Read + Send + 'static,
    mut stdout: impl Write,
    mut stderr: impl Write,
    timeout: Option<Duration>,
) -> Result<i32, TransportError> {
    let io_err = |source| TransportError::Io {
        addr: addr.to_owned(),
        source,
    };
    let conn = connect(addr)?;
    conn.set_read_timeout(timeout).map_err(io_err)?;
    (&conn).write_all(&header.encode()).map_err(io_err)?;
    let mut upstream = conn.try_clone().map_err(io_err)?;
    std::thread::Builder::new()
        .name("gitplane-relay-in".into())
        .spawn(move || {
            let _ = io::copy(&mut stdin, &mut upstream);
            let _ = upstream.shutdown(std::net::Shutdown::Write);
        })
        .map_err(io_err)?;
    let mut reader = BufReader::with_capacity(256 * 1024, conn);
    let mut payload = Vec::new();
    loop {
        let mut head = [0u8; FRAME_HEAD];
        reader
            .read_exact(&mut head)
            .map_err(|e| TransportError::Protocol {
                addr: addr.to_owned(),
                message: format!("connection ended before the command's exit status: {e}"),
            })?;
        let (kind, len) = parse_frame_head(head).map_err(|e| TransportError::Protocol {
            addr: addr.to_owned(),
            message: e.to_string(),
        })?;
        payload.resize(len, 0);
        reader.read_exact(&mut payload).map_err(io_err)?;
        match kind {
            Kind::Stdout => {
                stdout.write_all(&payload).map_err(io_err)?;
                stdout.flush().map_err(io_err)?;
            }
            Kind::Stderr => {
                stderr.write_all(&payload).map_err(io_err)?;
                stderr.flush().map_err(io_err)?;
            }
            Kind::Exit => {
                return parse_exit(&payload).map_err(|e| TransportError::Protocol {
                    addr: addr.to_owned(),
                    message: e.to_string(),
                })
            }
            Kind::Error => {
                return Err(TransportError::Refused {
                    addr: addr.to_owned(),
                    message: String::from_utf8_lossy(&payload).into_owned(),
                })
            }
        }
    }
}
