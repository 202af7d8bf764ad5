//! A running git child on a monoio shard, and the zero-copy path from its stdout to a socket.
//!
//! The pack path: git writes into its stdout pipe (1 MiB); we learn how many bytes wait there
//! (FIONREAD), send the chunk header, then `splice(2)` exactly that many bytes from the pipe
//! straight into the TCP socket, so no pack byte passes through user space and there is no
//! intermediate pipe hop. monoio 0.2.4 cannot wrap a pipe fd or size its own pipes, so the splice
//! is a non-blocking syscall driven by monoio readiness (`readable`/`writable`, which are io_uring
//! poll requests on the io_uring driver): the pattern monoio documents for "doing io by your own".
//!
//! Children are never left behind: dropping a [`RunningGit`] that was not waited for kills its
//! process group, and a shard reaps such orphans with [`reap_orphans`].

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;

use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::{TcpStream, UnixStream};

use super::child::Child;
use super::process::{set_nonblocking, SpawnedGit};
use super::splice::{pipe_available, pipe_hung_up, Coalescing, COALESCE_WAIT};
use crate::metrics::METRICS;
use crate::progress::{PeerClock, ProgressRules, Stall};

/// How stdout bytes are framed on the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// HTTP/1.1 chunked transfer coding, ending with the zero chunk.
    Chunked,
    /// Raw bytes (HTTP/1.0 close-delimited bodies).
    Raw,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The client closed or reset the connection: nothing to answer, just clean up.
    #[error("client went away: {0}")]
    ClientGone(io::Error),
    #[error("reading git's output failed: {0}")]
    Child(io::Error),
    /// The client stopped accepting bytes (see [`crate::progress`]): the response is cut.
    #[error("the client stopped reading: {0}")]
    Stalled(Stall),
}

/// How a git child ended.
#[derive(Debug)]
pub struct ExitInfo {
    /// Exit code, or 128 + signal number.
    pub code: i32,
    /// The start of what git wrote on stderr (bounded).
    pub stderr: String,
}

const STDERR_KEEP: usize = 8 * 1024;

thread_local! {
    /// Killed children not yet reaped, per shard thread.
    static ORPHANS: RefCell<Vec<Child>> = const { RefCell::new(Vec::new()) };
}

/// Reaps killed children that have exited; returns how many remain. Call periodically, and with
/// `block` set when the shard stops.
pub fn reap_orphans(block: bool) -> usize {
    ORPHANS.with(|o| {
        let mut o = o.borrow_mut();
        o.retain(|child| {
            if block {
                child.wait_blocking();
                false
            } else {
                child.try_reap().is_none()
            }
        });
        o.len()
    })
}

/// Wraps a non-socket fd (pipe, pidfd) so monoio can tell us when it is readable. Nothing else
/// is done through the wrapper; dropping it closes the fd.
fn poll_handle(fd: OwnedFd) -> io::Result<UnixStream> {
    UnixStream::from_std(StdUnixStream::from(fd))
}

pub struct RunningGit {
    child: Child,
    reaped: bool,
    ended: UnixStream,
    stdin: Option<UnixStream>,
    stdout: UnixStream,
    stderr: Option<monoio::task::JoinHandle<String>>,
}

impl RunningGit {
    /// Takes over a spawned child. Must run inside a monoio runtime.
    pub fn start(child: SpawnedGit) -> io::Result<Self> {
        let mut running = Self {
            child: child.child,
            reaped: false,
            ended: poll_handle(child.ended)?,
            stdin: None,
            stdout: poll_handle(child.stdout)?,
            stderr: None,
        };
        METRICS.git_processes.inc();
        if let Some(stdin) = child.stdin {
            running.stdin = Some(UnixStream::from_std(stdin)?);
        }
        let stderr = UnixStream::from_std(child.stderr)?;
        running.stderr = Some(monoio::spawn(drain_stderr(stderr)));
        Ok(running)
    }

    /// Writes request bytes to git's stdin. An error means git stopped reading (it exited).
    pub async fn write_stdin(&mut self, data: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let Some(stdin) = self.stdin.as_mut() else {
            return (Err(io::ErrorKind::BrokenPipe.into()), data);
        };
        let (res, data) = stdin.write_all(data).await;
        (res.map(|_| ()), data)
    }

    /// Signals end of input to git.
    pub async fn close_stdin(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            // Shut down now: a dropped monoio socket closes only when the ring runs again.
            let _ = stdin.shutdown().await;
        }
    }

    /// Streams all of git's stdout to `sock` with splice; returns the payload bytes moved. A
    /// client that stops accepting bytes under `send` gets [`StreamError::Stalled`].
    pub async fn splice_stdout(
        &mut self,
        sock: &mut TcpStream,
        framing: Framing,
        send: ProgressRules,
    ) -> Result<u64, StreamError> {
        let sock_fd = sock.as_raw_fd();
        let saved = set_nonblocking(sock_fd, true).map_err(StreamError::ClientGone)?;
        let mut client = PeerClock::new(send);
        let result = self.splice_loop(sock, framing, &mut client).await;
        // Back to what monoio expects for its own requests on this socket.
        if saved & libc::O_NONBLOCK == 0 {
            let _ = set_nonblocking(sock_fd, false);
        }
        result
    }

    async fn splice_loop(
        &mut self,
        sock: &mut TcpStream,
        framing: Framing,
        client: &mut PeerClock,
    ) -> Result<u64, StreamError> {
        let pipe_fd = self.stdout.as_raw_fd();
        let sock_fd = sock.as_raw_fd();
        let mut total = 0u64;
        // CRLF closing the previous chunk travels with the next header: one send per chunk.
        let mut pending_crlf = false;
        let mut header = [0u8; 24];
        let mut coalescing = Coalescing::default();
        loop {
            let available = match pipe_available(pipe_fd).map_err(StreamError::Child)? {
                0 => {
                    if pipe_hung_up(pipe_fd) {
                        break;
                    }
                    self.stdout
                        .readable(false)
                        .await
                        .map_err(StreamError::Child)?;
                    continue;
                }
                n if coalescing.wait_first(total, n, || pipe_hung_up(pipe_fd)) => {
                    monoio::time::sleep(COALESCE_WAIT).await;
                    continue;
                }
                n => n,
            };
            if framing == Framing::Chunked {
                let len = chunk_header(&mut header, pending_crlf, available);
                send_all(sock, sock_fd, &header[..len], libc::MSG_MORE, client).await?;
                pending_crlf = true;
            }
            let mut remaining = available;
            while remaining > 0 {
                // SAFETY: splice between two fds we own, no offsets.
                let n = unsafe {
                    libc::splice(
                        pipe_fd,
                        std::ptr::null_mut(),
                        sock_fd,
                        std::ptr::null_mut(),
                        remaining,
                        libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                    )
                };
                if n > 0 {
                    remaining -= n as usize;
                    client.moved(n as u64);
                    continue;
                }
                if n == 0 {
                    // FIONREAD promised bytes that are gone: only we read this pipe, so this
                    // cannot happen unless the kernel changed under us. Stop rather than spin.
                    return Err(StreamError::Child(io::ErrorKind::UnexpectedEof.into()));
                }
                let err = io::Error::last_os_error();
                match err.kind() {
                    // The pipe holds `remaining` bytes, so only the socket can be full.
                    io::ErrorKind::WouldBlock => client_writable(sock, client).await?,
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(StreamError::ClientGone(err)),
                }
            }
            total += available as u64;
            METRICS.bytes_spliced.add(available as u64);
        }
        if framing == Framing::Chunked {
            let tail: &[u8] = if pending_crlf {
                b"\r\n0\r\n\r\n"
            } else {
                b"0\r\n\r\n"
            };
            send_all(sock, sock_fd, tail, 0, client).await?;
        }
        Ok(total)
    }

    /// Waits for the child to exit and reaps it.
    pub async fn wait(mut self) -> ExitInfo {
        self.close_stdin().await;
        let code = loop {
            if let Some(code) = self.child.try_reap() {
                break code;
            }
            if self.ended.readable(false).await.is_err() {
                // Cannot poll: fall back to a short sleep between checks.
                monoio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        self.reaped = true;
        METRICS.git_processes.dec();
        let stderr = match self.stderr.take() {
            Some(task) => task.await,
            None => String::new(),
        };
        ExitInfo { code, stderr }
    }
}

impl Drop for RunningGit {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        METRICS.git_processes.dec();
        METRICS.git_killed.inc();
        self.child.kill();
        if self.child.try_reap().is_none() {
            ORPHANS.with(|o| o.borrow_mut().push(self.child.clone()));
        }
    }
}

async fn drain_stderr(mut stderr: UnixStream) -> String {
    let mut kept = Vec::new();
    let mut buf = Vec::with_capacity(4096);
    loop {
        let (res, b) = stderr.read(buf).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = STDERR_KEEP.saturating_sub(kept.len());
                kept.extend_from_slice(buf.get(..n.min(room)).unwrap_or_default());
                buf.clear();
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// Writes `[\r\n]{len:x}\r\n` into `out`, returning its length.
fn chunk_header(out: &mut [u8; 24], leading_crlf: bool, len: usize) -> usize {
    use std::io::Write;
    let mut cursor = io::Cursor::new(&mut out[..]);
    let _ = if leading_crlf {
        write!(cursor, "\r\n{len:x}\r\n")
    } else {
        write!(cursor, "{len:x}\r\n")
    };
    cursor.position() as usize
}

/// Waits until the client's socket takes bytes again, within what `client` has left to spend.
pub(crate) async fn client_writable(
    sock: &TcpStream,
    client: &mut PeerClock,
) -> Result<(), StreamError> {
    let started = std::time::Instant::now();
    let ready = monoio::time::timeout(client.budget(), sock.writable(false)).await;
    client.waited(started.elapsed());
    match ready {
        Ok(r) => r.map_err(StreamError::ClientGone),
        Err(_) => Err(StreamError::Stalled(client.stall())),
    }
}

/// Sends all of `data` on a socket in non-blocking mode, waiting for writability as needed.
async fn send_all(
    sock: &TcpStream,
    fd: libc::c_int,
    mut data: &[u8],
    flags: libc::c_int,
    client: &mut PeerClock,
) -> Result<(), StreamError> {
    while !data.is_empty() {
        // SAFETY: sending from a valid slice.
        let n = unsafe {
            libc::send(
                fd,
                data.as_ptr().cast(),
                data.len(),
                flags | libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            data = data.get(n as usize..).unwrap_or_default();
            client.moved(n as u64);
            continue;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::WouldBlock => client_writable(sock, client).await?,
            io::ErrorKind::Interrupted => {}
            _ => return Err(StreamError::ClientGone(err)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_headers() {
        let mut b = [0u8; 24];
        let n = chunk_header(&mut b, false, 0x1f);
        assert_eq!(&b[..n], b"1f\r\n");
        let n = chunk_header(&mut b, true, 1 << 20);
        assert_eq!(&b[..n], b"\r\n100000\r\n");
    }
}
