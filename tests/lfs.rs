//! Git LFS end to end: the real `git-lfs` client against a real server, plus raw requests for
//! the refusals a well-behaved client never makes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn basic(user: &str, pw: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

/// A working copy whose credentials for the server come from a store file, as a user's would.
fn lfs_worktree(server: &Server, dir: &Path, user: &str, pw: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let creds = dir.with_extension("credentials");
    std::fs::write(&creds, format!("http://{user}:{pw}@{}\n", server.addr)).unwrap();
    git(dir, &["init", "-q", "-b", "main"]);
    git(
        dir,
        &[
            "config",
            "credential.helper",
            &format!("store --file={}", creds.display()),
        ],
    );
    git(dir, &["config", "user.name", user]);
    git(
        dir,
        &["config", "user.email", &format!("{user}@example.com")],
    );
    git(dir, &["lfs", "install", "--local"]);
}

fn lfs_env() -> [(&'static str, &'static str); 1] {
    [("GIT_LFS_SKIP_SMUDGE", "0")]
}

/// A raw request with a body; returns the whole response.
fn request(server: &Server, head: &str, body: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The server may answer (and stop reading) before the body is sent: a write error is fine,
    // the response is what the test checks.
    let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(body));
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// A basic-transfer PUT of `body` as object `oid` of `repo`; returns the whole response.
fn put_object(server: &Server, repo: &str, oid: &str, auth: &str, body: &[u8]) -> Vec<u8> {
    request(
        server,
        &format!(
            "PUT /{repo}.git/info/lfs/objects/{oid} HTTP/1.1\r\nHost: x\r\n\
             Authorization: {auth}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ),
        body,
    )
}

fn body_of(raw: &[u8]) -> &[u8] {
    let at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("head end");
    &raw[at + 4..]
}

#[test]
fn push_and_clone_large_objects_through_git_lfs() {
    require_tool("git-lfs");
    let server = Server::start();
    server.add_user("alice", "a-pass");
    server.create_repo("admin/media", false);
    server.admin(&["repo", "grant", "admin/media", "alice", "write"], None);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    lfs_worktree(&server, &src, "alice", "a-pass");
    git(&src, &["lfs", "track", "*.bin"]);
    let sizes = [50usize << 20, 100 << 20, 200 << 20];
    let mut expected = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let data = random_bytes(*size, i as u64 + 1);
        expected.push((format!("f{i}.bin"), sha256_hex(&data)));
        std::fs::write(src.join(format!("f{i}.bin")), data).unwrap();
    }
    git(&src, &["add", "."]);
    git(&src, &["commit", "-q", "-m", "binaries"]);
    let url = server.url("admin/media", None);
    git(&src, &["remote", "add", "origin", &url]);
    git_env(&src, &["push", "-q", "origin", "main"], &lfs_env());

    // The objects are on the server, verified, under their SHA-256.
    for (_, oid) in &expected {
        let path = server.lfs_object_path(oid);
        assert!(path.exists(), "{oid} missing on the server");
    }
    // A fresh clone gets the real contents back.
    let dest = work.path().join("dest");
    lfs_worktree(&server, &dest, "alice", "a-pass");
    git(&dest, &["remote", "add", "origin", &url]);
    git_env(&dest, &["pull", "-q", "origin", "main"], &lfs_env());
    for (name, oid) in &expected {
        let got = std::fs::read(dest.join(name)).unwrap();
        assert_eq!(&sha256_hex(&got), oid, "{name} differs after clone");
    }
    // The server's metrics saw the bytes.
    let raw = raw_request(
        server.addr,
        b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    let text = String::from_utf8_lossy(&raw);
    let total: u64 = sizes.iter().map(|s| *s as u64).sum();
    let bytes_in: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("gitplane_lfs_bytes_in_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(bytes_in >= total, "bytes in {bytes_in} < {total}");
}

#[test]
fn locks_from_the_client_with_a_conflict_between_users() {
    require_tool("git-lfs");
    let server = Server::start();
    server.add_user("alice", "a-pass");
    server.add_user("bob", "b-pass");
    server.create_repo("admin/art", false);
    server.admin(&["repo", "grant", "admin/art", "alice", "write"], None);
    server.admin(&["repo", "grant", "admin/art", "bob", "write"], None);
    let work = tempfile::tempdir().unwrap();
    let url = server.url("admin/art", None);
    let a = work.path().join("a");
    lfs_worktree(&server, &a, "alice", "a-pass");
    git(&a, &["lfs", "track", "--lockable", "*.psd"]);
    std::fs::write(a.join("cover.psd"), b"layers").unwrap();
    git(&a, &["add", "."]);
    git(&a, &["commit", "-q", "-m", "art"]);
    git(&a, &["remote", "add", "origin", &url]);
    git(&a, &["push", "-q", "origin", "main"]);

    let b = work.path().join("b");
    lfs_worktree(&server, &b, "bob", "b-pass");
    git(&b, &["remote", "add", "origin", &url]);
    git(&b, &["pull", "-q", "origin", "main"]);

    let out = git(&a, &["lfs", "lock", "cover.psd"]);
    assert!(out.contains("Locked cover.psd"), "{out}");
    let listed = git(&b, &["lfs", "locks"]);
    assert!(
        listed.contains("cover.psd") && listed.contains("alice"),
        "{listed}"
    );
    let json = git(&b, &["lfs", "locks", "--json", "--path", "cover.psd"]);
    assert!(json.contains("\"owner\":{\"name\":\"alice\"}"), "{json}");

    // Bob cannot take or break Alice's lock.
    let out = git_raw(&b, &["lfs", "lock", "cover.psd"], &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already locked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = git_raw(&b, &["lfs", "unlock", "--force", "cover.psd"], &[]);
    assert!(!out.status.success(), "a writer may not force-unlock");
    // Verify: alice sees it as hers.
    let verify = git(&a, &["lfs", "locks", "--verify"]);
    assert!(verify.contains("O cover.psd"), "{verify}");
    // Alice unlocks; now Bob can lock.
    git(&a, &["lfs", "unlock", "cover.psd"]);
    git(&b, &["lfs", "lock", "cover.psd"]);
    // The admin (owner of the repository) may break Bob's lock.
    let c = work.path().join("c");
    lfs_worktree(&server, &c, "admin", &server.admin_password);
    git(&c, &["remote", "add", "origin", &url]);
    git(&c, &["pull", "-q", "origin", "main"]);
    git(&c, &["lfs", "unlock", "--force", "cover.psd"]);
    assert!(!git(&b, &["lfs", "locks"]).contains("cover.psd"));
}

#[test]
fn uploads_are_verified_and_objects_scoped_per_repository() {
    let server = Server::start();
    server.create_repo("admin/one", false);
    server.create_repo("admin/two", false);
    let auth = basic("admin", &server.admin_password);
    let data = random_bytes(300_000, 9);
    let oid = sha256_hex(&data);
    let put = |repo: &str, oid: &str, body: &[u8], declared: usize| {
        let head = format!(
            "PUT /{repo}.git/info/lfs/objects/{oid} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n"
        );
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        // A short body: tell the server nothing more is coming.
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    };
    let object_path = server.lfs_object_path(&oid);
    // Wrong content for the id: 422, nothing visible.
    let mut wrong = data.clone();
    wrong[1000] ^= 1;
    let raw = put("admin/one", &oid, &wrong, wrong.len());
    assert_eq!(status_of(&raw), 422, "{}", String::from_utf8_lossy(&raw));
    assert!(!object_path.exists());
    // Short body: refused, nothing visible.
    let raw = put("admin/one", &oid, &data[..1000], data.len());
    assert_eq!(status_of(&raw), 400, "{}", String::from_utf8_lossy(&raw));
    assert!(!object_path.exists());
    assert_eq!(
        std::fs::read_dir(server.data_dir().join("lfs/tmp"))
            .unwrap()
            .count(),
        0,
        "staging files left behind"
    );
    // The right content: stored.
    let raw = put("admin/one", &oid, &data, data.len());
    assert_eq!(status_of(&raw), 200, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(std::fs::read(&object_path).unwrap(), data);

    let get = |repo: &str, range: Option<&str>| {
        let range = range.map(|r| format!("Range: {r}\r\n")).unwrap_or_default();
        request(
            &server,
            &format!("GET /{repo}.git/info/lfs/objects/{oid} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n{range}Connection: close\r\n\r\n"),
            b"",
        )
    };
    let raw = get("admin/one", None);
    assert_eq!(status_of(&raw), 200);
    assert_eq!(body_of(&raw), &data[..]);
    // Repository two never uploaded it: not downloadable there, and batch says 404.
    assert_eq!(status_of(&get("admin/two", None)), 404);
    let batch = format!(
        r#"{{"operation":"download","objects":[{{"oid":"{oid}","size":{}}}]}}"#,
        data.len()
    );
    let raw = request(
        &server,
        &format!(
            "POST /admin/two.git/info/lfs/objects/batch HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
             Content-Type: application/vnd.git-lfs+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            batch.len()
        ),
        batch.as_bytes(),
    );
    assert_eq!(status_of(&raw), 200);
    let json: serde_json::Value = serde_json::from_slice(body_of(&raw)).unwrap();
    assert_eq!(json["objects"][0]["error"]["code"], 404, "{json}");
    // Range downloads (git-lfs resumes with them).
    let raw = get("admin/one", Some("bytes=1000-1999"));
    assert_eq!(status_of(&raw), 206);
    assert!(String::from_utf8_lossy(&raw)
        .contains(&format!("Content-Range: bytes 1000-1999/{}", data.len())));
    assert_eq!(body_of(&raw), &data[1000..2000]);
    let raw = get("admin/one", Some("bytes=-10"));
    assert_eq!(body_of(&raw), &data[data.len() - 10..]);
    assert_eq!(
        status_of(&get("admin/one", Some(&format!("bytes={}-", data.len())))),
        416
    );
}

/// More concurrent uploads than pool buffers on one shard: the extra uploads wait for a buffer
/// (backpressure, no allocation), and every one finishes and stores exactly what was sent.
#[test]
fn more_concurrent_uploads_than_pool_buffers_all_complete() {
    let server = Server::start_with(ServerOptions {
        shards: 1,
        config: Some("[lfs]\nbuffer_kib = 64\nbuffers_per_shard = 3\n".into()),
        ..ServerOptions::default()
    });
    server.create_repo("admin/tight", false);
    let auth = basic("admin", &server.admin_password);
    let objects: Vec<Vec<u8>> = (0..6).map(|i| random_bytes(3 << 20, 100 + i)).collect();
    std::thread::scope(|scope| {
        for data in &objects {
            let (server, auth) = (&server, &auth);
            scope.spawn(move || {
                let oid = sha256_hex(data);
                let raw = put_object(server, "admin/tight", &oid, auth, data);
                assert_eq!(status_of(&raw), 200, "{}", String::from_utf8_lossy(&raw));
            });
        }
    });
    for data in &objects {
        let oid = sha256_hex(data);
        assert!(
            std::fs::read(server.lfs_object_path(&oid)).unwrap() == *data,
            "{oid} differs"
        );
    }
    let metrics = String::from_utf8_lossy(&raw_request(
        server.addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    ))
    .into_owned();
    let bytes_in: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gitplane_lfs_bytes_in_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("gitplane_lfs_bytes_in_total in /metrics");
    assert_eq!(bytes_in, 6 * (3 << 20));
}

/// Sizes on both sides of the O_DIRECT boundaries, for 64 KiB pool buffers: empty, less than
/// one 4 KiB block, one block, one buffer, whole buffers, whole blocks past them, one byte more,
/// and several MiB ending in a partial block.
const EDGE_SIZES: [usize; 8] = [
    0,
    1000,
    4096,
    65_536,
    196_608,
    200_704,
    200_705,
    (5 << 20) + 123,
];
const EDGE_CONFIG: &str = "[lfs]\nbuffer_kib = 64\n";
const DIRECT_REFUSED_LOG: &str = "refuses O_DIRECT; uploads use buffered writes";

/// PUTs one object of each of [`EDGE_SIZES`] to `admin/sizes`; returns the objects.
fn upload_edge_sizes(server: &Server) -> Vec<Vec<u8>> {
    server.create_repo("admin/sizes", false);
    let auth = basic("admin", &server.admin_password);
    let objects: Vec<Vec<u8>> = EDGE_SIZES
        .iter()
        .zip(1..)
        .map(|(size, seed)| random_bytes(*size, 500 + seed))
        .collect();
    for data in &objects {
        let oid = sha256_hex(data);
        let raw = put_object(server, "admin/sizes", &oid, &auth, data);
        assert_eq!(
            status_of(&raw),
            200,
            "{} bytes: {}",
            data.len(),
            String::from_utf8_lossy(&raw)
        );
    }
    objects
}

/// Checks that each object downloads byte-exact from `admin/sizes`.
fn download_edge_sizes(server: &Server, objects: &[Vec<u8>]) {
    let auth = basic("admin", &server.admin_password);
    for data in objects {
        let oid = sha256_hex(data);
        let raw = request(
            server,
            &format!(
                "GET /admin/sizes.git/info/lfs/objects/{oid} HTTP/1.1\r\nHost: x\r\n\
                 Authorization: {auth}\r\nConnection: close\r\n\r\n"
            ),
            b"",
        );
        assert_eq!(status_of(&raw), 200, "{} bytes", data.len());
        assert!(body_of(&raw) == &data[..], "{} bytes differ", data.len());
    }
}

fn accepts_o_direct(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join("o_direct-probe");
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

fn on_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: statfs fills the zeroed struct for a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
    st.f_type == libc::TMPFS_MAGIC
}

/// How many of `path`'s pages are in the page cache (mincore on a read-only mapping, which
/// reads nothing).
fn cached_pages(path: &Path) -> usize {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = usize::try_from(file.metadata().unwrap().len()).unwrap();
    if len == 0 {
        return 0;
    }
    // SAFETY: a private read-only mapping of an open file, queried and unmapped here.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        let page = usize::try_from(libc::sysconf(libc::_SC_PAGESIZE)).unwrap();
        let mut resident = vec![0u8; len.div_ceil(page)];
        assert_eq!(libc::mincore(map, len, resident.as_mut_ptr()), 0);
        libc::munmap(map, len);
        resident.iter().filter(|r| **r & 1 == 1).count()
    }
}

/// Where the filesystem takes O_DIRECT, uploads of every alignment go to disk without the page
/// cache (at most the last partial block is written through it) and are stored byte-exact, on
/// io_uring and on the epoll fallback.
#[test]
fn direct_uploads_of_every_alignment_are_stored_byte_exact() {
    for force_epoll in [false, true] {
        let server = Server::start_with(ServerOptions {
            config: Some(EDGE_CONFIG.into()),
            force_epoll,
            ..ServerOptions::default()
        });
        let staging = server.data_dir().join("lfs/tmp");
        let direct = accepts_o_direct(&staging);
        // Check the cache before anything reads the objects back.
        let cache_bypassed = direct && !on_tmpfs(&staging);
        let objects = upload_edge_sizes(&server);
        for data in &objects {
            let oid = sha256_hex(data);
            let path = server.lfs_object_path(&oid);
            if cache_bypassed {
                let cached = cached_pages(&path);
                assert!(
                    cached <= 1,
                    "{} bytes: {cached} pages went through the page cache",
                    data.len()
                );
            }
            assert!(std::fs::read(&path).unwrap() == *data, "{oid} differs");
        }
        download_edge_sizes(&server, &objects);
        assert_eq!(
            server.log().contains(DIRECT_REFUSED_LOG),
            !direct,
            "epoll: {force_epoll}; log: {}",
            server.log()
        );
    }
}

/// On a filesystem that refuses O_DIRECT (ramfs), uploads fall back to buffered writes and are
/// stored byte-exact all the same.
#[test]
fn uploads_fall_back_to_buffered_writes_where_o_direct_is_refused() {
    let server = Server::start_with(ServerOptions {
        config: Some(EDGE_CONFIG.into()),
        lfs_on_ramfs: true,
        ..ServerOptions::default()
    });
    let objects = upload_edge_sizes(&server);
    download_edge_sizes(&server, &objects);
    assert!(
        server.log().contains(DIRECT_REFUSED_LOG),
        "{}",
        server.log()
    );
}

#[test]
fn batch_api_refuses_bad_requests_cleanly() {
    let server = Server::start();
    server.create_repo("admin/r", true);
    let auth = basic("admin", &server.admin_password);
    let post = |body: &str, auth: Option<&str>| {
        let auth = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        request(
            &server,
            &format!(
                "POST /admin/r.git/info/lfs/objects/batch HTTP/1.1\r\nHost: x\r\n{auth}\
                 Content-Type: application/vnd.git-lfs+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            ),
            body.as_bytes(),
        )
    };
    assert_eq!(status_of(&post("{not json", Some(&auth))), 422);
    assert_eq!(
        status_of(&post(
            r#"{"operation":"download","objects":[],"hash_algo":"md5"}"#,
            Some(&auth)
        )),
        409
    );
    // Anonymous upload to a public repo: 401 with the LFS challenge; anonymous download is fine.
    let raw = post(r#"{"operation":"upload","objects":[]}"#, None);
    assert_eq!(status_of(&raw), 401);
    assert!(String::from_utf8_lossy(&raw).contains("LFS-Authenticate"));
    assert_eq!(
        status_of(&post(r#"{"operation":"download","objects":[]}"#, None)),
        200
    );
    // Per-object validation errors.
    let raw = post(
        r#"{"operation":"upload","objects":[{"oid":"../../etc/passwd","size":1},{"oid":"aa","size":-1}]}"#,
        Some(&auth),
    );
    assert_eq!(status_of(&raw), 200);
    let json: serde_json::Value = serde_json::from_slice(body_of(&raw)).unwrap();
    assert_eq!(json["objects"][0]["error"]["code"], 422);
    assert_eq!(json["objects"][1]["error"]["code"], 422);
    // An oversized body is refused before it is read.
    let big = "x".repeat(2 << 20);
    assert_eq!(status_of(&post(&big, Some(&auth))), 413);
}

#[test]
fn s3_backend_multipart_uploads_verified_objects() {
    require_tool("git-lfs");
    let s3 = S3Server::start();
    let server = Server::start_with(ServerOptions {
        config: Some(s3.bucket_config("lfs-bucket")),
        ..ServerOptions::default()
    });
    server.create_repo("admin/media", false);
    let auth = basic("admin", &server.admin_password);

    // 12 MiB: three parts of at most 5 MiB.
    let data = random_bytes(12 << 20, 5);
    let oid = sha256_hex(&data);
    let key = S3Server::object_key("lfs-bucket", &oid);
    let put = |body: &[u8]| put_object(&server, "admin/media", &oid, &auth, body);
    // Wrong content: refused, and the aborted multipart upload leaves nothing in the bucket.
    let mut wrong = data.clone();
    wrong[7 << 20] ^= 0xff;
    assert_eq!(status_of(&put(&wrong)), 422);
    assert_eq!(
        status_of(&s3.call(&format!("GET {key}"))),
        404,
        "a refused upload must not be visible"
    );
    assert!(!s3.open_uploads("lfs-bucket"), "multipart upload left open");
    // Right content: completed from its parts, readable from S3 and through gitplane with Range.
    assert_eq!(status_of(&put(&data)), 200);
    let stored = s3.call(&format!("GET {key}"));
    assert_eq!(status_of(&stored), 200);
    assert_eq!(body_of(&stored).len(), data.len());
    assert_eq!(sha256_hex(body_of(&stored)), oid);
    let raw = request(
        &server,
        &format!("GET /admin/media.git/info/lfs/objects/{oid} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nRange: bytes=5242870-5242889\r\nConnection: close\r\n\r\n"),
        b"",
    );
    assert_eq!(status_of(&raw), 206);
    assert_eq!(body_of(&raw), &data[5_242_870..5_242_890]);

    // And the real client end to end through S3.
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    lfs_worktree(&server, &src, "admin", &server.admin_password);
    git(&src, &["lfs", "track", "*.bin"]);
    let blob = random_bytes(6 << 20, 77);
    std::fs::write(src.join("x.bin"), &blob).unwrap();
    git(&src, &["add", "."]);
    git(&src, &["commit", "-q", "-m", "x"]);
    let url = server.url("admin/media", None);
    git(&src, &["remote", "add", "origin", &url]);
    git(&src, &["push", "-q", "origin", "main"]);
    let dest = work.path().join("dest");
    lfs_worktree(&server, &dest, "admin", &server.admin_password);
    git(&dest, &["remote", "add", "origin", &url]);
    git(&dest, &["pull", "-q", "origin", "main"]);
    assert_eq!(std::fs::read(dest.join("x.bin")).unwrap(), blob);
}

// --- Stalled downloads hold nothing (issue #17) ------------------------------------------------

/// Short send deadline so the test runs in seconds; a small pool, so stalled transfers that held
/// buffers would starve everyone else at once. The anonymous share admits 80 clients spread
/// over 20 addresses (4 each), so the attack below is stopped by the buffer logic, not the share.
const STALL_CONFIG: &str = "\
[http]
send_idle_secs = 12
send_min_bytes_per_sec = 256
[lfs]
buffers_per_shard = 8
anonymous_transfers = 100
anonymous_transfers_per_ip = 4
";
const STALLED: usize = 80;
const CUT_SEND_IDLE: &str = "gitplane_stalled_cuts_total{reason=\"http_send_idle\"}";
const POOL_IN_USE: &str = "gitplane_lfs_pool_buffers_in_use";
const ACTIVE: &str = "gitplane_lfs_active_transfers";

/// A download of `oid` from `source` whose client reads the status line and then nothing more.
/// Its receive buffer is small, so the server's socket fills after a few hundred KiB.
fn stalled_download(
    server: &Server,
    source: std::net::Ipv4Addr,
    repo: &str,
    oid: &str,
    auth: Option<&str>,
) -> (u16, Vec<u8>, TcpStream) {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(8 * 1024).expect("SO_RCVBUF");
    sock.bind(&std::net::SocketAddr::new(source.into(), 0).into())
        .expect("bind source address");
    sock.connect(&server.addr.into()).expect("connect");
    let mut s: TcpStream = sock.into();
    let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    s.write_all(
        format!("GET /{repo}.git/info/lfs/objects/{oid} HTTP/1.1\r\nHost: x\r\n{auth}\r\n")
            .as_bytes(),
    )
    .expect("request");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // Enough for the head of any answer (a refusal's whole body too).
    let mut head = vec![0u8; 512];
    let n = s.read(&mut head).expect("response head");
    head.truncate(n);
    (status_of(&head), head, s)
}

/// A public repository holding one 50 MiB object, pushed by `alice` with the real client;
/// returns the pushing work tree and the object id.
fn public_repo_with_object(server: &Server, work: &Path) -> (std::path::PathBuf, String) {
    require_tool("git-lfs");
    server.add_user("alice", "a-pass");
    server.create_repo("admin/pub", true);
    server.admin(&["repo", "grant", "admin/pub", "alice", "write"], None);
    let src = work.join("src");
    lfs_worktree(server, &src, "alice", "a-pass");
    git(&src, &["lfs", "track", "*.bin"]);
    let data = random_bytes(50 << 20, 17);
    std::fs::write(src.join("a.bin"), &data).unwrap();
    git(&src, &["add", "."]);
    git(&src, &["commit", "-q", "-m", "a"]);
    git(
        &src,
        &["remote", "add", "origin", &server.url("admin/pub", None)],
    );
    git_env(&src, &["push", "-q", "origin", "main"], &lfs_env());
    (src, sha256_hex(&data))
}

/// A server under [`STALL_CONFIG`] with [`public_repo_with_object`]: (server, work dir, the
/// pushing work tree, the object id).
fn stall_server_with_object() -> (Server, tempfile::TempDir, std::path::PathBuf, String) {
    let server = Server::start_with(ServerOptions {
        config: Some(STALL_CONFIG.into()),
        ..ServerOptions::default()
    });
    let work = tempfile::tempdir().unwrap();
    let (src, oid) = public_repo_with_object(&server, work.path());
    (server, work, src, oid)
}

/// Waits until every stalled download is cut at the send deadline, then checks that each
/// connection was closed short of the object and that the pool is whole again.
fn stalled_downloads_are_cut(server: &Server, stalled: Vec<TcpStream>, cuts_before: u64) {
    let n = stalled.len() as u64;
    assert!(
        wait_for(Duration::from_secs(60), || metric(server, CUT_SEND_IDLE)
            >= cuts_before + n),
        "only {} of {n} stalled downloads were cut",
        metric(server, CUT_SEND_IDLE) - cuts_before
    );
    for mut s in stalled {
        let mut rest = Vec::new();
        // Closed by the server: what the kernel still holds, then EOF (or a reset).
        let _ = s.read_to_end(&mut rest);
        assert!(
            rest.len() < 50 << 20,
            "a stalled download got the whole object"
        );
    }
    assert!(
        wait_for(Duration::from_secs(10), || metric(server, POOL_IN_USE) == 0
            && metric(server, ACTIVE) == 0),
        "pool not whole after the cuts: {} buffers in use, {} transfers",
        metric(server, POOL_IN_USE),
        metric(server, ACTIVE)
    );
}

#[test]
fn eighty_stalled_anonymous_downloads_hold_no_buffer_and_are_cut_at_the_send_deadline() {
    let (server, work, src, oid) = stall_server_with_object();
    let cuts_before = metric(&server, CUT_SEND_IDLE);

    // 80 anonymous downloads from 20 addresses, 4 each (their whole share), that never read.
    let sources: Vec<std::net::Ipv4Addr> = (0..STALLED)
        .map(|i| std::net::Ipv4Addr::new(127, 0, 0, 11 + (i / 4) as u8))
        .collect();
    let stalled: Vec<TcpStream> = sources
        .iter()
        .map(|ip| {
            let (status, head, s) = stalled_download(&server, *ip, "admin/pub", &oid, None);
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&head));
            s
        })
        .collect();
    // A fifth from an address that has its share is told to come back later.
    let (status, head, _) = stalled_download(&server, sources[0], "admin/pub", &oid, None);
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&head));
    assert!(
        String::from_utf8_lossy(&head).contains("Retry-After:"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    assert!(
        metric(
            &server,
            "gitplane_stalled_cuts_total{reason=\"anonymous_share\"}"
        ) >= 1
    );

    // All 80 are transferring, and none holds a pool buffer while its socket is full.
    assert!(
        wait_for(Duration::from_secs(10), || metric(&server, ACTIVE)
            == STALLED as u64),
        "{} transfers active",
        metric(&server, ACTIVE)
    );
    std::thread::sleep(Duration::from_millis(500));
    let held = metric(&server, POOL_IN_USE);
    assert_eq!(held, 0, "stalled downloads hold {held} pool buffers");
    assert_eq!(
        metric(&server, CUT_SEND_IDLE),
        cuts_before,
        "cut before the deadline"
    );

    // Meanwhile another user downloads and uploads 50 MiB objects with the real client.
    let dest = work.path().join("dest");
    lfs_worktree(&server, &dest, "alice", "a-pass");
    git(
        &dest,
        &["remote", "add", "origin", &server.url("admin/pub", None)],
    );
    let started = std::time::Instant::now();
    git_env(&dest, &["pull", "-q", "origin", "main"], &lfs_env());
    let download = started.elapsed();
    assert_eq!(sha256_hex(&std::fs::read(dest.join("a.bin")).unwrap()), oid);
    let data = random_bytes(50 << 20, 18);
    std::fs::write(src.join("b.bin"), &data).unwrap();
    git(&src, &["add", "."]);
    git(&src, &["commit", "-q", "-m", "b"]);
    let started = std::time::Instant::now();
    git_env(&src, &["push", "-q", "origin", "main"], &lfs_env());
    let upload = started.elapsed();
    assert!(server.lfs_object_path(&sha256_hex(&data)).exists());
    eprintln!("during the attack: 50 MiB download {download:?}, upload {upload:?}");
    assert!(
        download < Duration::from_secs(10) && upload < Duration::from_secs(10),
        "download {download:?}, upload {upload:?} while 80 downloads stalled"
    );

    stalled_downloads_are_cut(&server, stalled, cuts_before);
}

/// The same attack by authenticated clients from one address, which no anonymous share stops:
/// only the buffer release and the send deadline protect the others.
#[test]
fn eighty_stalled_authenticated_downloads_leave_the_pool_to_others() {
    let (server, _work, _src, oid) = stall_server_with_object();
    let cuts_before = metric(&server, CUT_SEND_IDLE);
    let alice = basic("alice", "a-pass");
    let localhost = std::net::Ipv4Addr::LOCALHOST;
    let stalled: Vec<TcpStream> = (0..STALLED)
        .map(|_| {
            let (status, head, s) =
                stalled_download(&server, localhost, "admin/pub", &oid, Some(&alice));
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&head));
            s
        })
        .collect();
    assert!(
        wait_for(Duration::from_secs(10), || metric(&server, ACTIVE)
            == STALLED as u64),
        "{} transfers active",
        metric(&server, ACTIVE)
    );
    // Another client downloads the whole object and gets every byte.
    let started = std::time::Instant::now();
    let raw = raw_request(
        server.addr,
        format!(
            "GET /admin/pub.git/info/lfs/objects/{oid} HTTP/1.1\r\nHost: x\r\n\
             Authorization: {}\r\nConnection: close\r\n\r\n",
            basic("admin", &server.admin_password)
        )
        .as_bytes(),
        Duration::from_secs(30),
    );
    let took = started.elapsed();
    assert_eq!(status_of(&raw), 200);
    assert_eq!(sha256_hex(body_of(&raw)), oid);
    eprintln!("50 MiB download while 80 authenticated downloads stalled: {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    stalled_downloads_are_cut(&server, stalled, cuts_before);
}

/// An upload whose client stops sending mid-body is cut at the body deadline with 408; its
/// staging file is removed and its buffers are back in the pool.
#[test]
fn a_stalled_upload_is_cut_with_408_and_leaves_nothing() {
    let server = Server::start_with(ServerOptions {
        shards: 1,
        config: Some("[http]\nbody_idle_secs = 2\n[lfs]\nbuffer_kib = 64\n".into()),
        ..ServerOptions::default()
    });
    server.create_repo("admin/up", false);
    let data = random_bytes(4 << 20, 5);
    let oid = sha256_hex(&data);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(
        format!(
            "PUT /admin/up.git/info/lfs/objects/{oid} HTTP/1.1\r\nHost: x\r\n\
             Authorization: {}\r\nContent-Length: {}\r\n\r\n",
            basic("admin", &server.admin_password),
            data.len()
        )
        .as_bytes(),
    )
    .unwrap();
    // A megabyte and a bit (not a whole number of buffers), then silence.
    s.write_all(&data[..(1 << 20) + 1000]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert_eq!(status_of(&out), 408, "{}", String::from_utf8_lossy(&out));
    assert!(
        metric(
            &server,
            "gitplane_stalled_cuts_total{reason=\"http_body_idle\"}"
        ) >= 1
    );
    assert!(!server.lfs_object_path(&oid).exists());
    let tmp = server.data_dir().join("lfs").join("tmp");
    let staged: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(staged.is_empty(), "staging files left: {staged:?}");
    assert!(
        wait_for(Duration::from_secs(5), || metric(&server, POOL_IN_USE) == 0),
        "{} buffers still in use",
        metric(&server, POOL_IN_USE)
    );
}

/// Downloads from S3 storage that stall hold no pool buffer either: a streamed source reads only
/// what the socket takes now, so a stall finds no unsent bytes to keep.
#[test]
fn stalled_downloads_from_s3_hold_no_buffer() {
    let s3 = S3Server::start();
    let server = Server::start_with(ServerOptions {
        config: Some(format!(
            "{}\n[http]\nsend_idle_secs = 4\n",
            s3.bucket_config("lfs-bucket")
        )),
        ..ServerOptions::default()
    });
    server.create_repo("admin/s3", true);
    let data = random_bytes(12 << 20, 9);
    let oid = sha256_hex(&data);
    let auth = basic("admin", &server.admin_password);
    assert_eq!(
        status_of(&put_object(&server, "admin/s3", &oid, &auth, &data)),
        200
    );
    let cuts_before = metric(&server, CUT_SEND_IDLE);
    let stalled: Vec<TcpStream> = (0..16)
        .map(|i| {
            let source = std::net::Ipv4Addr::new(127, 0, 1, 1 + i / 4);
            let (status, head, s) = stalled_download(&server, source, "admin/s3", &oid, None);
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&head));
            s
        })
        .collect();
    assert!(
        wait_for(Duration::from_secs(10), || metric(&server, ACTIVE) == 16),
        "{} transfers active",
        metric(&server, ACTIVE)
    );
    std::thread::sleep(Duration::from_millis(500));
    let held = metric(&server, POOL_IN_USE);
    assert_eq!(held, 0, "stalled S3 downloads hold {held} pool buffers");
    stalled_downloads_are_cut(&server, stalled, cuts_before);
}
