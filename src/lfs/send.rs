//! Sending an object to a download client so that a client that stops reading holds no pool
//! buffer and is cut at the send deadline.
//!
//! Each round first waits, holding nothing, until the socket is writable (an io_uring poll), then
//! asks the kernel how much the socket takes right now (send buffer size minus the bytes already
//! queued, `SIOCOUTQ`), and only then takes a pool buffer, reads at most that much from the
//! source and sends it without blocking. The buffer goes back to the pool at the end of the
//! round: bytes a file source could not send are read again later (from the page cache); a
//! streamed source (S3) keeps its unsent tail in the buffer until the socket takes it, within the
//! send deadline. The client's progress runs under [`crate::progress`] rules on a clock that
//! counts only the time spent waiting for the client.

use std::io;
use std::os::fd::AsRawFd;

use monoio::buf::IoBufMut;
use monoio::net::TcpStream;

use super::pool::{BufferPool, PooledBuf};
use crate::git::stream::{client_writable, StreamError};
use crate::metrics::METRICS;
use crate::progress::{PeerClock, ProgressRules, Stall};

/// Least the socket is assumed to take once writable, so an estimate of 0 cannot spin.
const MIN_ROOM: usize = 4096;

/// Where a download's bytes come from.
pub enum Source {
    Empty,
    Disk(monoio::fs::File),
    S3(super::s3::Response),
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the client stopped reading: {0}")]
    Stalled(Stall),
    #[error("client went away: {0}")]
    ClientGone(io::Error),
    #[error("reading the object: {0}")]
    Source(io::Error),
    #[error("object shorter than recorded")]
    Short,
}

impl Source {
    /// Reads up to `want` bytes at object offset `at` into the empty `buf`.
    async fn read(
        &mut self,
        buf: PooledBuf,
        want: usize,
        at: u64,
    ) -> (io::Result<usize>, PooledBuf) {
        let (res, slice) = match self {
            Source::Disk(file) => file.read_at(buf.slice_mut(0..want), at).await,
            Source::S3(resp) => resp.read_into(buf.slice_mut(0..want)).await,
            Source::Empty => return (Ok(0), buf),
        };
        (res, slice.into_inner())
    }

    /// Whether bytes read but not sent can be read again later instead of being kept.
    fn rereadable(&self) -> bool {
        matches!(self, Source::Disk(_))
    }
}

/// Sends the object bytes `start..start + len` from `source` to `sock`.
pub async fn send_object(
    sock: &TcpStream,
    pool: &BufferPool,
    source: &mut Source,
    start: u64,
    len: u64,
    rules: ProgressRules,
) -> Result<(), SendError> {
    let fd = sock.as_raw_fd();
    let mut client = PeerClock::new(rules);
    let mut done = 0u64;
    // A streamed source's bytes the socket has not taken yet: (buffer, bytes of it already sent).
    let mut held: Option<(PooledBuf, usize)> = None;
    while done < len {
        // Holding no buffer while the client takes nothing.
        client_writable(sock, &mut client)
            .await
            .map_err(|e| match e {
                StreamError::Stalled(s) => SendError::Stalled(s),
                StreamError::ClientGone(e) | StreamError::Child(e) => SendError::ClientGone(e),
            })?;
        let (buf, from) = match held.take() {
            Some(h) => h,
            None => {
                let room = socket_room(fd).map_err(SendError::ClientGone)?;
                let buf = pool.acquire().await;
                let want = usize::try_from(len - done)
                    .unwrap_or(usize::MAX)
                    .min(buf.capacity())
                    .min(room.max(MIN_ROOM));
                let (res, buf) = source.read(buf, want, start + done).await;
                match res {
                    Ok(0) => return Err(SendError::Short),
                    Ok(_) => (buf, 0),
                    Err(e) => return Err(SendError::Source(e)),
                }
            }
        };
        let rest = buf.filled().get(from..).unwrap_or_default();
        let sent = send_now(fd, rest).map_err(SendError::ClientGone)?;
        client.moved(sent as u64);
        METRICS.lfs.bytes_out.add(sent as u64);
        done += sent as u64;
        if sent < rest.len() && !source.rereadable() {
            held = Some((buf, from + sent));
        }
    }
    Ok(())
}

/// Bytes the socket's send buffer takes now: its size less what is queued (unsent or unacked).
/// Queued bytes cost a little more than their count, so this may overestimate slightly; the
/// non-blocking send then takes less and the rest waits for the next round.
fn socket_room(fd: libc::c_int) -> io::Result<usize> {
    let mut sndbuf: libc::c_int = 0;
    let mut size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_SNDBUF writes one int into a buffer of that size.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw mut sndbuf).cast(),
            &mut size,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ on sockets) writes one int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(sndbuf.saturating_sub(queued)).unwrap_or(0))
}

/// Sends what the socket takes without waiting; 0 when it takes nothing now.
fn send_now(fd: libc::c_int, data: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: sending from a valid slice.
        let n = unsafe {
            libc::send(
                fd,
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::WouldBlock => return Ok(0),
            io::ErrorKind::Interrupted => {}
            _ => return Err(err),
        }
    }
}
