//! The node-to-node transport: a listener on `--cluster-listen` that creates, deletes and runs
//! git on this node's copies of repositories for other nodes, and the client that asks it.
//! Framing is in `gitplane_wire::cluster`. Connections are few and long (a relayed clone, a
//! replica's push, a repair's fetch), so each gets a thread: blocking I/O, no runtime.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gitplane_wire::cluster::{
    exit_payload, frame_head, parse_exit, parse_frame_head, Header, Kind, Op, CACHE_GENERATION_VAR,
    FRAME_HEAD, MAX_FRAME, MAX_HEADER,
};

use super::auth::Secret;
use crate::git::process::{GitCommand, Mode, Service};
use crate::git::repo::RepoRoot;
use crate::git::repo_name::RepoName;
use crate::git::splice::{pipe_available, splice_exact, Coalescing, COALESCE_WAIT};
use crate::reused_threads;
use crate::store::{Location, Store};

/// How long a peer may take to connect or to send its header.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once; past it new ones get an error frame.
const MAX_CONNECTIONS: usize = 1024;
/// An `ls-refs` request longer than this (ref prefixes) is left to git.
const MAX_LS_REFS_REQUEST: u64 = 64 * 1024;

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
    /// git's protocol v2 advertisement ([`crate::git::v2`]); None: git answers each one.
    pub v2_advertisement: Option<Arc<[u8]>>,
    /// The shared store, for whether this node's copy is current ([`copy_is_current`]).
    pub store: Location,
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
        .filter(|(k, _)| k != "GIT_PROTOCOL" && k != CACHE_GENERATION_VAR)
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
    // Before git (or the v2 answers below) reads a ref: the relaying node may keep this answer.
    if let Some((_, generation)) = header.env.iter().find(|(k, _)| k == CACHE_GENERATION_VAR) {
        if copy_is_current(ctx, repo, &dir, generation) {
            send_frame(&conn, Kind::Current, &[])?;
        }
    }
    // A relayed v2 clone's first two requests are answered as the front end answers them:
    // the clone spawns git only for its pack, as it does on the node holding the copy.
    let mut consumed = Vec::new();
    if service == Service::UploadPack && protocol.is_some_and(|p| p.contains("version=2")) {
        match answer_v2(ctx, &dir, mode, &mut reader)? {
            V2Answer::Answered(bytes) => {
                send_frame(&conn, Kind::Stdout, &bytes)?;
                return send_frame(&conn, Kind::Exit, &exit_payload(0));
            }
            V2Answer::ToGit(read) => consumed = read,
        }
    }
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
    // stdin: what was read already, then the socket, until the peer half-closes; first and on
    // this thread when git reads its request whole, else on a thread of its own.
    if let Some(mut stdin) = spawned.stdin {
        let mut feed = move || {
            let _ = stdin
                .write_all(&consumed)
                .and_then(|()| io::copy(&mut reader, &mut stdin));
            let _ = stdin.shutdown(std::net::Shutdown::Write);
        };
        if crate::git::process::reads_request_first(service, mode) {
            feed();
        } else {
            reused_threads::run(feed)?;
        }
    }
    let relayed = relay_output(&spawned.stdout, spawned.stderr, &conn);
    if relayed.is_err() {
        // The peer is gone: so is the point of the command.
        child.kill();
    }
    let code = child.wait_blocking();
    drop(spawned.ended);
    let sent = send_frame(&conn, Kind::Exit, &exit_payload(code));
    let _ = conn.shutdown(std::net::Shutdown::Both);
    sent
}

/// Whether this node's copy of `repo` holds every write up to `generation` (the relaying
/// node's reading of the store), so an answer read from it from now on shows that generation's
/// refs or later ones. Checked in this order: first no write of this copy's is between vote and
/// commit (the coordinator's copy lags its generation there; an aborted one is marked outdated
/// before its file goes), then the store still counts this copy current at that generation.
fn copy_is_current(ctx: &ServerContext, repo: &RepoName, dir: &Path, generation: &str) -> bool {
    let Ok(generation) = generation.parse::<i64>() else {
        return false;
    };
    if crate::cluster::replicate::transaction_pending(dir) {
        return false;
    }
    let replicas = Store::open(&ctx.store).and_then(|s| s.replicas(&repo.to_string()));
    matches!(replicas, Ok(Some(r)) if r.generation == generation && r.is_current(ctx.store.node()))
}

/// What [`answer_v2`] found.
enum V2Answer {
    /// git's stdout, as git would have printed it.
    Answered(Vec<u8>),
    /// git must answer; these bytes of its stdin were read already.
    ToGit(Vec<u8>),
}

/// The v2 advertisement, or an `ls-refs` whose request is read whole (it is small; a fetch is
/// told apart by its first bytes and streamed to git).
fn answer_v2(
    ctx: &ServerContext,
    dir: &std::path::Path,
    mode: Mode,
    reader: &mut BufReader<TcpStream>,
) -> io::Result<V2Answer> {
    match mode {
        Mode::AdvertiseRefs => {
            let Some(advertisement) = &ctx.v2_advertisement else {
                return Ok(V2Answer::ToGit(Vec::new()));
            };
            let config = std::fs::read(dir.join("config"));
            if !config.is_ok_and(|c| !crate::git::v2::config_needs_git(&c)) {
                return Ok(V2Answer::ToGit(Vec::new()));
            }
            crate::metrics::METRICS.v2_advertisements_served.inc();
            Ok(V2Answer::Answered(advertisement.to_vec()))
        }
        Mode::StatelessRpc => {
            let command = crate::git::v2::LS_REFS_COMMAND;
            let mut body = Vec::with_capacity(command.len());
            reader
                .by_ref()
                .take(command.len() as u64)
                .read_to_end(&mut body)?;
            if body != command {
                return Ok(V2Answer::ToGit(body));
            }
            reader
                .by_ref()
                .take(MAX_LS_REFS_REQUEST)
                .read_to_end(&mut body)?;
            if body.len() as u64 >= MAX_LS_REFS_REQUEST {
                return Ok(V2Answer::ToGit(body));
            }
            match crate::git::v2::answer_body(dir, &body) {
                Ok(refs) => {
                    crate::metrics::METRICS.v2_ls_refs_answered.inc();
                    Ok(V2Answer::Answered(refs))
                }
                Err(why) => {
                    tracing::debug!(dir = %dir.display(), %why, "relayed ls-refs goes to git");
                    Ok(V2Answer::ToGit(body))
                }
            }
        }
        Mode::Interactive => Ok(V2Answer::ToGit(Vec::new())),
    }
}

/// git's stdout and stderr to the peer as frames until both end, on this thread: stdout's
/// payload is spliced from the pipe into the socket (the bytes waiting (FIONREAD), a frame head,
/// then exactly that many bytes, never through user space); stderr, progress and error lines,
/// is read and sent as it comes. All of stderr goes out before the exit frame that follows.
fn relay_output(stdout: &OwnedFd, mut stderr: UnixStream, to: &TcpStream) -> io::Result<()> {
    let (out, err) = (stdout.as_raw_fd(), stderr.as_raw_fd());
    let (mut out_open, mut err_open) = (true, true);
    let mut line = [0u8; 8 * 1024];
    let (mut moved, mut coalescing) = (0u64, Coalescing::default());
    while out_open || err_open {
        // poll skips negative fds: an ended stream is no longer watched.
        let mut fds = [
            libc::pollfd {
                fd: if out_open { out } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if err_open { err } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents != 0 {
            let hung_up = fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0;
            match pipe_available(out)?.min(MAX_FRAME) {
                0 if hung_up => out_open = false,
                0 => {}
                // Fewer, larger frames: see worth_waiting.
                n if coalescing.wait_first(moved, n, || hung_up) => {
                    std::thread::sleep(COALESCE_WAIT);
                }
                n => {
                    (&*to).write_all(&frame_head(Kind::Stdout, n))?;
                    splice_exact(out, to.as_raw_fd(), n)?;
                    moved += n as u64;
                }
            }
        }
        if fds[1].revents != 0 {
            match stderr.read(&mut line) {
                Ok(0) => err_open = false,
                Ok(n) => send_frame(to, Kind::Stderr, &line[..n])?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => err_open = false,
            }
        }
    }
    Ok(())
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
            // Never asked for here.
            Kind::Current => {}
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
