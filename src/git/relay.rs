//! Running git on another node's copy of a repository (a cluster's read through a node that
//! holds no current copy), without a process here.
//!
//! [`start`] hands back the same ends a local git gives (stdin socketpair, stdout pipe, stderr
//! socketpair, an fd readable at the end), driven by a thread that speaks the cluster transport
//! ([`gitplane_wire::cluster`]) to the holding node: stdin is copied up; each stdout frame's
//! payload is spliced from the socket straight into the stdout pipe, from which the shard splices
//! it to the client as it would a local git's, so pack bytes never enter user space on this
//! node; stderr frames are written to the stderr socketpair; the exit frame is the exit code.
//! The first version started a `gitplane cluster-exec` process per request and copied every
//! byte through it: 109% of the serving node's CPU per relayed clone (docs/BENCHMARKS.md).
//! A smart HTTP upload-pack answer may instead come from, or be kept in, this node's copy of an
//! earlier identical one ([`super::relay_cache`]): a kept answer is tee(2)d into its file as it
//! passes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use gitplane_wire::cluster::{parse_exit, parse_frame_head, Header, Kind, Op, FRAME_HEAD};

use super::process::{Mode, RemoteExec, Service};
use super::relay_cache::{self, Plan, Request};
use super::splice::{pipe, splice_exact, splice_tee_exact};

/// How long connecting to the holding node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The exit code of a relay that failed on its own (node unreachable, cut, cancelled).
const RELAY_FAILED: i32 = 128;

/// How a relay ends: its exit code once known, and the connection to cut on cancel.
#[derive(Default)]
pub struct Ending {
    code: Mutex<Option<i32>>,
    ended: Condvar,
    /// None until connected; a cancel before then is remembered in `cancelled`.
    conn: Mutex<(Option<TcpStream>, bool)>,
}

impl Ending {
    pub fn code(&self) -> Option<i32> {
        *self.code.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cuts the connection: the holding node sees it go and kills its git; the relay thread
    /// ends with [`RELAY_FAILED`].
    pub fn cancel(&self) {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.1 = true;
        if let Some(c) = &conn.0 {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Blocks until the relay thread has ended.
    pub fn wait(&self) -> i32 {
        let mut code = self.code.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(c) = *code {
                return c;
            }
            code = self.ended.wait(code).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Registers the live connection; false if cancelled already.
    fn connected(&self, conn: &TcpStream) -> bool {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if slot.1 {
            return false;
        }
        slot.0 = conn.try_clone().ok();
        slot.0.is_some()
    }

    fn finish(&self, code: i32) {
        *self.code.lock().unwrap_or_else(|p| p.into_inner()) = Some(code);
        self.ended.notify_all();
    }
}

/// The child's ends of the stdio a relay drives: what a local git would get.
pub struct RelayStdio {
    pub stdin: Option<UnixStream>,
    /// The stdout pipe's write end (blocking).
    pub stdout: OwnedFd,
    pub stderr: UnixStream,
}

/// What to run there.
pub struct RelayRequest<'a> {
    pub remote: &'a RemoteExec,
    pub service: Service,
    pub mode: Mode,
    pub protocol: Option<&'a str>,
    /// `GITPLANE_*` variables for the hooks; others are dropped.
    pub env: &'a [(&'a str, &'a str)],
}

impl RelayRequest<'_> {
    fn header(&self) -> Header {
        let args = match self.mode {
            Mode::AdvertiseRefs => vec!["--stateless-rpc".into(), "--advertise-refs".into()],
            Mode::StatelessRpc if self.service != Service::UploadArchive => {
                vec!["--stateless-rpc".into()]
            }
            _ => Vec::new(),
        };
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("GITPLANE_"))
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        if let Some(p) = self.protocol {
            env.push(("GIT_PROTOCOL".into(), p.to_owned()));
        }
        Header {
            op: Op::Exec,
            auth: self.remote.token.clone(),
            repo: self.remote.repo.clone(),
            service: format!("git-{}", self.service.subcommand()),
            args,
            env,
            replica: false,
        }
    }
}

/// Starts the relay thread; returns its ending and an fd that becomes readable when it ends.
pub fn start(request: &RelayRequest<'_>, stdio: RelayStdio) -> io::Result<(Arc<Ending>, OwnedFd)> {
    let (done_read, done_write) = pipe()?;
    let ending = Arc::new(Ending::default());
    let header = request.header();
    let addr = request.remote.addr.clone();
    let node = request.remote.node.clone();
    let (repo, generation) = (request.remote.repo.clone(), request.remote.generation);
    let (service, mode) = (request.service, request.mode);
    let protocol = request.protocol.map(str::to_owned);
    let thread_ending = Arc::clone(&ending);
    crate::reused_threads::run(move || {
        let RelayStdio {
            stdin,
            stdout,
            mut stderr,
        } = stdio;
        let planned =
            relay_cache::plan(&repo, generation, service, mode, protocol.as_deref(), stdin);
        let code = match planned
            .and_then(|plan| run_plan(plan, &addr, header, &stdout, &mut stderr, &thread_ending))
        {
            Ok(code) => code,
            Err(e) => {
                let _ = writeln!(stderr, "gitplane: relay to node {node} ({addr}): {e}");
                RELAY_FAILED
            }
        };
        drop(stdout);
        drop(stderr);
        thread_ending.finish(code);
        // Last: the shard wakes on this and finds the code set.
        drop(done_write);
    })?;
    Ok((ending, done_read))
}

/// Serves a kept answer, or relays (keeping the answer when the plan says so).
fn run_plan(
    plan: Plan,
    addr: &str,
    mut header: Header,
    stdout: &OwnedFd,
    stderr: &mut UnixStream,
    ending: &Ending,
) -> io::Result<i32> {
    match plan {
        Plan::Hit(file, len) => {
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            splice_exact(file.as_raw_fd(), stdout.as_raw_fd(), len)?;
            Ok(0)
        }
        Plan::Relay(request) => relay(addr, &header, request, stdout, stderr, ending, None),
        Plan::Keep(keeping, request) => {
            header.env.push((
                relay_cache::CACHE_GENERATION_VAR.to_owned(),
                keeping.generation.to_string(),
            ));
            let (scratch_read, scratch_write) = pipe()?;
            super::splice::enlarge_pipe(scratch_write.as_raw_fd());
            let mut copy = Copy {
                file: Some(keeping.file()),
                scratch: (scratch_read.as_raw_fd(), scratch_write.as_raw_fd()),
                current: false,
            };
            let code = relay(
                addr,
                &header,
                request,
                stdout,
                stderr,
                ending,
                Some(&mut copy),
            );
            let complete = matches!(code, Ok(0)) && copy.current && copy.file.is_some();
            keeping.finish(complete);
            code
        }
    }
}

/// The copy a relay keeps of git's stdout, and whether the holder said its copy was current.
struct Copy<'a> {
    /// None once anything but stdout came (stderr) or writing failed.
    file: Option<&'a File>,
    scratch: (libc::c_int, libc::c_int),
    current: bool,
}

fn relay(
    addr: &str,
    header: &Header,
    request: Request,
    stdout: &OwnedFd,
    stderr: &mut UnixStream,
    ending: &Ending,
    mut copy: Option<&mut Copy<'_>>,
) -> io::Result<i32> {
    let sock: SocketAddr = addr
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e}")))?;
    let mut conn = TcpStream::connect_timeout(&sock, CONNECT_TIMEOUT)?;
    conn.set_nodelay(true)?;
    if !ending.connected(&conn) {
        return Ok(RELAY_FAILED);
    }
    conn.write_all(&header.encode())?;
    send_request(&mut conn, request)?;
    let mut payload = Vec::new();
    loop {
        let mut head = [0u8; FRAME_HEAD];
        conn.read_exact(&mut head)?;
        let (kind, len) = parse_frame_head(head)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        match kind {
            Kind::Stdout => match copy.as_deref_mut() {
                Some(c) if c.current => splice_tee_exact(
                    conn.as_raw_fd(),
                    stdout.as_raw_fd(),
                    &mut c.file,
                    c.scratch,
                    len,
                )?,
                _ => splice_exact(conn.as_raw_fd(), stdout.as_raw_fd(), len)?,
            },
            Kind::Current => {
                if let Some(c) = copy.as_deref_mut() {
                    c.current = true;
                }
            }
            Kind::Stderr | Kind::Exit | Kind::Error => {
                payload.resize(len, 0);
                conn.read_exact(&mut payload)?;
                match kind {
                    Kind::Stderr => {
                        // A kept answer is git's stdout alone: one with messages is not kept.
                        if let Some(c) = copy.as_deref_mut() {
                            c.file = None;
                        }
                        stderr.write_all(&payload)?
                    }
                    Kind::Exit => {
                        return parse_exit(&payload)
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
                    }
                    _ => {
                        let message = String::from_utf8_lossy(&payload);
                        return Err(io::Error::other(format!("refused: {message}")));
                    }
                }
            }
        }
    }
}

/// Sends git's stdin up: a request git reads whole goes up on this thread before the answer is
/// read; otherwise a thread of its own copies stdin up while the answer comes back.
fn send_request(conn: &mut TcpStream, request: Request) -> io::Result<()> {
    match request {
        Request::Whole(body) => {
            conn.write_all(&body)?;
            conn.shutdown(Shutdown::Write)
        }
        Request::Rest(head, mut rest) => {
            conn.write_all(&head)?;
            io::copy(&mut rest, conn)?;
            conn.shutdown(Shutdown::Write)
        }
        Request::First(mut stdin) => {
            io::copy(&mut stdin, conn)?;
            conn.shutdown(Shutdown::Write)
        }
        Request::Alongside(mut stdin) => {
            let mut up = conn.try_clone()?;
            crate::reused_threads::run(move || {
                let _ = io::copy(&mut stdin, &mut up);
                let _ = up.shutdown(Shutdown::Write);
            })
        }
    }
}
