//! Pipe and splice(2) primitives shared by the shard's pack path and the cluster relay.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// Pipe capacity for pack streams. 1 MiB makes each splice move up to 1 MiB and wakes the reader
/// once per MiB rather than per 64 KiB; the kernel caps it at /proc/sys/fs/pipe-max-size (1 MiB
/// by default) for unprivileged users.
const PIPE_SIZE: libc::c_int = 1 << 20;

/// A pipe, both ends close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Grows the pipe `fd` to [`PIPE_SIZE`]. A smaller pipe still works, only slower, so a refusal
/// (pipe-max-size lowered, the user's pipe budget spent, not a pipe) is ignored.
pub fn enlarge_pipe(fd: libc::c_int) {
    // SAFETY: plain fcntl on a caller-provided fd; failure changes nothing.
    unsafe {
        libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_SIZE);
    }
}

/// A pack stream that has moved this many bytes is a bulk transfer: from then on a little
/// waiting in the pipe is not sent at once ([`worth_waiting`]). Smaller answers (ref lists,
/// acknowledgements, the start of a pack) are never delayed.
const BULK_AFTER: u64 = 256 * 1024;
/// In a bulk transfer, fewer bytes than this waiting in the pipe are worth a short wait.
const COALESCE_BELOW: usize = 64 * 1024;
/// The wait: once, then whatever is there goes.
pub const COALESCE_WAIT: std::time::Duration = std::time::Duration::from_millis(1);

/// The coalescing rule for one pack stream's reader: wait [`COALESCE_WAIT`] when
/// [`worth_waiting`] says so and the writer is still there, never twice in a row.
#[derive(Debug, Default)]
pub struct Coalescing {
    waited: bool,
}

impl Coalescing {
    /// Whether to wait before moving `available` bytes on a stream that has moved `moved`;
    /// `hung_up` (a syscall for some callers) is asked only when waiting is otherwise due.
    pub fn wait_first(
        &mut self,
        moved: u64,
        available: usize,
        hung_up: impl FnOnce() -> bool,
    ) -> bool {
        let wait = !self.waited && worth_waiting(moved, available) && !hung_up();
        self.waited = wait;
        wait
    }
}

/// Whether to wait [`COALESCE_WAIT`] before moving `available` bytes on a stream that has moved
/// `moved`. upload-pack writes 8 KiB sideband packets; when pack-objects generates the pack,
/// the reader wakes for each and every splice carries 8 KiB: perf-visible per-call and
/// per-segment costs (a holder's shard spent 35-37 ms per 52 MB clone splicing, against 9-13 ms
/// on a pack cache hit, where the pipe fills faster than it drains).
pub fn worth_waiting(moved: u64, available: usize) -> bool {
    moved >= BULK_AFTER && available < COALESCE_BELOW
}

/// Bytes waiting in a pipe (FIONREAD).
pub fn pipe_available(fd: libc::c_int) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// True once the write end is closed and the pipe is empty.
pub fn pipe_hung_up(fd: libc::c_int) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & libc::POLLHUP != 0 && p.revents & libc::POLLIN == 0
}

/// Moves exactly `len` bytes from `from` to `to` (one of them a pipe) with blocking splices.
/// Fails with UnexpectedEof if `from` ends first.
pub fn splice_exact(from: libc::c_int, to: libc::c_int, mut len: usize) -> io::Result<()> {
    while len > 0 {
        // SAFETY: splice between two open fds, no offsets.
        len -=
            retry(|| unsafe { libc::splice(from, null(), to, null(), len, libc::SPLICE_F_MOVE) })?;
    }
    Ok(())
}

/// Moves exactly `len` bytes from `from` into the pipe `to` and, while `copy` is Some, the same
/// bytes into that file, through `scratch` (an empty pipe: read end, write end): tee(2)
/// duplicates the scratch pipe's page references into `to`, then splice moves them into the
/// file, so the bytes enter user space on neither path. A failing file write stops the copy
/// (`copy` becomes None), never the stream.
pub fn splice_tee_exact(
    from: libc::c_int,
    to: libc::c_int,
    copy: &mut Option<&std::fs::File>,
    (scratch_read, scratch_write): (libc::c_int, libc::c_int),
    mut len: usize,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    while len > 0 {
        let Some(file) = *copy else {
            return splice_exact(from, to, len);
        };
        // SAFETY (all three closures): splice or tee between open fds, no offsets.
        let n = retry(|| unsafe {
            libc::splice(
                from,
                null(),
                scratch_write,
                null(),
                len,
                libc::SPLICE_F_MOVE,
            )
        })?;
        len -= n;
        // The scratch pipe holds `n` bytes: each round tees some to `to`, then moves them to
        // the file.
        let mut held = n;
        while held > 0 {
            let teed = retry(|| unsafe { libc::tee(scratch_read, to, held, 0) })?;
            let mut saved = 0;
            while saved < teed {
                let moved = retry(|| unsafe {
                    libc::splice(
                        scratch_read,
                        null(),
                        file.as_raw_fd(),
                        null(),
                        teed - saved,
                        0,
                    )
                });
                match moved {
                    Ok(m) => saved += m,
                    Err(_) => break,
                }
            }
            if saved < teed {
                // Writing the copy failed: drop what `to` has already got, send it the rest.
                *copy = None;
                discard(scratch_read, teed - saved)?;
                return splice_exact(scratch_read, to, held - teed)
                    .and_then(|()| splice_exact(from, to, len));
            }
            held -= teed;
        }
    }
    Ok(())
}

fn null() -> *mut libc::loff_t {
    std::ptr::null_mut()
}

/// One splice or tee, retried on EINTR; 0 bytes (the source ended) is UnexpectedEof.
fn retry(mut call: impl FnMut() -> libc::ssize_t) -> io::Result<usize> {
    loop {
        match call() {
            n if n > 0 => return Ok(n as usize),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}

/// Reads and drops `len` bytes from `fd`.
fn discard(fd: libc::c_int, mut len: usize) -> io::Result<()> {
    let mut buf = [0u8; 8192];
    while len > 0 {
        let want = len.min(buf.len());
        // SAFETY: reads at most `want` bytes into a buffer of at least that size.
        let n = retry(|| unsafe { libc::read(fd, buf.as_mut_ptr().cast(), want) })?;
        len -= n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn only_small_remainders_of_bulk_transfers_wait() {
        // An answer's first 256 KiB go as they come: ref lists and acks are never delayed.
        assert!(!worth_waiting(0, 1));
        assert!(!worth_waiting(BULK_AFTER - 1, 8 * 1024));
        // Past that, 8 KiB waits for company; a full 64 KiB does not.
        assert!(worth_waiting(BULK_AFTER, 8 * 1024));
        assert!(!worth_waiting(BULK_AFTER, COALESCE_BELOW));
    }

    #[test]
    fn splices_exactly_and_reports_a_short_source() {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut fds = [0; 2];
        // SAFETY: a valid array of two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        a.write_all(b"hello world").unwrap();
        splice_exact(b.as_raw_fd(), fds[1], 5).unwrap();
        assert_eq!(pipe_available(fds[0]).unwrap(), 5);
        // SAFETY: fds[0] is the pipe's read end, owned by this test from here on.
        let mut read = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
        let mut got = [0u8; 5];
        read.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        drop(a);
        let short = splice_exact(b.as_raw_fd(), fds[1], 100).unwrap_err();
        assert_eq!(short.kind(), io::ErrorKind::UnexpectedEof);
        // SAFETY: closing the write end we own; the read end then reports EOF.
        unsafe { libc::close(fds[1]) };
        let mut rest = Vec::new();
        read.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b" world");
        assert!(pipe_hung_up(read.as_raw_fd()));
    }

    /// A pipe's two ends, each owned by one File.
    fn pipe_files() -> (std::fs::File, std::fs::File) {
        let (read, write) = pipe().unwrap();
        (read.into(), write.into())
    }

    /// Streams `data` through [`splice_tee_exact`] into a pipe, copying into `copy`; returns
    /// what the pipe got and whether the copy was still on at the end.
    fn tee_through(data: &[u8], copy: &std::fs::File) -> (Vec<u8>, bool) {
        let (mut from_writer, from) = std::os::unix::net::UnixStream::pair().unwrap();
        let (mut out_read, out_write) = pipe_files();
        let (scratch_read, scratch_write) = pipe_files();
        let sent = data.to_vec();
        let writer = std::thread::spawn(move || from_writer.write_all(&sent).unwrap());
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            out_read.read_to_end(&mut got).unwrap();
            got
        });
        let mut copying = Some(copy);
        splice_tee_exact(
            from.as_raw_fd(),
            out_write.as_raw_fd(),
            &mut copying,
            (scratch_read.as_raw_fd(), scratch_write.as_raw_fd()),
            data.len(),
        )
        .unwrap();
        drop(out_write);
        writer.join().unwrap();
        (reader.join().unwrap(), copying.is_some())
    }

    #[test]
    fn tee_gives_the_pipe_and_the_file_the_same_bytes_and_survives_a_failing_file() {
        // Several pipes' worth, so every loop runs more than once.
        let data: Vec<u8> = (0..700_000u32).map(|i| (i * 13 % 251) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        let copy = std::fs::File::create(&path).unwrap();
        let (got, copying) = tee_through(&data, &copy);
        assert!(got == data, "the pipe got other bytes");
        assert!(copying);
        assert!(
            std::fs::read(&path).unwrap() == data,
            "the file got other bytes"
        );

        // A file that cannot be written (opened read-only): the copy stops, the stream does not.
        let read_only = std::fs::File::open(&path).unwrap();
        let (got, copying) = tee_through(&data, &read_only);
        assert!(
            got == data,
            "the pipe got other bytes after the copy failed"
        );
        assert!(!copying);
    }
}
