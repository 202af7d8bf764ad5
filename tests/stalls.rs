//! Stalled peers hold nothing (issue #17), over smart HTTP: request bodies that trickle or go
//! silent are cut at the body deadline with 408, hold no pack slot while they stall, leave no git
//! process behind, and anonymous clients cannot take the whole node. Real sockets, real git.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;

/// Short deadlines so the test runs in seconds; the rules are the production ones.
const CONFIG: &str = "\
[http]
body_idle_secs = 3
body_min_bytes_per_sec = 200
[git]
max_concurrent = 4
anonymous_max_concurrent = 3
anonymous_max_per_ip = 3
pack_cache = false
";

/// An upload-pack POST head for `repo` with a body of `len` bytes.
fn upload_pack_head(repo: &str, len: usize) -> String {
    format!(
        "POST /{repo}.git/git-upload-pack HTTP/1.1\r\nHost: t\r\n\
         Content-Type: application/x-git-upload-pack-request\r\nContent-Length: {len}\r\n\r\n"
    )
}

/// `n` valid `want` pkt-lines for `oid`: git keeps reading them, waiting for the flush.
fn wants(oid: &str, n: usize) -> Vec<u8> {
    let line = format!("0032want {oid}\n");
    assert_eq!(line.len(), 0x32);
    line.repeat(n).into_bytes()
}

/// How a stalled request ended: its status and how long after its last byte the server closed.
struct Ended {
    status: u16,
    closed_after: Duration,
}

/// Reads the server's answer until it closes the connection (bounded).
fn read_until_closed(mut s: TcpStream, last_sent: Instant) -> Ended {
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    Ended {
        status: if out.is_empty() { 0 } else { status_of(&out) },
        closed_after: last_sent.elapsed(),
    }
}

/// Sends a head and `first` body bytes, then either goes silent or trickles one byte every
/// 500 ms (2 B/s, under the 200 B/s minimum) until the server closes.
fn slow_body(addr: SocketAddr, head: &str, first: &[u8], trickle: bool, start: &Barrier) -> Ended {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(head.as_bytes()).expect("head");
    s.write_all(first).expect("first bytes");
    start.wait();
    let mut last = Instant::now();
    if trickle {
        let give_up = Instant::now() + Duration::from_secs(30);
        while Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(500));
            if s.write_all(b"0").is_err() {
                break;
            }
            last = Instant::now();
        }
    }
    read_until_closed(s, last)
}

/// A server with [`CONFIG`], the private `admin/private` and the given public repositories, each
/// holding the same 3 commits; returns it, the work dir and the head commit.
fn server_with(public: &[String]) -> (Server, tempfile::TempDir, String) {
    let server = Server::start_with(ServerOptions {
        config: Some(CONFIG.into()),
        ..ServerOptions::default()
    });
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    make_worktree(&src, 3);
    server.create_repo("admin/private", false);
    git(
        &src,
        &["push", "-q", &server.admin_url("admin/private"), "main"],
    );
    for r in public {
        server.create_repo(r, true);
        git(&src, &["push", "-q", &server.admin_url(r), "main"]);
    }
    let oid = git(&src, &["rev-parse", "HEAD"]).trim().to_owned();
    (server, work, oid)
}

fn git_children(server: &Server) -> Vec<(u32, String)> {
    server
        .descendants()
        .into_iter()
        .filter(|(_, name)| name.starts_with("git"))
        .collect()
}

fn timed_clone(server: &Server, dir: &std::path::Path, name: &str) -> Duration {
    let dest = dir.join(format!("clone-{}", rand_suffix()));
    let started = Instant::now();
    git(
        dir,
        &[
            "clone",
            "-q",
            &server.admin_url(name),
            dest.to_str().unwrap(),
        ],
    );
    let took = started.elapsed();
    assert_eq!(rev_count(&dest, "HEAD"), 3);
    took
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

#[test]
fn eighty_slow_anonymous_bodies_hold_no_pack_slot_and_are_cut_at_the_body_deadline() {
    let repos: Vec<String> = (0..5).map(|i| format!("admin/public{i}")).collect();
    let (server, work, oid) = server_with(&repos);

    // 80 anonymous fetch negotiations: a few valid bytes of a 4 KiB body, then half go silent
    // and half trickle.
    let start = Arc::new(Barrier::new(81));
    let attackers: Vec<_> = (0..80)
        .map(|i| {
            let (addr, start) = (server.addr, Arc::clone(&start));
            let head = upload_pack_head(&repos[i % repos.len()], 4096);
            let first = wants(&oid, 1);
            std::thread::spawn(move || slow_body(addr, &head, &first, i % 2 == 1, &start))
        })
        .collect();
    start.wait();
    std::thread::sleep(Duration::from_millis(500));

    // While all 80 stall: they hold no pack slot and no git process, and a real clone by an
    // authenticated user goes through.
    assert_eq!(metric(&server, "gitplane_pack_running"), 0);
    assert!(
        git_children(&server).is_empty(),
        "{:?}",
        git_children(&server)
    );
    let took = timed_clone(&server, work.path(), "admin/private");
    assert!(took < Duration::from_secs(10), "clone took {took:?}");

    let ended: Vec<Ended> = attackers.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, e) in ended.iter().enumerate() {
        assert_eq!(e.status, 408, "attacker {i} got {}", e.status);
        // Cut at the deadline (3 s after the last byte at most), not left open.
        assert!(
            e.closed_after < Duration::from_secs(8),
            "attacker {i} closed {:?} after its last byte",
            e.closed_after
        );
    }
    assert!(
        metric(
            &server,
            "gitplane_stalled_cuts_total{reason=\"http_body_idle\"}"
        ) >= 40
    );
    assert!(
        metric(
            &server,
            "gitplane_stalled_cuts_total{reason=\"http_body_slow\"}"
        ) >= 40
    );
    assert!(git_children(&server).is_empty());
}

#[test]
fn a_large_body_that_stalls_after_git_started_is_cut_and_its_git_killed_and_anonymous_share_holds()
{
    let (server, work, oid) = server_with(&["admin/public".to_owned()]);

    // Bodies larger than the read-ahead (1 MiB): after 1.2 MiB of valid wants, git is running
    // and waiting for more; then the client goes silent. Three fill this address's anonymous
    // share.
    let big = wants(&oid, 24_000);
    let head = upload_pack_head("admin/public", big.len() + 1_000_000);
    let start = Arc::new(Barrier::new(4));
    let stalled: Vec<_> = (0..3)
        .map(|_| {
            let (addr, start, head, big) =
                (server.addr, Arc::clone(&start), head.clone(), big.clone());
            std::thread::spawn(move || slow_body(addr, &head, &big, false, &start))
        })
        .collect();
    start.wait();
    assert!(
        wait_for(Duration::from_secs(10), || git_children(&server).len() >= 3),
        "git did not start for the three large bodies: {:?}",
        git_children(&server)
    );
    assert_eq!(metric(&server, "gitplane_pack_running"), 3);

    // A fourth anonymous one from the same address is refused at once, not queued.
    let mut fourth = TcpStream::connect(server.addr).expect("connect");
    fourth.write_all(head.as_bytes()).expect("head");
    fourth.write_all(&big).expect("body");
    let answer = read_until_closed(fourth, Instant::now());
    assert_eq!(answer.status, 503);
    assert!(
        metric(
            &server,
            "gitplane_stalled_cuts_total{reason=\"anonymous_share\"}"
        ) >= 1
    );

    // The authenticated user still has a slot. (git sends credentials only after a 401, so an
    // authenticated clone of a public repository counts as anonymous unless the client sets
    // http.proactiveAuth: a private repository makes the clone authenticated.)
    let took = timed_clone(&server, work.path(), "admin/private");
    assert!(took < Duration::from_secs(10), "clone took {took:?}");

    for t in stalled {
        let e = t.join().unwrap();
        assert_eq!(e.status, 408);
        assert!(
            e.closed_after < Duration::from_secs(8),
            "{:?}",
            e.closed_after
        );
    }
    assert!(
        wait_for(Duration::from_secs(5), || git_children(&server).is_empty()),
        "git left behind: {:?}",
        git_children(&server)
    );
    assert_eq!(metric(&server, "gitplane_pack_running"), 0);
}

#[test]
fn a_client_that_stops_reading_a_pack_is_cut_at_the_send_deadline() {
    let server = Server::start_with(ServerOptions {
        config: Some("[http]\nsend_idle_secs = 2\n[git]\npack_cache = false\n".into()),
        ..ServerOptions::default()
    });
    // 24 MiB of incompressible content: far more than the socket buffers hold.
    let oid = make_big_repo(&server, "admin/big", 24 << 20);
    let body = {
        let mut b = wants(&oid, 1);
        b.extend_from_slice(b"00000009done\n");
        b
    };
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let auth = basic_auth("admin", &server.admin_password);
    s.write_all(
        format!(
            "POST /admin/big.git/git-upload-pack HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\n\
             Content-Type: application/x-git-upload-pack-request\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .expect("head");
    s.write_all(&body).expect("body");
    // Read the first bytes (the response has started), then stop reading.
    let mut first = [0u8; 4096];
    let n = s.read(&mut first).expect("first bytes");
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    let stopped = Instant::now();
    assert!(
        wait_for(Duration::from_secs(20), || metric(
            &server,
            "gitplane_stalled_cuts_total{reason=\"http_send_idle\"}"
        ) == 1),
        "the stalled response was not cut"
    );
    let cut_after = stopped.elapsed();
    assert!(cut_after >= Duration::from_secs(2), "{cut_after:?}");
    assert!(
        wait_for(Duration::from_secs(5), || git_children(&server).is_empty()),
        "git left behind: {:?}",
        git_children(&server)
    );
    assert_eq!(metric(&server, "gitplane_pack_running"), 0);
}
