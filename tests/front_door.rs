//! The front door (issue #16): the PROXY protocol (v1 and v2) on the HTTP listener, from the
//! balancers in `http.proxy_protocol_from`. Real git pushes through a small TCP balancer that
//! prepends the header; the push event's `remote_addr` (seen by a webhook receiver) is the
//! header's source.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;

/// The balancer's own address: the server trusts PROXY headers from it alone.
const BALANCER_IP: &str = "127.0.0.2";

fn v1_header(client: &str) -> Vec<u8> {
    format!("PROXY TCP4 {client} 127.0.0.1 40000 8080\r\n").into_bytes()
}

fn v2_header(client: [u8; 4]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]); // PROXY, TCP over IPv4, 12 address bytes
    h.extend_from_slice(&client);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&40000u16.to_be_bytes());
    h.extend_from_slice(&8080u16.to_be_bytes());
    h
}

/// Connects to `server` from `from` (a 127.0.0.0/8 address).
fn connect_from(from: &str, server: SocketAddr) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&local.into()).expect("bind the client address");
    socket.connect(&server.into()).expect("connect");
    socket.into()
}

/// A TCP balancer on loopback: each client connection is forwarded to `server` from
/// [`BALANCER_IP`], starting with `header`. Runs until the test ends.
fn balancer(server: SocketAddr, header: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind balancer");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming().take(200) {
            let Ok(mut client) = client else { break };
            let mut upstream = connect_from(BALANCER_IP, server);
            upstream.write_all(&header).expect("header");
            let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut u2);
                let _ = u2.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut upstream, &mut client);
                let _ = client.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

#[test]
fn proxy_protocol_on_http_names_the_client_and_refuses_what_does_not_fit() {
    let server = Server::start_with(ServerOptions {
        config: Some(format!(
            "[http]\nproxy_protocol_from = [\"{BALANCER_IP}/32\"]\n"
        )),
        ..ServerOptions::default()
    });
    let (hook_url, deliveries) = webhook_receiver();
    server.create_repo("admin/proj", false);
    server.admin(
        &["webhook", "add", "admin/proj", &hook_url, "--secret-stdin"],
        Some("s3cret\n"),
    );
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_worktree(&src, 1);

    // Pushes through a v1 balancer, then a v2 one: each event names the header's source.
    let cases = [
        (v1_header("198.51.100.23"), "198.51.100.23"),
        (v2_header([203, 0, 113, 9]), "203.0.113.9"),
    ];
    for (n, (header, client)) in cases.into_iter().enumerate() {
        let front = balancer(server.addr, header);
        let url = format!(
            "http://admin:{}@{front}/admin/proj.git",
            server.admin_password
        );
        std::fs::write(src.join(format!("n{n}")), "x").unwrap();
        git(&src, &["add", "."]);
        git(&src, &["commit", "-q", "-m", "through the balancer"]);
        git(&src, &["push", "-q", &url, "main"]);
        assert!(
            wait_for(Duration::from_secs(30), || deliveries.lock().unwrap().len()
                > n),
            "no webhook delivery:\n{}",
            server.log()
        );
        assert_eq!(deliveries.lock().unwrap()[n]["remote_addr"], client);
    }

    // A clone straight from an address that is not a balancer works as before.
    let dest = work.path().join("direct");
    git(
        work.path(),
        &[
            "clone",
            "-q",
            &server.admin_url("admin/proj"),
            dest.to_str().unwrap(),
        ],
    );

    // The balancer's address without a header: refused.
    let mut s = connect_from(BALANCER_IP, server.addr);
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert_eq!(
        status_of(&answer),
        400,
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // A header from an address that is not a balancer: refused, never believed.
    let mut raw = v1_header("198.51.100.99");
    raw.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    let answer = raw_request(server.addr, &raw, Duration::from_secs(15));
    assert_eq!(
        status_of(&answer),
        400,
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let mut raw = v2_header([198, 51, 100, 99]);
    raw.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    let answer = raw_request(server.addr, &raw, Duration::from_secs(15));
    assert!(
        answer.is_empty() || status_of(&answer) == 400,
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // The balancer's health check (v2 LOCAL) is served, as the balancer itself.
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    local.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let mut s = connect_from(BALANCER_IP, server.addr);
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(&local).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert_eq!(
        status_of(&answer),
        200,
        "{}",
        String::from_utf8_lossy(&answer)
    );
}
