//! SSH over WebSocket (#16): the real OpenSSH client with
//! `ProxyCommand=gitplane ssh-proxy ws://HOST:PORT/ssh` against a real server, and raw sockets
//! for what a well-behaved client never sends.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    git, git_env, git_raw, make_worktree, require_tool, ssh_keygen, ssh_known_hosts, Server,
    ServerOptions, BIN,
};

fn ssh_command(server: &Server, key: &Path, known_hosts: &Path) -> String {
    ssh_command_via(key, known_hosts, &format!("ws://{}/ssh", server.addr))
}

/// OpenSSH with only our options, its bytes carried by `gitplane ssh-proxy PROXY_ARGS`.
fn ssh_command_via(key: &Path, known_hosts: &Path, proxy_args: &str) -> String {
    format!(
        "ssh -F /dev/null -i {} -o IdentitiesOnly=yes -o IdentityAgent=none -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=10 -o ProxyCommand='{BIN} ssh-proxy {proxy_args}'",
        key.display(),
        known_hosts.display(),
    )
}

/// Pushes a `commits`-commit history to admin/proj with `ssh`, clones it back into `work/c`,
/// and checks the clone's HEAD is the pushed one; returns the clone's directory.
fn push_then_clone(server: &Server, work: &Path, ssh: &str, commits: usize) -> PathBuf {
    let env = [("GIT_SSH_COMMAND", ssh)];
    let src = work.join("src");
    make_worktree(&src, commits);
    git_env(
        &src,
        &["push", "-q", &url(server, "admin/proj"), "main"],
        &env,
    );
    git_env(
        work,
        &["clone", "-q", &url(server, "admin/proj"), "c"],
        &env,
    );
    let clone = work.join("c");
    assert_eq!(
        git(&clone, &["rev-parse", "HEAD"]),
        git(&src, &["rev-parse", "HEAD"])
    );
    clone
}

/// An SSH key for admin (registered) and a known_hosts file for the server, both in `dir`, and
/// the private repository admin/proj.
fn admin_key_and_repo(server: &Server, dir: &Path) -> (PathBuf, PathBuf) {
    let known_hosts = ssh_known_hosts(server, dir);
    let key = ssh_keygen(dir, "admin_key");
    server.admin(
        &["key", "add", "admin", &format!("{}.pub", key.display())],
        None,
    );
    server.create_repo("admin/proj", false);
    (key, known_hosts)
}

/// The repository URL: the SSH port only names the host key; the bytes go over the WebSocket.
fn url(server: &Server, repo: &str) -> String {
    format!(
        "ssh://git@127.0.0.1:{}/{repo}.git",
        server.listening["ssh"].port()
    )
}

#[test]
fn clone_and_push_through_the_websocket_and_unknown_keys_are_refused() {
    require_tool("ssh");
    let server = Server::start();
    let work = tempfile::tempdir().unwrap();
    let (key, known_hosts) = admin_key_and_repo(&server, work.path());
    let ssh = ssh_command(&server, &key, &known_hosts);
    let clone = push_then_clone(&server, work.path(), &ssh, 5);
    git(&clone, &["fsck", "--full"]);

    let stranger = ssh_keygen(work.path(), "stranger");
    let ssh = ssh_command(&server, &stranger, &known_hosts);
    let out = git_raw(
        work.path(),
        &["clone", "-q", &url(&server, "admin/proj"), "s"],
        &[("GIT_SSH_COMMAND", ssh.as_str())],
    );
    assert!(!out.status.success(), "an unknown key cloned");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
}

/// Opens the WebSocket by hand; the stream after the server's 101.
fn upgraded(server: &Server) -> TcpStream {
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"GET /ssh HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed during the handshake");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // RFC 6455's own example key and answer.
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{head}"
    );
    s
}

/// Reads frames until a close frame; its status code.
fn close_code(s: &mut TcpStream) -> u16 {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let mut i = 0;
    while i + 2 <= all.len() {
        let opcode = all[i] & 0x0f;
        let len = (all[i + 1] & 0x7f) as usize;
        let (len, start) = match len {
            126 => (u16::from_be_bytes([all[i + 2], all[i + 3]]) as usize, i + 4),
            127 => panic!("a server frame of 64-bit length"),
            n => (n, i + 2),
        };
        if opcode == 0x8 {
            assert!(len >= 2, "close frame without a code");
            return u16::from_be_bytes([all[start], all[start + 1]]);
        }
        i = start + len;
    }
    panic!("no close frame in {} bytes", all.len());
}

#[test]
fn malformed_and_oversized_frames_are_closed_with_their_codes() {
    let server = Server::start();
    // Reserved bits set: a protocol error, 1002.
    let mut s = upgraded(&server);
    s.write_all(&[0xf2, 0x81, 1, 2, 3, 4, 0x55]).unwrap();
    assert_eq!(close_code(&mut s), 1002);
    // A client frame without a mask: also 1002.
    let mut s = upgraded(&server);
    s.write_all(&[0x82, 0x01, 0x55]).unwrap();
    assert_eq!(close_code(&mut s), 1002);
    // A frame announcing 2 GiB: refused by its header, 1009.
    let mut s = upgraded(&server);
    let mut frame = vec![0x82, 0xff];
    frame.extend_from_slice(&(2u64 << 30).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    s.write_all(&frame).unwrap();
    assert_eq!(close_code(&mut s), 1009);
    // Text is not SSH: 1003.
    let mut s = upgraded(&server);
    s.write_all(&[0x81, 0x82, 0, 0, 0, 0, b'h', b'i']).unwrap();
    assert_eq!(close_code(&mut s), 1003);
    // A request for /ssh without the upgrade: 426, not a hang.
    let raw = common::raw_request(
        server.addr,
        b"GET /ssh HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(common::status_of(&raw), 426);
}

#[test]
fn a_stalled_websocket_is_cut_at_the_pre_auth_deadline() {
    let server = Server::start_with(ServerOptions {
        config: Some("[ssh]\nhandshake_timeout_secs = 2\n".into()),
        ..ServerOptions::default()
    });
    let mut s = upgraded(&server);
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let started = Instant::now();
    // The client sends nothing after the upgrade (not even its SSH version line).
    let mut buf = [0u8; 4096];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("not cut within 15 s ({e}); read {total} bytes"),
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "cut after {took:?}, expected about the 2 s deadline"
    );
}

#[test]
fn extra_headers_reach_the_server() {
    // A stand-in for an identity-aware proxy: records the request head, then refuses.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && c.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        let _ = c.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
        String::from_utf8_lossy(&head).into_owned()
    });
    let out = Command::new(BIN)
        .args(["ssh-proxy", &format!("ws://{addr}/ssh")])
        .args([
            "--header",
            "Authorization: Bearer t0ken",
            "--header",
            "X-Team: git",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let head = server.join().unwrap();
    assert!(head.starts_with("GET /ssh HTTP/1.1"), "{head}");
    assert!(
        head.contains("authorization: Bearer t0ken")
            || head.contains("Authorization: Bearer t0ken"),
        "{head}"
    );
    assert!(head.to_ascii_lowercase().contains("x-team: git"), "{head}");
    assert!(
        !out.status.success(),
        "a refused upgrade must fail the proxy"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TLS-terminating balancer in front of the HTTP port, as `wss://` meets in production: Python's
/// `ssl` (OpenSSL) accepts TLS and forwards the plaintext to `backend`, both ways.
const TLS_BALANCER: &str = r#"
import socket, ssl, sys, threading
cert, key, backend = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(16)
print(listener.getsockname()[1], flush=True)
def pipe(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
def serve(raw):
    try:
        tls = ctx.wrap_socket(raw, server_side=True)
    except (ssl.SSLError, OSError):
        raw.close()
        return
    up = socket.create_connection(("127.0.0.1", backend))
    threading.Thread(target=pipe, args=(tls, up), daemon=True).start()
    pipe(up, tls)
for _ in range(32):
    raw, _ = listener.accept()
    threading.Thread(target=serve, args=(raw,), daemon=True).start()
"#;

#[test]
fn clone_over_wss_through_a_tls_terminating_balancer() {
    require_tool("ssh");
    require_tool("python3");
    let server = Server::start();
    let work = tempfile::tempdir().unwrap();
    common::test_certificates(work.path());
    let mut balancer = Command::new("python3")
        .arg("-c")
        .arg(TLS_BALANCER)
        .arg(work.path().join("server.crt"))
        .arg(work.path().join("server.key"))
        .arg(server.addr.port().to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut port = String::new();
    {
        let out = balancer.stdout.as_mut().unwrap();
        let mut byte = [0u8; 1];
        while out.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            port.push(byte[0] as char);
        }
    }
    let port: u16 = port.trim().parse().expect("the balancer's port");

    let (key, known_hosts) = admin_key_and_repo(&server, work.path());
    let ssh_via = |extra: &str| {
        ssh_command_via(
            &key,
            &known_hosts,
            &format!("{extra} wss://127.0.0.1:{port}/ssh"),
        )
    };
    let trusted = ssh_via(&format!(
        "--ca-file {}",
        work.path().join("ca.crt").display()
    ));
    push_then_clone(&server, work.path(), &trusted, 3);

    // Without the CA the balancer's certificate is not trusted: the proxy refuses to go on.
    let untrusted = ssh_via("");
    let out = git_raw(
        work.path(),
        &["clone", "-q", &url(&server, "admin/proj"), "u"],
        &[("GIT_SSH_COMMAND", untrusted.as_str())],
    );
    assert!(
        !out.status.success(),
        "cloned through an untrusted certificate"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );
    let _ = balancer.kill();
    let _ = balancer.wait();
}
