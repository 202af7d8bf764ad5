//! Splice versus copy on the path that carries every pack: a pipe (git's stdout) to a TCP socket.
//! Self-contained: a loopback TCP connection whose far end a thread drains, and a 1 MiB pipe
//! (the size gitplane sets) that each iteration fills with 1 MiB and then empties into the socket
//! either with `splice(2)` (no user-space copy; what the server does) or with a `read`/`write`
//! loop through a 64 KiB buffer (the baseline). Filling costs the same in both arms.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const PIPE_SIZE: usize = 1 << 20;

struct Path {
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    sock: TcpStream,
    drain: Option<std::thread::JoinHandle<u64>>,
}

impl Path {
    fn new() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let sock = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut far, _) = listener.accept().expect("accept");
        let drain = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0u64;
            while let Ok(k) = far.read(&mut buf) {
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            n
        });
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds is a valid two-element array; the fds are owned right after.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds were just returned by pipe2 and are owned by nothing else.
        let (pipe_r, pipe_w) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: plain fcntl on an fd we own. Fails only past /proc/sys/fs/pipe-max-size.
        let got = unsafe { libc::fcntl(pipe_w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as i32) };
        assert!(
            got >= PIPE_SIZE as i32,
            "F_SETPIPE_SZ 1 MiB failed: raise fs.pipe-max-size (see tuning/)"
        );
        Self {
            pipe_r,
            pipe_w,
            sock,
            drain: Some(drain),
        }
    }

    fn fill(&self, src: &[u8]) {
        let mut off = 0;
        while off < src.len() {
            // SAFETY: writing from a live slice to an fd we own.
            let n = unsafe {
                libc::write(
                    self.pipe_w.as_raw_fd(),
                    src[off..].as_ptr().cast(),
                    src.len() - off,
                )
            };
            assert!(n > 0, "pipe write failed");
            off += n as usize;
        }
    }

    fn splice_out(&self, mut left: usize) {
        while left > 0 {
            // SAFETY: splice between two fds we own; null offsets for pipe and socket.
            let n = unsafe {
                libc::splice(
                    self.pipe_r.as_raw_fd(),
                    std::ptr::null_mut(),
                    self.sock.as_raw_fd(),
                    std::ptr::null_mut(),
                    left,
                    libc::SPLICE_F_MOVE,
                )
            };
            assert!(n > 0, "splice failed: {}", std::io::Error::last_os_error());
            left -= n as usize;
        }
    }

    fn copy_out(&self, mut left: usize, buf: &mut [u8]) {
        while left > 0 {
            let want = left.min(buf.len());
            // SAFETY: reading into a live buffer from an fd we own.
            let n = unsafe { libc::read(self.pipe_r.as_raw_fd(), buf.as_mut_ptr().cast(), want) };
            assert!(n > 0, "pipe read failed");
            let n = n as usize;
            let mut off = 0;
            while off < n {
                // SAFETY: writing from a live buffer to a socket we own.
                let w = unsafe {
                    libc::write(self.sock.as_raw_fd(), buf[off..n].as_ptr().cast(), n - off)
                };
                assert!(w > 0, "socket write failed");
                off += w as usize;
            }
            left -= n;
        }
    }
}

impl Drop for Path {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(d) = self.drain.take() {
            let _ = d.join();
        }
    }
}

fn pipe_to_socket(c: &mut Criterion) {
    let src = vec![0x42u8; PIPE_SIZE];
    let mut g = c.benchmark_group("pipe_to_socket_1MiB");
    g.throughput(Throughput::Bytes(PIPE_SIZE as u64));
    let path = Path::new();
    g.bench_function("splice", |b| {
        b.iter(|| {
            path.fill(&src);
            path.splice_out(PIPE_SIZE);
        })
    });
    let mut buf = vec![0u8; 64 * 1024];
    g.bench_function("copy_64KiB", |b| {
        b.iter(|| {
            path.fill(&src);
            path.copy_out(PIPE_SIZE, &mut buf);
        })
    });
    g.finish();
}

criterion_group!(benches, pipe_to_socket);
criterion_main!(benches);
