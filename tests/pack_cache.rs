//! The pack-objects cache end to end: real `git` clients against a real server. A cache hit is
//! visible to the client: the server's pack-objects progress ("remote: Enumerating objects")
//! appears only when a pack is generated, and `--progress` asks for it even without a terminal.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::*;

const GENERATED: &str = "remote: Enumerating objects";

fn clone(work: &Path, url: &str, name: &str, extra: &[&str]) -> (PathBuf, Output) {
    let dest = work.join(name);
    let mut args = vec!["clone", "--progress", "--bare"];
    args.extend_from_slice(extra);
    args.extend([url, dest.to_str().unwrap()]);
    let out = git_raw(work, &args, &[]);
    assert!(
        out.status.success(),
        "clone {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (dest, out)
}

fn generated(out: &Output) -> bool {
    String::from_utf8_lossy(&out.stderr).contains(GENERATED)
}

fn cached_packs(server: &Server) -> usize {
    std::fs::read_dir(server.data_dir().join("cache/packs"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn identical_clones_share_a_pack_and_new_commits_are_never_missed() {
    let (server, work) = server_with_pushed_repo(5);
    let url = server.admin_url("admin/proj");
    let w = work.path();

    let (first, out) = clone(w, &url, "first", &[]);
    assert!(generated(&out), "the first clone must generate its pack");
    assert_eq!(cached_packs(&server), 1);
    let (second, out) = clone(w, &url, "second", &[]);
    assert!(
        !generated(&out),
        "an identical clone must be served from the cache:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for dest in [&first, &second] {
        git(dest, &["fsck", "--strict"]);
        assert_eq!(rev_count(dest, "main"), 5);
    }
    assert_eq!(cached_packs(&server), 1);
    // The hooks' counters reach the server's /metrics.
    assert_eq!(metric(&server, "gitplane_pack_cache_misses_total"), 1);
    assert_eq!(metric(&server, "gitplane_pack_cache_hits_total"), 1);
    assert_eq!(metric(&server, "gitplane_pack_cache_bypassed_total"), 0);
    let pack_bytes = std::fs::read_dir(server.data_dir().join("cache/packs"))
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "pack"))
        .unwrap()
        .metadata()
        .unwrap()
        .len();
    assert_eq!(
        metric(&server, "gitplane_pack_cache_hit_bytes_total"),
        pack_bytes
    );

    // A push changes what clients want, so the next clone is a miss that sees the new commit.
    let src = w.join("src");
    std::fs::write(src.join("new.txt"), "new\n").unwrap();
    git(&src, &["add", "."]);
    git(&src, &["commit", "-q", "-m", "after the cached pack"]);
    git(&src, &["push", "-q", &url, "main"]);
    let (third, out) = clone(w, &url, "third", &[]);
    assert!(generated(&out));
    assert_eq!(rev_count(&third, "main"), 6);
    git(&third, &["fsck", "--strict"]);

    // Shallow and filtered packs are keyed apart from the full one and from each other.
    let (shallow, out) = clone(w, &url, "shallow", &["--depth", "1"]);
    assert!(generated(&out));
    assert_eq!(rev_count(&shallow, "main"), 1);
    let (filtered, out) = clone(w, &url, "filtered", &["--filter=blob:none"]);
    assert!(generated(&out));
    let objects = git(&filtered, &["count-objects", "-v"]);
    let (full, out) = clone(w, &url, "full", &[]);
    assert!(!generated(&out), "the full pack is still cached");
    assert_eq!(rev_count(&full, "main"), 6);
    git(&full, &["fsck", "--strict"]);
    assert_ne!(objects, git(&full, &["count-objects", "-v"]));
    assert_eq!(cached_packs(&server), 4);

    // Fetching into a clone that is behind sends haves: its own entry, and the right objects.
    git(&first, &["fetch", "-q", &url, "main:main"]);
    assert_eq!(rev_count(&first, "main"), 6);
    git(&first, &["fsck", "--strict"]);
}

#[test]
fn concurrent_identical_clones_generate_once() {
    let (server, work) = server_with_pushed_repo(20);
    let url = server.admin_url("admin/proj");
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (url, w) = (url.clone(), work.path().to_owned());
            std::thread::spawn(move || {
                let (dest, out) = clone(&w, &url, &format!("c{i}"), &[]);
                git(&dest, &["fsck", "--strict"]);
                assert_eq!(rev_count(&dest, "main"), 20);
                generated(&out)
            })
        })
        .collect();
    let generations = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|g| *g)
        .count();
    assert_eq!(generations, 1, "8 identical clones, one pack-objects run");
    assert_eq!(cached_packs(&server), 1);
}

/// A server with `config` and a private `admin/proj` of 3 commits.
fn configured_server_with_repo(config: &str) -> (Server, tempfile::TempDir) {
    let server = Server::start_with(ServerOptions {
        config: Some(config.into()),
        ..ServerOptions::default()
    });
    let work = push_new_repo(&server, "admin/proj", 3);
    (server, work)
}

#[test]
fn expired_entries_are_regenerated() {
    let (server, work) = configured_server_with_repo("[git]\npack_cache_max_age_secs = 1\n");
    let url = server.admin_url("admin/proj");
    let (_, out) = clone(work.path(), &url, "a", &[]);
    assert!(generated(&out));
    std::thread::sleep(Duration::from_millis(1100));
    let (dest, out) = clone(work.path(), &url, "b", &[]);
    assert!(generated(&out), "a pack older than max_age is not served");
    git(&dest, &["fsck", "--strict"]);
    assert_eq!(cached_packs(&server), 1, "the expired entry was replaced");
}

#[test]
fn a_disabled_cache_stores_nothing() {
    let (server, work) = configured_server_with_repo("[git]\npack_cache = false\n");
    let url = server.admin_url("admin/proj");
    for name in ["a", "b"] {
        let (dest, out) = clone(work.path(), &url, name, &[]);
        assert!(generated(&out), "clone {name} runs pack-objects itself");
        git(&dest, &["fsck", "--strict"]);
    }
    assert_eq!(cached_packs(&server), 0);
}

#[test]
fn ssh_clones_use_the_same_cache() {
    require_tool("ssh");
    let (server, work) = server_with_pushed_repo(4);
    let w = work.path();
    let key = ssh_keygen(w, "admin_key");
    server.admin(
        &["key", "add", "admin", &format!("{}.pub", key.display())],
        None,
    );
    let ssh = openssh_command(&key, &ssh_known_hosts(&server, w));
    let url = format!(
        "ssh://git@127.0.0.1:{}/admin/proj.git",
        server.listening["ssh"].port()
    );
    let ssh_clone = |name: &str| {
        let dest = w.join(name);
        let out = git_raw(
            w,
            &[
                "clone",
                "--progress",
                "--bare",
                &url,
                dest.to_str().unwrap(),
            ],
            &[("GIT_SSH_COMMAND", &ssh)],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        git(&dest, &["fsck", "--strict"]);
        assert_eq!(rev_count(&dest, "main"), 4);
        generated(&out)
    };
    assert!(ssh_clone("a"));
    assert!(
        !ssh_clone("b"),
        "the second SSH clone is served from the cache"
    );
    // Over HTTP, the same request is the same entry.
    let (_, out) = clone(w, &server.admin_url("admin/proj"), "http", &[]);
    assert!(!generated(&out));
    assert_eq!(cached_packs(&server), 1);
}
