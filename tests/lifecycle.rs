//! Process lifecycle: git children never outlive their client, SIGTERM drains in-flight clones,
//! and the epoll fallback serves the same traffic as io_uring.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn pkt(s: &str) -> String {
    format!("{:04x}{s}", s.len() + 4)
}

/// A protocol v2 fetch of `want` as a raw HTTP request.
fn v2_fetch_request(server: &Server, repo: &str, want: &str) -> Vec<u8> {
    let body = format!(
        "{}0001{}{}0000",
        pkt("command=fetch\n"),
        pkt(&format!("want {want}\n")),
        pkt("done\n")
    );
    let auth = basic_auth("admin", &server.admin_password);
    format!(
        "POST /{repo}.git/git-upload-pack HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
         Content-Type: application/x-git-upload-pack-request\r\nGit-Protocol: version=2\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn git_children(server: &Server) -> Vec<(u32, String)> {
    server
        .descendants()
        .into_iter()
        .filter(|(_, n)| n.starts_with("git"))
        .collect()
}

#[test]
fn client_gone_mid_clone_leaves_no_git_process() {
    let server = Server::start();
    let want = make_big_repo(&server, "admin/big", 40 << 20);
    let mut sock = TcpStream::connect(server.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // A small receive buffer so the server blocks on a full socket instead of finishing.
    socket2::SockRef::from(&sock)
        .set_recv_buffer_size(64 * 1024)
        .unwrap();
    sock.write_all(&v2_fetch_request(&server, "admin/big", &want))
        .unwrap();
    let mut got = vec![0u8; 256 * 1024];
    let mut n = 0;
    while n < got.len() {
        n += sock.read(&mut got[n..]).unwrap();
    }
    assert!(String::from_utf8_lossy(&got[..64]).starts_with("HTTP/1.1 200"));
    assert!(
        wait_for(Duration::from_secs(5), || !git_children(&server).is_empty()),
        "git should still be running while the client stalls"
    );
    // Vanish with a reset, as a killed client does.
    socket2::SockRef::from(&sock)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(sock);
    assert!(
        wait_for(Duration::from_secs(10), || git_children(&server).is_empty()),
        "git processes left behind: {:?}",
        git_children(&server)
    );
    assert!(
        server.descendants().is_empty(),
        "no zombie or other child: {:?}",
        server.descendants()
    );
}

#[test]
fn killed_git_client_mid_clone_leaves_no_git_process() {
    let server = Server::start();
    make_big_repo(&server, "admin/big", 40 << 20);
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("c");
    let mut clone = std::process::Command::new("git");
    clone
        .args([
            "clone",
            "-q",
            "--bare",
            &server.admin_url("admin/big"),
            dest.to_str().unwrap(),
        ])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null");
    std::os::unix::process::CommandExt::process_group(&mut clone, 0);
    let mut child = clone.spawn().unwrap();
    let pgid = child.id() as i32;
    assert!(
        wait_for(Duration::from_secs(10), || !git_children(&server)
            .is_empty()),
        "the clone never reached the server"
    );
    // SAFETY: killing the process group of the git client we started.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = child.wait();
    assert!(
        wait_for(Duration::from_secs(10), || git_children(&server).is_empty()),
        "git processes left behind: {:?}",
        git_children(&server)
    );
}

#[test]
fn sigterm_lets_an_in_flight_clone_finish_then_exits_zero() {
    let mut server = Server::start();
    make_big_repo(&server, "admin/big", 40 << 20);
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("c");
    let url = server.admin_url("admin/big");
    let dest2 = dest.clone();
    let clone = std::thread::spawn(move || {
        git_raw(
            Path::new("/"),
            &["clone", "-q", "--bare", &url, dest2.to_str().unwrap()],
            &[],
        )
    });
    assert!(
        wait_for(Duration::from_secs(10), || !git_children(&server)
            .is_empty()),
        "the clone never reached the server"
    );
    server.signal(libc::SIGTERM);
    let addr = server.addr;
    // New connections are refused once the shards stop accepting.
    assert!(
        wait_for(Duration::from_secs(5), || TcpStream::connect(addr).is_err()),
        "still accepting after SIGTERM"
    );
    let out = clone.join().unwrap();
    assert!(
        out.status.success(),
        "clone cut by shutdown: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    git(&dest, &["fsck", "--strict"]);
    assert_eq!(
        server.wait_exit(Duration::from_secs(20)),
        Some(0),
        "server log:\n{}",
        server.log()
    );
}

/// Reads one HTTP response (Content-Length or chunked) from a keep-alive connection.
fn read_response(sock: &mut TcpStream) -> Vec<u8> {
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse::<usize>().unwrap());
            let complete = match length {
                Some(n) => out.len() >= end + 4 + n,
                None => out.ends_with(b"\r\n0\r\n\r\n"),
            };
            if complete {
                return out;
            }
        }
        let n = sock.read(&mut buf).expect("response cut or stalled");
        assert!(
            n > 0,
            "connection closed mid-response: {:?}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn sigterm_keeps_a_clone_conversation_alive_and_closes_idle_connections() {
    let mut server = Server::start_with(ServerOptions {
        config: Some("[shutdown]\ngrace_secs = 60\nkeepalive_drain_secs = 2\n".into()),
        ..ServerOptions::default()
    });
    let want = make_big_repo(&server, "admin/big", 1 << 20);
    let fetch = v2_fetch_request(&server, "admin/big", &want);
    let auth = String::from_utf8_lossy(&fetch)
        .lines()
        .find(|l| l.starts_with("Authorization:"))
        .unwrap()
        .to_string();
    // The first request of a clone, answered before shutdown.
    let mut clone = TcpStream::connect(server.addr).unwrap();
    write!(
        clone,
        "GET /admin/big.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: x\r\n\
         {auth}\r\nGit-Protocol: version=2\r\n\r\n"
    )
    .unwrap();
    let refs = read_response(&mut clone);
    assert_eq!(status_of(&refs), 200);
    let mut idle = TcpStream::connect(server.addr).unwrap();
    let start = Instant::now();
    server.signal(libc::SIGTERM);
    assert!(
        wait_for(Duration::from_secs(5), || TcpStream::connect(server.addr)
            .is_err()),
        "still accepting after SIGTERM"
    );
    // The clone's next request, on its open connection, is still served in full.
    clone.write_all(&fetch).unwrap();
    let pack = read_response(&mut clone);
    assert_eq!(status_of(&pack), 200);
    assert!(
        pack.windows(9).any(|w| w == b"packfile\n"),
        "no packfile section in the fetch response"
    );
    // A connection that sends nothing is closed after the drain window, not the grace period.
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert_eq!(
        idle.read(&mut [0u8; 16]).unwrap(),
        0,
        "idle connection not closed"
    );
    drop(clone);
    assert_eq!(
        server.wait_exit(Duration::from_secs(20)),
        Some(0),
        "server log:\n{}",
        server.log()
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(30),
        "exit after {took:?}: expected the 2 s drain window, well inside the 60 s grace"
    );
}

#[test]
fn sigterm_cuts_transfers_that_outlive_the_grace_period() {
    let mut server = Server::start_with(ServerOptions {
        config: Some("[shutdown]\ngrace_secs = 1\n".into()),
        ..ServerOptions::default()
    });
    let want = make_big_repo(&server, "admin/big", 40 << 20);
    let mut sock = TcpStream::connect(server.addr).unwrap();
    socket2::SockRef::from(&sock)
        .set_recv_buffer_size(64 * 1024)
        .unwrap();
    sock.write_all(&v2_fetch_request(&server, "admin/big", &want))
        .unwrap();
    let mut head = [0u8; 4096];
    let _ = sock.read(&mut head).unwrap();
    assert!(wait_for(Duration::from_secs(5), || !git_children(&server).is_empty()));
    // The client stalls; shutdown waits the grace period, then cuts it and kills git.
    let start = Instant::now();
    server.signal(libc::SIGTERM);
    let pid = server.pid();
    assert_eq!(
        server.wait_exit(Duration::from_secs(15)),
        Some(0),
        "server log:\n{}",
        server.log()
    );
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "exited before the grace period"
    );
    assert!(descendants_of(pid).is_empty());
}

#[test]
fn epoll_fallback_serves_clone_and_push() {
    let server = Server::start_with(ServerOptions {
        force_epoll: true,
        ..ServerOptions::default()
    });
    server.create_repo("admin/proj", false);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_worktree(&src, 3);
    git(
        &src,
        &["push", "-q", &server.admin_url("admin/proj"), "main"],
    );
    let dest = work.path().join("c");
    git(
        work.path(),
        &[
            "clone",
            "-q",
            &server.admin_url("admin/proj"),
            dest.to_str().unwrap(),
        ],
    );
    git(&dest, &["fsck", "--strict"]);
    assert_eq!(git(&dest, &["rev-list", "--count", "HEAD"]).trim(), "3");
}
