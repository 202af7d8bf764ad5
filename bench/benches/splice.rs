//! Splice versus copy on the path that carries every pack: a pipe (git's stdout) to a TCP socket.
//! Self-contained: a loopback TCP connection whose far end a receiver thread drains, and a 1 MiB
//! pipe (the size gitplane sets). One iteration moves 1 MiB:
//!
//! 1. fill the pipe with 1 MiB (`write`; not measured: in the server this is git's work),
//! 2. move it into the socket, either with `splice(2)` (no user-space copy; what the server does)
//!    or with a `read`/`write` loop through a 64 KiB buffer (the baseline),
//! 3. wait until the receiver has read the whole MiB and answered with a 1-byte ack.
//!
//! Steps 2 and 3 are measured, so every byte is counted through to the receiver's `read` and no
//! work of one iteration spills into the next. Four clocks, one group each:
//! - `pipe_to_socket_1MiB`: wall time;
//! - `..._cpu_sender`: CPU time of the sending thread (`CLOCK_THREAD_CPUTIME_ID`);
//! - `..._cpu_receiver`: CPU time of the receiving thread (its `pthread_getcpuclockid` clock);
//! - `..._cpu_process`: CPU time of the whole process (`CLOCK_PROCESS_CPUTIME_ID`: both threads).
//!
//! CPU clocks are the scheduler's user+system time, nanosecond-precise. Kernel work the kernel
//! does outside these threads (softirq time accounted apart, when `CONFIG_IRQ_TIME_ACCOUNTING`
//! is on) is in none of them. With 1 MiB per iteration, a CPU figure is CPU time per MiB, and the
//! throughput criterion prints is bytes per CPU-second.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::time::{Duration, Instant};

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};

const PIPE_SIZE: usize = 1 << 20;
/// Bytes per iteration, acknowledged by the receiver as a whole.
const ROUND: usize = PIPE_SIZE;

struct Path {
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    sock: TcpStream,
    receiver: Option<std::thread::JoinHandle<u64>>,
    receiver_clock: libc::clockid_t,
}

impl Path {
    fn new() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let sock = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        // As the server does for every socket, and so a 1-byte ack is never held back.
        sock.set_nodelay(true).expect("TCP_NODELAY");
        let (mut far, _) = listener.accept().expect("accept");
        far.set_nodelay(true).expect("TCP_NODELAY");
        let receiver = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let (mut total, mut pending) = (0u64, 0usize);
            while let Ok(k) = far.read(&mut buf) {
                if k == 0 {
                    break;
                }
                total += k as u64;
                pending += k;
                while pending >= ROUND {
                    pending -= ROUND;
                    if far.write_all(b"k").is_err() {
                        return total;
                    }
                }
            }
            total
        });
        let mut receiver_clock: libc::clockid_t = 0;
        // SAFETY: the pthread_t is live (the thread runs until the socket closes); the out
        // pointer is a valid clockid_t.
        let rc =
            unsafe { libc::pthread_getcpuclockid(receiver.as_pthread_t(), &mut receiver_clock) };
        assert_eq!(rc, 0, "pthread_getcpuclockid failed");
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
            receiver: Some(receiver),
            receiver_clock,
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

    /// Blocks until the receiver has read one whole round.
    fn wait_ack(&self) {
        let mut ack = [0u8; 1];
        (&self.sock).read_exact(&mut ack).expect("receiver ack");
    }
}

impl Drop for Path {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.receiver.take() {
            let _ = r.join();
        }
    }
}

/// A CPU-time clock as a criterion measurement: values are durations, shown as times. The groups
/// below time themselves with `iter_custom` and the clock of their choice; `start`/`end` (the
/// calling thread's CPU clock) serve only criterion's own timing modes, which they do not use.
struct CpuTime {
    wall: WallTime,
}

impl Measurement for CpuTime {
    type Intermediate = Duration;
    type Value = Duration;
    fn start(&self) -> Duration {
        cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID)
    }
    fn end(&self, start: Duration) -> Duration {
        cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID).saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, v: &Duration) -> f64 {
        v.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        self.wall.formatter()
    }
}

fn cpu_clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({id}) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Both arms, timing steps 2 and 3 of each iteration with `clock`.
fn arms<M: Measurement<Value = Duration>>(
    g: &mut BenchmarkGroup<'_, M>,
    path: &Path,
    clock: &dyn Fn() -> Duration,
) {
    let src = vec![0x42u8; PIPE_SIZE];
    let mut buf = vec![0u8; 64 * 1024];
    g.throughput(Throughput::Bytes(PIPE_SIZE as u64));
    g.bench_function("splice", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                path.fill(&src);
                let t0 = clock();
                path.splice_out(PIPE_SIZE);
                path.wait_ack();
                total += clock().saturating_sub(t0);
            }
            total
        })
    });
    g.bench_function("copy_64KiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                path.fill(&src);
                let t0 = clock();
                path.copy_out(PIPE_SIZE, &mut buf);
                path.wait_ack();
                total += clock().saturating_sub(t0);
            }
            total
        })
    });
}

fn wall(c: &mut Criterion) {
    let path = Path::new();
    let epoch = Instant::now();
    let mut g = c.benchmark_group("pipe_to_socket_1MiB");
    arms(&mut g, &path, &|| epoch.elapsed());
    g.finish();
}

fn cpu(c: &mut Criterion<CpuTime>) {
    let path = Path::new();
    let receiver = path.receiver_clock;
    let clocks: [(&str, &dyn Fn() -> Duration); 3] = [
        ("sender", &|| cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID)),
        ("receiver", &|| cpu_clock(receiver)),
        ("process", &|| cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID)),
    ];
    for (name, clock) in clocks {
        let mut g = c.benchmark_group(format!("pipe_to_socket_1MiB_cpu_{name}"));
        arms(&mut g, &path, clock);
        g.finish();
    }
}

criterion_group!(wall_time, wall);
criterion_group! {
    name = cpu_time;
    config = Criterion::default().with_measurement(CpuTime { wall: WallTime });
    targets = cpu
}
criterion_main!(wall_time, cpu_time);
