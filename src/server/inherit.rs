//! Listening sockets handed down by the previous generation, so an upgrade never closes a port:
//!
//! - by server_starter (`start_server`): `SERVER_STARTER_PORT=host:port=fd;host:port=fd`, one
//!   socket per `--port`; matched to a service by the address it is bound to (getsockname);
//! - by gitplane's own upgrade ([`super::upgrade`]): `GITPLANE_LISTEN_FDS=http=3,4;ssh=5,6`,
//!   every per-core SO_REUSEPORT listener of every service, matched by service name.
//!
//! A shard set needs one listener per core. server_starter hands one socket; each shard then
//! accepts from its own dup of it (one shared accept queue: the kernel gives each connection to
//! one of the shards waiting in accept). New SO_REUSEPORT sockets on the same port are not an
//! option there: a port can only be shared by sockets that *all* set SO_REUSEPORT, and
//! start_server's does not. Our own upgrade passes all the per-core sockets, so the per-core
//! accept queues carry over as they are.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Set by server_starter.
pub const SERVER_STARTER_PORT: &str = "SERVER_STARTER_PORT";
/// Set by a gitplane generation for the next one.
pub const LISTEN_FDS: &str = "GITPLANE_LISTEN_FDS";

#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("{var}: malformed entry `{entry}` (expected {expected})")]
    Malformed {
        var: &'static str,
        entry: String,
        expected: &'static str,
    },
    #[error("{var}: fd {fd} is not a listening TCP socket ({reason})")]
    NotListener {
        var: &'static str,
        fd: RawFd,
        reason: String,
    },
}

fn malformed(var: &'static str, entry: &str, expected: &'static str) -> InheritError {
    InheritError::Malformed {
        var,
        entry: entry.chars().take(100).collect(),
        expected,
    }
}

fn parse_fd(var: &'static str, entry: &str, text: &str) -> Result<RawFd, InheritError> {
    text.trim()
        .parse::<RawFd>()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| malformed(var, entry, "a file descriptor number above 2"))
}

/// `host:port=fd;host:port=fd` (or `port=fd`), as server_starter writes it: the fds, in order.
pub fn parse_server_starter(value: &str) -> Result<Vec<RawFd>, InheritError> {
    value
        .split(';')
        .filter(|e| !e.trim().is_empty())
        .map(|entry| {
            let (_, fd) = entry
                .rsplit_once('=')
                .ok_or_else(|| malformed(SERVER_STARTER_PORT, entry, "ADDRESS=FD"))?;
            parse_fd(SERVER_STARTER_PORT, entry, fd)
        })
        .collect()
}

/// `service=fd,fd;service=fd`: each service's fds, in order.
pub fn parse_listen_fds(value: &str) -> Result<Vec<(String, Vec<RawFd>)>, InheritError> {
    value
        .split(';')
        .filter(|e| !e.trim().is_empty())
        .map(|entry| {
            let (service, fds) = entry
                .split_once('=')
                .filter(|(s, _)| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase()))
                .ok_or_else(|| malformed(LISTEN_FDS, entry, "SERVICE=FD[,FD...]"))?;
            let fds = fds
                .split(',')
                .map(|fd| parse_fd(LISTEN_FDS, entry, fd))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((service.to_owned(), fds))
        })
        .collect()
}

/// Takes ownership of `fd` after checking that it is a listening TCP socket; returns it with
/// its bound address, close-on-exec and non-blocking.
fn adopt(var: &'static str, fd: RawFd) -> Result<(TcpListener, SocketAddr), InheritError> {
    let not = |reason: String| InheritError::NotListener { var, fd, reason };
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int into `accepting`; a bad fd only makes it fail.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(not(io::Error::last_os_error().to_string()));
    }
    if accepting == 0 {
        return Err(not("it is not listening".into()));
    }
    // SAFETY: the fd was handed to this process for it to own, and is checked to be a socket.
    let listener = TcpListener::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let addr = listener.local_addr().map_err(|e| not(e.to_string()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| not(e.to_string()))?;
    // SAFETY: setting FD_CLOEXEC on an fd we own.
    unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok((listener, addr))
}

/// The sockets this process was started with, until front ends take them.
#[derive(Default)]
pub struct Inherited {
    by_service: HashMap<String, Vec<TcpListener>>,
    by_addr: Vec<(SocketAddr, TcpListener)>,
    /// Whether server_starter started us (then a service without a socket is worth a log line).
    under_server_starter: bool,
}

impl Inherited {
    /// Reads both variables. Call once, at start-up, before any thread is spawned.
    pub fn from_env() -> Result<Self, InheritError> {
        let mut inherited = Self::default();
        if let Ok(value) = std::env::var(LISTEN_FDS) {
            for (service, fds) in parse_listen_fds(&value)? {
                let listeners = fds
                    .into_iter()
                    .map(|fd| adopt(LISTEN_FDS, fd).map(|(l, _)| l))
                    .collect::<Result<Vec<_>, _>>()?;
                inherited.by_service.insert(service, listeners);
            }
        } else if let Ok(value) = std::env::var(SERVER_STARTER_PORT) {
            inherited.under_server_starter = true;
            for fd in parse_server_starter(&value)? {
                inherited
                    .by_addr
                    .push(adopt(SERVER_STARTER_PORT, fd).map(|(l, a)| (a, l))?);
            }
        }
        Ok(inherited)
    }

    pub fn under_server_starter(&self) -> bool {
        self.under_server_starter
    }

    /// `cores` listeners for `service` configured at `addr`, if a socket was inherited for it:
    /// as many of the passed-down ones as there are cores, dups where there are fewer.
    pub fn take(
        &mut self,
        service: &str,
        addr: SocketAddr,
        cores: usize,
    ) -> io::Result<Option<Vec<TcpListener>>> {
        let mut sockets = match self.by_service.remove(service) {
            Some(s) if !s.is_empty() => s,
            _ => match self.by_addr.iter().position(|(a, _)| *a == addr) {
                Some(i) => vec![self.by_addr.remove(i).1],
                None => return Ok(None),
            },
        };
        sockets.truncate(cores);
        let have = sockets.len();
        for i in have..cores {
            let dup = sockets[i % have].try_clone()?;
            sockets.push(dup);
        }
        Ok(Some(sockets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_starter_format() {
        assert_eq!(
            parse_server_starter("127.0.0.1:8080=3;127.0.0.1:2222=4").unwrap(),
            vec![3, 4]
        );
        assert_eq!(parse_server_starter("8080=5;").unwrap(), vec![5]);
        assert_eq!(parse_server_starter("[::1]:80=6").unwrap(), vec![6]);
        assert!(parse_server_starter("127.0.0.1:8080").is_err());
        assert!(parse_server_starter("127.0.0.1:8080=x").is_err());
        assert!(parse_server_starter("127.0.0.1:8080=1").is_err(), "stdio");
    }

    #[test]
    fn listen_fds_format() {
        assert_eq!(
            parse_listen_fds("http=3,4;ssh=5").unwrap(),
            vec![("http".to_owned(), vec![3, 4]), ("ssh".to_owned(), vec![5])]
        );
        assert!(parse_listen_fds("http=").is_err());
        assert!(parse_listen_fds("=3").is_err());
        assert!(parse_listen_fds("HTTP=3").is_err());
        assert!(parse_listen_fds("http=3,,4").is_err());
        assert!(parse_listen_fds("http=-1").is_err());
    }

    #[test]
    fn adopts_only_listening_sockets_and_spreads_them_over_cores() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fd = listener.as_raw_fd();
        std::mem::forget(listener);
        let (adopted, bound) = adopt(SERVER_STARTER_PORT, fd).unwrap();
        assert_eq!(bound, addr);
        let mut inherited = Inherited {
            by_addr: vec![(bound, adopted)],
            ..Inherited::default()
        };
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(inherited.take("ssh", other, 2).unwrap().is_none());
        let got = inherited.take("http", addr, 3).unwrap().unwrap();
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|l| l.local_addr().unwrap() == addr));

        let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = plain.as_raw_fd();
        std::mem::forget(plain);
        assert!(matches!(
            adopt(LISTEN_FDS, fd),
            Err(InheritError::NotListener { .. })
        ));
    }
}
